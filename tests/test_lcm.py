"""Latent consistency models: unit tests of the math (boundary condition, reduction to CD without guidance,
the skipping DDIM step, the zero-initialised guidance input), the fixed-guidance export, and exact-teacher tests
on the 8-mode ring and on a class-conditional Gaussian mixture, each with a broken control that must fail."""

import math

import pytest
import torch

from exact_ring import (
    NOISE,
    best_training_free_excess_nll,
    distil_on_ring,
    draw,
    passes_issue_bar,
    small_mlp,
)
from fewstep.data.batch import Batch
from fewstep.data.sources import RealData
from fewstep.errors import ConfigError
from fewstep.guidance import GuidedDenoiser
from fewstep.methods import METHODS
from fewstep.methods.consistency.consistency_distillation import CDConfig, ConsistencyDistillation
from fewstep.methods.consistency.latent_consistency import LatentConsistency, LCMConfig
from fewstep.methods.losses import ode_step
from fewstep.models.analytic import GaussianMixture, ring_mixture
from fewstep.models.denoiser import FixedExtraDenoiser, innermost
from fewstep.models.io import load_model, save_model
from fewstep.nets import MLP
from fewstep.solvers import ode_endpoint, sample
from fewstep.train.trainer import TrainConfig, train

DT = torch.float64


def two_class_mixture() -> GaussianMixture:
    """Two overlapping classes, N((-0.5, 0), 0.25 I) and N((0.5, 0), 0.25 I): guidance pushes them apart."""
    return GaussianMixture(torch.ones(2), torch.tensor([[-0.5, 0.0], [0.5, 0.0]]), torch.full((2,), 0.25),
                           component_labels=torch.tensor([0, 1]))


def conditional_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP((2,), width=128, depth=3, num_classes=2)


def lcm(teacher=None, **config) -> LatentConsistency:
    teacher = ring_mixture() if teacher is None else teacher
    config = LCMConfig(**config)
    new_backbone = conditional_mlp if teacher.num_classes else small_mlp
    return LatentConsistency(teacher, LatentConsistency.build_student(teacher, config, new_backbone, 1.0), config)


# ----------------------------------------------------------------------------------------------- math


def test_lcm_is_registered():
    assert METHODS["lcm"] is LatentConsistency


def test_student_satisfies_the_boundary_condition_at_every_guidance_weight():
    method = lcm()
    x = torch.randn(64, 2)
    for w in (1.0, 4.0):
        extra = torch.full((64, 1), w)
        assert torch.equal(method.student(x, torch.full((64,), 0.002), None, extra), x)
        assert not torch.allclose(method.student(x, torch.full((64,), 1.0), None, extra), x)


def test_without_guidance_the_lcm_target_is_cds_up_to_the_solver():
    """At w = 1 with skip 1 and the Heun step LCM's loss is CD's, draw for draw, on a conditional teacher."""
    teacher = GuidedDenoiser(two_class_mixture(), 1.0)
    method = lcm(teacher, num_scales=18, skip=1, teacher_solver="heun", guidance_min=1.0, guidance_max=1.0)
    cd = ConsistencyDistillation(teacher.denoiser, FixedExtraDenoiser(method.student, [1.0]), CDConfig())
    batch = Batch(x0=torch.randn(256, 2), cond=torch.randint(0, 2, (256,)))
    lcm_loss = method.losses("student", batch, 0, torch.Generator().manual_seed(3))["loss"]
    cd_loss = cd.losses("student", batch, 0, torch.Generator().manual_seed(3))["loss"]
    assert torch.allclose(lcm_loss, cd_loss, rtol=1e-5), (lcm_loss, cd_loss)
    # With guidance the target moves: a guided teacher step differs from the conditional one.
    guided = lcm(teacher, num_scales=18, skip=1, teacher_solver="heun", guidance_min=3.0, guidance_max=3.0)
    guided_loss = guided.losses("student", batch, 0, torch.Generator().manual_seed(3))["loss"]
    assert not torch.allclose(guided_loss, cd_loss, rtol=1e-3)


def test_guided_teacher_is_cfg_per_sample_and_counts_one_evaluation_per_sample():
    mixture = two_class_mixture()
    method = lcm(GuidedDenoiser(mixture, 2.0))
    assert innermost(method.teacher) is mixture and method.sampling_weight == 2.0
    x, s = torch.randn(4, 2, dtype=DT), torch.full((4,), 0.7, dtype=DT)
    label, w = torch.tensor([0, 1, 0, 1]), torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=DT)
    got = method.guided_teacher(x, s, label, w)
    for i in range(4):
        expected = GuidedDenoiser(mixture, float(w[i]))(x[i:i + 1], s[i:i + 1], label[i:i + 1])
        assert torch.allclose(got[i:i + 1], expected, atol=1e-12)
    assert method.teacher_evals == 4  # one guided evaluation per sample, though it runs the mixture twice
    method.losses("student", Batch(x0=torch.randn(32, 2), cond=torch.randint(0, 2, (32,))), 0,
                  torch.Generator().manual_seed(0))
    assert method.teacher_evals == 4 + 32


def test_skipping_ddim_step_lands_on_the_exact_ode_of_a_single_gaussian_as_the_step_shrinks():
    """For data N(0, v) the ODE keeps x / sqrt(v + s^2) constant; DDIM's local error is second order."""
    v = 0.5
    gaussian = GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.full((1,), v))
    x = torch.randn(128, 2, dtype=DT, generator=torch.Generator().manual_seed(0)) * math.sqrt(v + 9.0)
    errors = []
    for gap in (0.4, 0.2, 0.1):
        s, s_next = torch.full((128,), 3.0, dtype=DT), torch.full((128,), 3.0 - gap, dtype=DT)
        exact = x * math.sqrt(v + (3.0 - gap) ** 2) / math.sqrt(v + 9.0)
        step = ode_step(lambda y, t: gaussian(y, t), x, s, s_next, "euler")
        errors.append(float((step - exact).norm(dim=1).mean()))
    assert errors[2] < 1e-3 and errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5, errors


def test_guidance_input_changes_the_output_only_after_training():
    teacher = GuidedDenoiser(two_class_mixture(), 2.0)
    method = lcm(teacher, guidance_min=1.0, guidance_max=4.0)
    x, s, label = torch.randn(64, 2), torch.full((64,), 1.0), torch.randint(0, 2, (64,))

    @torch.no_grad()
    def gap() -> float:
        low, high = (method.student(x, s, label, torch.full((64, 1), w)) for w in (1.0, 4.0))
        return float((low - high).abs().max())

    assert gap() == 0.0
    x0, y = two_class_mixture().sample(2048, torch.Generator().manual_seed(1), return_components=True)
    train(method, RealData(x0.float(), y), TrainConfig(steps=30, lr=1e-3), progress=False)
    assert gap() > 1e-3


def test_exported_student_fixes_the_sampling_guidance_and_round_trips(tmp_path):
    method = lcm(GuidedDenoiser(two_class_mixture(), 2.0), sampling_guidance=3.0)
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    student = method.student_denoiser()
    assert student.extra == [3.0] and set(student.state_dict()) == {f"denoiser.{k}"
                                                                    for k in method.student.state_dict()}
    x, s, label = torch.randn(16, 2), torch.full((16,), 2.0), torch.randint(0, 2, (16,))
    assert torch.equal(student(x, s, label), method.student(x, s, label, torch.full((16, 1), 3.0)))
    save_model(tmp_path / "lcm", student, {"role": "student"})
    loaded, meta = load_model(tmp_path / "lcm")
    assert meta["denoiser"]["kind"] == "fixed_extra" and meta["prediction"] == "consistency"
    assert torch.allclose(loaded(x, s, label), student(x, s, label))


def test_cfg_plus_one_convention_shifts_the_weights():
    method = lcm(GuidedDenoiser(two_class_mixture(), 1.0, "cfg_plus_one"), guidance_convention="cfg_plus_one",
                 guidance_min=0.0, guidance_max=2.0)
    assert method.weight_range == (1.0, 3.0) and method.sampling_weight == 2.0


@pytest.mark.parametrize("bad, key", [({"skip": 61}, "skip"), ({"guidance_min": 4.0}, "guidance_min"),
                                      ({"teacher_solver": "rk4"}, "teacher_solver"),
                                      ({"distance": "lpips"}, "distance"),
                                      ({"guidance_convention": "w"}, "guidance_convention")])
def test_bad_config_names_the_key(bad, key):
    with pytest.raises(ConfigError, match=key):
        lcm(**bad)


def test_a_student_without_the_guidance_input_is_refused():
    from fewstep.models.denoiser import ConsistencyDenoiser

    with pytest.raises(ConfigError, match="extra condition"):
        LatentConsistency(ring_mixture(), ConsistencyDenoiser(small_mlp(), 1.0), LCMConfig())


# ------------------------------------------------------------------------------------ exact teacher


class LCMWithFlippedStep(LatentConsistency):
    """A broken LCM: the teacher's skipping step goes the wrong way (sign flipped in the target)."""

    def skipping_step(self, x, s, s_next, label, weight):
        return 2 * x - super().skipping_step(x, s, s_next, label, weight)


def test_lcm_on_the_exact_ring_beats_every_training_free_solver_at_two_steps():
    ok, m = passes_issue_bar(draw(*distil_on_ring(LatentConsistency, LCMConfig(), steps=1500), 2))
    assert ok, (m, best_training_free_excess_nll(2))


def test_metrics_catch_an_lcm_with_a_flipped_teacher_step():
    ok, m = passes_issue_bar(draw(*distil_on_ring(LCMWithFlippedStep, LCMConfig(), steps=1500), 2))
    assert not ok, m


class LCMIgnoringGuidance(LatentConsistency):
    """A broken LCM: the target always uses the unguided teacher, whatever weight the student is told."""

    def guided_teacher(self, x, s, cond, weight):
        return super().guided_teacher(x, s, cond, torch.ones_like(weight))


def guidance_effect(method_cls) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean x-shift of one-step samples between guidance weights 2 and 1, for the LCM student and for
    the exact guided teacher ODE, from the same noise and labels."""
    mixture = two_class_mixture()
    x0, y = mixture.sample(4096, torch.Generator().manual_seed(5), return_components=True)
    teacher = GuidedDenoiser(mixture, 2.0)
    config = LCMConfig(guidance_min=1.0, guidance_max=3.0)
    method = method_cls(teacher, method_cls.build_student(teacher, config, conditional_mlp, 0.5), config)
    result = train(method, RealData(x0.float(), y), TrainConfig(steps=1200, lr=1e-3, seed=0), progress=False)
    network = result.ema_student.denoiser
    noise, label = NOISE[:2000], torch.arange(2000) % 2
    student_shift, teacher_shift = torch.zeros(2), torch.zeros(2)
    ends = {}
    for w in (1.0, 2.0):
        student = FixedExtraDenoiser(network, [w])
        ends[w] = (sample(lambda x, s, w=student: w(x, s, label), noise, "consistency", torch.tensor([80.0])),
                   ode_endpoint(lambda x, s, w=w: GuidedDenoiser(mixture, w)(x, s, label), noise.double()).float())
    for c in (0, 1):
        pick = label == c
        student_shift[c] = (ends[2.0][0][pick, 0] - ends[1.0][0][pick, 0]).mean()
        teacher_shift[c] = (ends[2.0][1][pick, 0] - ends[1.0][1][pick, 0]).mean()
    return student_shift, teacher_shift


def test_lcm_student_follows_the_guided_teacher_when_told_a_larger_weight():
    student_shift, teacher_shift = guidance_effect(LatentConsistency)
    assert teacher_shift[0] < -0.1 and teacher_shift[1] > 0.1, teacher_shift  # guidance pushes classes apart
    ratio = student_shift / teacher_shift
    assert ((ratio > 0.6) & (ratio < 1.5)).all(), (student_shift, teacher_shift)


def test_guidance_check_fails_when_the_target_ignores_the_weight():
    student_shift, teacher_shift = guidance_effect(LCMIgnoringGuidance)
    ratio = student_shift / teacher_shift
    assert not ((ratio > 0.6) & (ratio < 1.5)).all(), (student_shift, teacher_shift)
