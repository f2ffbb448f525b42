"""TwinFlow: one network read three ways (real denoiser, jump to 0, twin fake denoiser), the consistency target
along the real velocity (the teacher's, or the network's own with no teacher call), the rectification's gradient,
the exported generator, and an exact-teacher test on the 8-mode ring that fails when the teacher's step is
flipped."""

import pytest
import torch

from exact_ring import RING, best_training_free_excess_nll, distil_on_ring, draw, passes_issue_bar
from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.methods import METHODS
from fewstep.methods.flow.twinflow import FAKE, JUMP, REAL, TwinFlow, TwinFlowConfig
from fewstep.methods.losses import pseudo_huber
from fewstep.methods.scores import karras_index_sigma
from fewstep.models.analytic import ring_mixture
from fewstep.models.denoiser import ConsistencyDenoiser, EDMDenoiser, FixedExtraDenoiser
from fewstep.models.io import load_model, save_model
from fewstep.nets import MLP
from fewstep.solvers import count_nfe

DT = torch.float64


def network_teacher(seed: int = 3) -> EDMDenoiser:
    torch.manual_seed(seed)
    return EDMDenoiser(MLP((2,), width=32, depth=2), sigma_data=1.4)


def twin(seed: int = 0, teacher=None, **config) -> TwinFlow:
    """A TwinFlow whose three readings differ (its extra inputs no longer zero-initialised)."""
    teacher = teacher if teacher is not None else ring_mixture()
    torch.manual_seed(seed)
    student = TwinFlow.build_student(teacher, TwinFlowConfig(**config), lambda: MLP((2,), width=32, depth=2), 1.4)
    with torch.no_grad():
        for p in student.backbone.extra_embeddings.parameters():
            p.normal_(0, 0.3)
    return TwinFlow(teacher, student, TwinFlowConfig(**config))


# ----------------------------------------------------------------------------------------------- math


def test_every_reading_of_a_student_built_on_a_teacher_network_starts_as_the_teacher():
    """... read with consistency coefficients, which hold the boundary net(x, sigma_min) = x exactly."""
    teacher = network_teacher()
    method = TwinFlow(teacher, TwinFlow.build_student(teacher, TwinFlowConfig(), None, 1.4), TwinFlowConfig())
    x, s = torch.randn(64, 2), torch.rand(64) * 10 + 0.01
    expected = ConsistencyDenoiser(teacher.backbone, 1.4, 0.002)(x, s)
    for which in (REAL, JUMP, FAKE):
        assert torch.allclose(method.reading(x, s, None, which), expected, atol=1e-6)
        assert torch.allclose(method.reading(x, torch.full((64,), 0.002), None, which), x)
    assert len(teacher.backbone.extra_embeddings) == 0  # the teacher's own network is untouched


def test_the_readings_are_one_network_told_apart_by_its_two_extra_inputs():
    method = twin()
    x, s = torch.randn(16, 2), torch.full((16,), 2.0)
    outputs = [method.reading(x, s, None, which) for which in (REAL, JUMP, FAKE)]
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[0], outputs[2])
    trained = [p for p in method.parameters() if p.requires_grad]
    assert len(trained) == len(list(method.student.parameters()))  # one trained network (and its EMA copy)
    generator = method.student_denoiser()
    assert isinstance(generator, FixedExtraDenoiser) and torch.equal(generator(x, s), outputs[1])


def test_the_consistency_target_is_the_jump_after_one_teacher_ddim_step():
    method = twin(distance="pseudo_huber").double()
    x0 = RING.train_x[:64].double()
    loss = method.consistency_loss(x0, None, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)  # replay: the grid index, then the noise
    i = torch.randint(0, method.config.num_scales - 1, (64,), generator=generator)
    t, u = method.grid[i].double(), method.grid[i + 1].double()
    x_t = x0 + t[:, None] * torch.randn(64, 2, generator=generator, dtype=DT)
    denoised = ring_mixture().double()(x_t, t)
    x_u = denoised + (u / t)[:, None] * (x_t - denoised)
    expected = pseudo_huber(method.reading(x_t, t, None, JUMP), method.reading(x_u, u, None, JUMP), method.huber_c)
    assert torch.allclose(loss, expected.mean(), rtol=1e-10)
    assert method.teacher_evals == 64


def test_the_rectification_moves_the_sample_from_the_twin_towards_the_real_denoiser():
    """Its gradient in the one-step sample is clamp(D_fake - D_real) / (B D): descent moves x_g along
    D_real - D_fake, DMD's step with the fake score read from the generator's own network."""
    method = twin(rectify_clamp=0.05).double()
    x_generated = (RING.train_x[:32].double() * 1.1).requires_grad_(True)
    method.rectify_loss(x_generated, None, torch.Generator().manual_seed(4)).backward()
    generator = torch.Generator().manual_seed(4)
    sigma = karras_index_sigma(32, generator, x_generated, 0.02, 0.98)
    x = x_generated.detach() + sigma[:, None] * torch.randn(32, 2, generator=generator, dtype=DT)
    with torch.no_grad():
        gap = method.reading(x, sigma, None, FAKE) - ring_mixture().double()(x, sigma)
    assert bool((gap.abs() > 0.05).any())  # the clamp acts
    assert torch.allclose(x_generated.grad, gap.clamp(-0.05, 0.05) / (32 * 2), atol=1e-12)


def test_no_fixed_teacher_with_its_own_velocity_and_two_teacher_evaluations_a_sample_with_the_teachers():
    batch = Batch(x0=RING.train_x[:32])
    own = twin(velocity="self")
    out = own.losses("student", batch, 0, torch.Generator().manual_seed(0))
    assert own.teacher_evals == 0 and set(out) == {"loss", "consistency", "fake", "rectify", "flow"}
    distilled = twin(velocity="teacher")
    out = distilled.losses("student", batch, 0, torch.Generator().manual_seed(0))
    assert distilled.teacher_evals == 2 * 32 and set(out) == {"loss", "consistency", "fake", "rectify"}
    out["loss"].backward()
    assert all(p.grad is not None for p in distilled.student.backbone.extra_embeddings.parameters())


def test_the_generator_saves_loads_and_samples_with_nfe_calls(tmp_path):
    method = twin()
    save_model(tmp_path / "m", method.student_denoiser(), {"role": "student"})
    loaded, _ = load_model(tmp_path / "m")
    x, s = torch.randn(8, 2), torch.full((8,), 5.0)
    assert torch.equal(loaded(x, s), method.reading(x, s, None, JUMP))
    for nfe in (1, 2, 4):
        spec = method.sampling(nfe)
        assert spec.sampler == "consistency" and spec.sigmas[0] == 80.0
        assert count_nfe(spec.sampler, torch.tensor(spec.sigmas)) == nfe
    assert METHODS["twinflow"] is TwinFlow and TwinFlow.needs == {"data"}


def test_bad_configs_and_students_are_refused():
    for bad in ({"velocity": "ema"}, {"distance": "lpips"}, {"num_scales": 1}, {"rectify_clamp": 0.0},
                {"fake_weight": -1.0}):
        with pytest.raises(ConfigError, match=next(iter(bad)).split("_")[0]):
            twin(**bad)
    with pytest.raises(ConfigError, match="two extra conditions"):
        TwinFlow(ring_mixture(), EDMDenoiser(MLP((2,), width=16, depth=1), 1.4), TwinFlowConfig())


# ------------------------------------------------------------------------------------ exact teacher

class TwinFlowWithFlippedStep(TwinFlow):
    """A broken TwinFlow: the teacher's velocity points the wrong way in every target."""

    def real_denoiser(self, x, s, cond):
        return 2 * x - super().real_denoiser(x, s, cond)


RING_STEPS = 2000
RING_CONFIG = {"fake_weight": 0.1}  # the ring recipe's


@pytest.mark.slow
def test_twinflow_on_the_exact_ring_beats_every_training_free_solver_at_two_steps():
    method, student = distil_on_ring(TwinFlow, TwinFlowConfig(**RING_CONFIG), RING_STEPS)
    ok, m = passes_issue_bar(draw(method, student, 2))
    assert ok, (m, best_training_free_excess_nll(2))


@pytest.mark.slow
def test_metrics_catch_a_twinflow_with_a_flipped_teacher_velocity():
    method, student = distil_on_ring(TwinFlowWithFlippedStep, TwinFlowConfig(**RING_CONFIG), RING_STEPS)
    ok, m = passes_issue_bar(draw(method, student, 2))
    assert not ok, m
