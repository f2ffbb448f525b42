"""Progressive and consistency distillation: unit tests of their math, and exact-teacher tests on the analytic
8-mode ring that fail when a method's target is wrong."""

import math

import pytest
import torch

from exact_ring import (
    NOISE,
    RING,
    best_training_free_excess_nll,
    distil_on_ring,
    draw,
    flow_map_error,
    passes_issue_bar,
    small_mlp,
)
from fewstep.data.batch import NEEDS, Batch
from fewstep.methods import METHODS
from fewstep.methods.consistency.consistency_distillation import CDConfig, ConsistencyDistillation
from fewstep.methods.losses import multistep_sigmas, pseudo_huber
from fewstep.methods.trajectory.progressive_distillation import PDConfig, ProgressiveDistillation
from fewstep.models.analytic import ring_mixture
from fewstep.models.denoiser import ConsistencyDenoiser, Denoiser, EDMDenoiser
from fewstep.solvers import append_zero, karras_sigmas, sample, solver_sigmas

DT = torch.float64


# ----------------------------------------------------------------------------------------------- math


def test_consistency_parametrisation_satisfies_the_boundary_condition():
    f = ConsistencyDenoiser(small_mlp(), sigma_data=1.4, sigma_min=0.002)
    x = torch.randn(64, 2)
    assert torch.equal(f(x, torch.full((64,), 0.002)), x)
    assert not torch.allclose(f(x, torch.full((64,), 1.0)), x)


def test_pseudo_huber_limits():
    a, b = torch.randn(16, 3), torch.randn(16, 3)
    assert torch.allclose(pseudo_huber(a, b, 0.0), (a - b).norm(dim=1))
    small = b + 1e-4 * torch.randn(16, 3)
    c = 0.1
    assert torch.allclose(pseudo_huber(small, b, c), (small - b).pow(2).sum(1) / (2 * c), rtol=1e-3)


def test_cd_teacher_step_is_second_order_accurate_along_the_exact_ode():
    """The local error of the Heun step shrinks ~8x when the gap halves (third order per step)."""
    mixture = ring_mixture()
    x = torch.randn(256, 2, dtype=DT, generator=torch.Generator().manual_seed(0)) * 3.0
    cd = ConsistencyDistillation(mixture, ConsistencyDenoiser(small_mlp(), 1.4).double(), CDConfig())
    errors = []
    for gap in (0.2, 0.1, 0.05):
        s, s_next = torch.full((256,), 3.0, dtype=DT), torch.full((256,), 3.0 - gap, dtype=DT)
        fine = sample(mixture, x / 3.0, "heun", torch.linspace(3.0, 3.0 - gap, 201, dtype=DT))
        errors.append(float((cd.teacher_step(x, s, s_next, None) - fine).norm(dim=1).mean()))
    assert errors[0] / errors[1] > 6 and errors[1] / errors[2] > 6


def test_cd_target_network_is_an_ema_of_the_student():
    cd = ConsistencyDistillation(ring_mixture(), ConsistencyDenoiser(small_mlp(), 1.4), CDConfig(target_ema=0.9))
    before = [p.detach().clone() for p in cd.target.parameters()]
    with torch.no_grad():
        for p in cd.student.parameters():
            p.add_(1.0)
    cd.after_update("student", 0)
    for p_target, p_before, p in zip(cd.target.parameters(), before, cd.student.parameters(), strict=True):
        assert torch.allclose(p_target, 0.9 * p_before + 0.1 * p)
    assert not any(p.requires_grad for p in cd.target.parameters())


def test_cd_loss_vanishes_for_the_exact_consistency_function_on_a_single_gaussian():
    """For data N(0, v) the ODE x_s / sqrt(v + s^2) is constant, so f(x, s) = x sqrt(v + smin^2)/sqrt(v + s^2)
    is the exact consistency function; with it as student and target the CD loss is ~0 (Heun error only)."""
    from fewstep.models.analytic import GaussianMixture

    v = 0.5
    gaussian = GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.full((1,), v))

    class ExactConsistency(Denoiser):
        data_shape = (2,)

        def forward(self, x, s, label=None):
            return x * math.sqrt(v + 0.002**2) / torch.sqrt(v + s**2)[:, None]

    cd = ConsistencyDistillation(gaussian, ExactConsistency(), CDConfig(num_scales=40, distance="l2"))
    x0 = gaussian.sample(512, torch.Generator().manual_seed(1))
    exact_loss = float(cd.losses("student", Batch(x0=x0), 0, torch.Generator().manual_seed(2))["loss"])
    other_teacher = GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.full((1,), 2 * v))
    cd_wrong = ConsistencyDistillation(other_teacher, ExactConsistency(), CDConfig(num_scales=40, distance="l2"))
    wrong_loss = float(cd_wrong.losses("student", Batch(x0=x0), 0, torch.Generator().manual_seed(2))["loss"])
    assert exact_loss < 1e-6  # only the Heun step's discretisation error remains
    assert exact_loss < wrong_loss / 100, (exact_loss, wrong_loss)


def test_multistep_levels():
    assert multistep_sigmas(1, 80.0, 0.1) == [80.0]
    levels = multistep_sigmas(3, 80.0, 0.2)
    assert levels[0] == 80.0 and math.isclose(levels[-1], 0.2) and math.isclose(levels[1] ** 2, 80.0 * 0.2)


def test_pd_target_makes_one_ddim_step_land_on_two_teacher_steps():
    mixture = ring_mixture()
    pd = ProgressiveDistillation(mixture, EDMDenoiser(small_mlp(), 1.4), PDConfig(start_steps=8, final_steps=2))
    fine = pd.grid(8).to(DT)
    x = torch.randn(64, 2, dtype=DT, generator=torch.Generator().manual_seed(3)) * fine[2]
    s, s_mid, s_next = (torch.full((64,), float(fine[i]), dtype=DT) for i in (2, 3, 4))
    target = pd.two_step_target(x, s, s_mid, s_next, None)
    one_student_step = target + (s_next / s)[:, None] * (x - target)
    two_teacher_steps = sample(mixture, x / fine[2], "euler", fine[2:5])
    assert torch.allclose(one_student_step, two_teacher_steps, atol=1e-10)


def test_pd_target_is_the_teacher_x0_when_the_teacher_is_constant():
    """A teacher that always predicts c makes DDIM exact, so a student predicting c has zero loss."""

    class Constant(Denoiser):
        data_shape, sigma_data = (2,), 1.0

        def forward(self, x, s, label=None):
            return torch.tensor([0.3, -0.7], dtype=x.dtype).expand_as(x)

    pd = ProgressiveDistillation(Constant(), Constant(), PDConfig(start_steps=8, final_steps=2))
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    assert float(pd.losses("student", Batch(x0=x0), 0, torch.Generator().manual_seed(5))["loss"]) < 1e-10
    pd.student = EDMDenoiser(small_mlp(), 1.0)
    assert float(pd.losses("student", Batch(x0=x0), 0, torch.Generator().manual_seed(5))["loss"].detach()) > 1e-3


def test_pd_rounds_halve_the_grid_reset_the_optimizer_and_stop_at_final_steps():
    pd = ProgressiveDistillation(ring_mixture(), EDMDenoiser(small_mlp(), 1.4),
                                 PDConfig(start_steps=16, final_steps=4, steps_per_round=3))
    assert pd.rounds == 2 and pd.student_steps == 8
    assert torch.equal(pd.grid(8), pd.grid(16)[::2]) and pd.grid(4).shape[0] == 5 and pd.grid(4)[-1] == 0
    resets = [pd.after_update("student", step) for step in range(10)]
    assert resets == [False, False, True, False, False, False, False, False, False, False]
    assert pd.student_steps == 4
    state = pd.state_dict()
    fresh = ProgressiveDistillation(ring_mixture(), EDMDenoiser(small_mlp(), 1.4),
                                    PDConfig(start_steps=16, final_steps=4, steps_per_round=3))
    fresh.load_state_dict(state)
    assert fresh.student_steps == 4 and fresh.round_teacher is fresh.previous_student
    with pytest.raises(ValueError, match="power of two"):
        ProgressiveDistillation(ring_mixture(), EDMDenoiser(small_mlp(), 1.4), PDConfig(start_steps=12,
                                                                                          final_steps=4))


def test_registry_lists_name_family_paper_and_needs():
    for name, cls in METHODS.items():
        assert cls.name == name and cls.family and cls.paper and cls.needs and cls.needs <= set(NEEDS)


# ------------------------------------------------------------------------------------ exact teacher

class CDWithFlippedStep(ConsistencyDistillation):
    """A broken CD: the teacher step goes the wrong way (sign flipped in the target)."""

    def teacher_step(self, x, s, s_next, cond):
        return 2 * x - super().teacher_step(x, s, s_next, cond)


@pytest.fixture(scope="module")
def cd_student():
    return distil_on_ring(ConsistencyDistillation, CDConfig(), steps=1500)


def test_cd_on_the_exact_ring_beats_every_training_free_solver_at_two_steps(cd_student):
    ok, m = passes_issue_bar(draw(*cd_student, 2))
    assert ok, (m, best_training_free_excess_nll(2))


def test_metrics_catch_a_cd_with_a_flipped_target():
    method, student = distil_on_ring(CDWithFlippedStep, CDConfig(), steps=1500)
    ok, m = passes_issue_bar(draw(method, student, 2))
    assert not ok, m


class PDWithoutTargetInversion(ProgressiveDistillation):
    """A broken PD: regresses the denoiser onto the teacher's two-step *state* instead of inverting the step."""

    def two_step_target(self, x, s, s_mid, s_next, cond):
        return self.teacher_step(self.teacher_step(x, s, s_mid, cond), s_mid, s_next, cond)


def pd_gap_to_its_teacher(method_cls) -> tuple[float, float]:
    """Distance of the 4-step PD student from the teacher's own 16-step DDIM (what it distils), and the same
    distance for the teacher's 4-step DDIM (the training-free baseline)."""
    config = PDConfig(start_steps=16, final_steps=4, steps_per_round=600)
    method, student = distil_on_ring(method_cls, config, steps=1500)
    target = sample(RING.analytic, NOISE.double(), "euler", append_zero(karras_sigmas(16)).double()).float()
    pd4 = draw(method, student, 4)
    euler4 = sample(RING.analytic, NOISE.double(), "euler", append_zero(karras_sigmas(4)).double()).float()
    return float((pd4 - target).norm(dim=1).mean()), float((euler4 - target).norm(dim=1).mean())


def test_pd_on_the_exact_ring_reproduces_its_teachers_sixteen_step_sampler_in_four():
    student_gap, euler_gap = pd_gap_to_its_teacher(ProgressiveDistillation)
    assert student_gap < 0.5 * euler_gap, (student_gap, euler_gap)


def test_pd_exact_teacher_check_fails_when_the_target_is_wrong():
    student_gap, euler_gap = pd_gap_to_its_teacher(PDWithoutTargetInversion)
    assert student_gap >= 0.5 * euler_gap, (student_gap, euler_gap)


def test_exact_flow_map_error_of_the_cd_student_is_small_at_one_step(cd_student):
    one_step = draw(*cd_student, 1)
    euler_one = sample(RING.analytic, NOISE, "euler", solver_sigmas("euler", 1))
    assert flow_map_error(one_step) < 0.25 * flow_map_error(euler_one)
