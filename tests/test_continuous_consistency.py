"""sCT / sCD on TrigFlow: the TrigFlow form of students and teachers, the continuous-time gradient against
discrete consistency distillation, and exact-teacher tests on the analytic 8-mode ring."""

import dataclasses
import itertools
import math

import pytest
import torch

from exact_ring import (
    NOISE,
    RING,
    best_training_free_excess_nll,
    distil_on_ring,
    draw,
    draw_with_chosen_levels,
    flow_map_error,
    low_frequency_mlp,
    passes_issue_bar,
    small_mlp,
)
from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.methods import METHODS
from fewstep.methods.consistency.consistency_distillation import CDConfig, ConsistencyDistillation
from fewstep.methods.consistency.continuous_consistency import (
    SCD,
    SCT,
    SCMConfig,
    trigflow_consistency,
    trigflow_output,
    trigflow_velocity,
)
from fewstep.models.analytic import GaussianMixture, ring_mixture
from fewstep.models.denoiser import ConsistencyDenoiser, EDMDenoiser, PathDenoiser, velocity_on_path
from fewstep.nets import MLP
from fewstep.paths import RectifiedFlow, TrigFlow
from fewstep.solvers import karras_sigmas, sample
from test_paths import ExactNetOnPath

DT = torch.float64
SD = RING.sigma_data


def double_student(sigma_data: float = SD) -> EDMDenoiser:
    torch.manual_seed(0)
    return EDMDenoiser(MLP((2,), width=32, depth=2).double(), sigma_data)


def trig_state(n: int, t: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    times = torch.full((n,), t, dtype=DT)
    x0 = RING.analytic.sample(n, g).to(DT)
    return torch.cos(times)[:, None] * x0 + torch.sin(times)[:, None] * SD * torch.randn(n, 2, generator=g,
                                                                                          dtype=DT), times


def rk4(velocity, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Classical Runge-Kutta along the scalar ``times``; ``velocity(x, t)`` takes per-sample ``t``."""
    for a, b in itertools.pairwise(times):
        h, mid = float(b - a), (0.5 * (a + b)).expand(x.shape[0])
        k1 = velocity(x, a.expand(x.shape[0]))
        k2 = velocity(x + 0.5 * h * k1, mid)
        k3 = velocity(x + 0.5 * h * k2, mid)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + velocity(x + h * k3, b.expand(x.shape[0])))
    return x


# ----------------------------------------------------------------------------------------------- math


def test_trigflow_student_is_the_edm_denoiser_with_negated_output():
    student = double_student()
    x_t, _ = trig_state(64, 0.5)
    t = torch.linspace(0.01, 1.56, 64, dtype=DT)
    s = SD * torch.tan(t)
    f = trigflow_consistency(student, x_t, t)
    assert torch.allclose(f, student(x_t / torch.cos(t)[:, None], s), atol=1e-12)
    edm_output = student.backbone(x_t / SD, 0.25 * torch.log(s))
    assert torch.equal(trigflow_output(student, x_t, t), -edm_output)
    # the teacher's TrigFlow velocity of an EDM network is sigma_d F: the student starts as the teacher exactly
    assert torch.allclose(trigflow_velocity(student, x_t, t, SD), SD * trigflow_output(student, x_t, t), atol=1e-10)


def test_trigflow_time_round_trip_and_rectified_flow_teacher_endpoint():
    trig = TrigFlow(SD)
    s = karras_sigmas(40, 1e-3, 60.0)
    t = trig.t_from_ve_sigma(s)
    assert torch.allclose(SD * torch.tan(t), s, rtol=1e-12)
    assert torch.allclose(trig.t_from_ve_sigma(trig.ve_sigma(t)), t)

    rf = RectifiedFlow()
    teacher = PathDenoiser(ExactNetOnPath(ring_mixture(), rf, "velocity"), rf, "velocity")
    noise = torch.randn(128, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    levels = karras_sigmas(120, 1e-3, 60.0)

    t_trig, t_rf = trig.t_from_ve_sigma(levels), rf.t_from_ve_sigma(levels)
    x_trig = rk4(lambda x, t: trigflow_velocity(teacher, x, t, SD), torch.cos(t_trig[0]) * levels[0] * noise, t_trig)
    x_rf = rk4(lambda x, t: velocity_on_path(teacher, x, t, rf), (1 - t_rf[0]) * levels[0] * noise, t_rf)
    end_trig, end_rf = x_trig / torch.cos(t_trig[-1]), x_rf / (1 - t_rf[-1])
    assert torch.allclose(end_trig, end_rf, atol=1e-6)
    assert float((end_trig - noise * levels[0]).norm(dim=1).mean()) > 1.0  # it moved


def parameter_gradient(loss: torch.Tensor, student: EDMDenoiser) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(student.parameters()))])


def gradient_gap_to_discrete_cd(velocity_scale: float, dts=(1e-2, 1e-3, 1e-4)) -> list[float]:
    """Relative distance between the sCD gradient (raw tangent, r = 1) times ``sigma_d tan(t) / 2`` and the
    gradient of discrete CD, ``|f(x_t, t) - sg f(x_{t-dt}, t-dt)|^2 / (2 dt)`` with an exact teacher step."""
    student, teacher = double_student(), RING.analytic
    method = SCD(teacher, student, SCMConfig(jvp="forward"))
    x_t, t = trig_state(64, 0.9)
    dxdt = velocity_scale * trigflow_velocity(teacher, x_t, t, SD)
    f_minus, g = method.tangent(x_t, t, dxdt, None, ramp=1.0)
    scm = parameter_gradient((trigflow_output(student, x_t, t) - f_minus - g).pow(2).sum(1).mean(), student)
    gaps = []
    for dt in dts:
        with torch.no_grad():
            x_next = rk4(lambda x, time: trigflow_velocity(teacher, x, time, SD), x_t,
                         torch.linspace(0.9, 0.9 - dt, 11, dtype=DT))
            target = trigflow_consistency(student, x_next, t - dt)
        cd = parameter_gradient(0.5 * (trigflow_consistency(student, x_t, t) - target).pow(2).sum(1).mean() / dt,
                                student)
        gaps.append(float((cd - SD * math.tan(0.9) / 2 * scm).norm() / cd.norm()))
    return gaps


def test_scd_gradient_approaches_the_discrete_cd_gradient_as_dt_goes_to_zero():
    gaps = gradient_gap_to_discrete_cd(1.0)
    assert gaps[0] < 2e-2 and gaps[1] < gaps[0] / 5 and gaps[2] < gaps[1] / 5 and gaps[2] < 1e-4, gaps


def test_scd_gradient_with_a_perturbed_teacher_velocity_does_not():
    gaps = gradient_gap_to_discrete_cd(1.5)
    assert gaps[2] > 1e-2 and gaps[2] > gaps[1] / 2, gaps  # a gap that does not close


def test_tangent_vanishes_for_the_exact_consistency_function_of_a_gaussian():
    """For data N(0, v I) the TrigFlow ODE keeps x_t / sqrt(v cos^2 t + sd^2 sin^2 t) constant, so
    f = sqrt(v) x_t / sqrt(v cos^2 t + sd^2 sin^2 t) is the exact consistency function: its g is 0."""
    v = 0.3

    class ExactF(torch.nn.Module):
        data_shape, num_classes = (2,), 0

        def forward(self, u, c_noise, label=None, extra=None):
            t = torch.atan(torch.exp(4 * c_noise) / SD)[:, None]
            x_t = SD * u
            f = math.sqrt(v) * x_t / torch.sqrt(v * torch.cos(t) ** 2 + SD**2 * torch.sin(t) ** 2)
            return -(torch.cos(t) * x_t - f) / (SD * torch.sin(t))

    student = EDMDenoiser(ExactF(), SD)
    x_t, t = trig_state(32, 0.7)
    t = torch.linspace(0.05, 1.5, 32, dtype=DT)
    for variance, bound in ((v, (0.0, 1e-6)), (2 * v, (1e-2, math.inf))):
        teacher = GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.full((1,), variance))
        method = SCD(teacher, student, SCMConfig(jvp="forward"))
        _, g = method.tangent(x_t, t, trigflow_velocity(teacher, x_t, t, SD), None, ramp=1.0)
        assert bound[0] < float(g.abs().max()) < bound[1], float(g.abs().max())  # cancellation error near t = 0


def test_sct_uses_the_conditional_velocity_and_no_teacher():
    method = SCT(RING.analytic, double_student(), SCMConfig())
    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(8, 2, generator=g, dtype=DT), torch.randn(8, 2, generator=g, dtype=DT)
    t, h = torch.full((8,), 0.4, dtype=DT), 1e-6

    def x_at(time):
        return torch.cos(time)[:, None] * x0 + torch.sin(time)[:, None] * z

    numeric = (x_at(t + h) - x_at(t - h)) / (2 * h)
    assert torch.allclose(method.velocity(x0, z, x_at(t), t, None), numeric, atol=1e-8)
    method.losses("student", Batch(x0=x0), 0, torch.Generator().manual_seed(1))
    assert method.teacher_evals == 0
    scd = SCD(RING.analytic, double_student(), SCMConfig())
    scd.losses("student", Batch(x0=x0), 0, torch.Generator().manual_seed(1))
    assert scd.teacher_evals == 8


def test_warmup_ramp_drops_the_jvp_term_and_the_loss_trains_the_log_variance_head():
    method = SCD(RING.analytic, double_student(), SCMConfig(jvp="forward", tangent_warmup=10))
    x_t, t = trig_state(16, 0.8)
    dxdt = trigflow_velocity(RING.analytic, x_t, t, SD)
    f_minus, g = method.tangent(x_t, t, dxdt, None, ramp=0.0)
    assert torch.allclose(g, -torch.cos(t)[:, None] ** 2 * (SD * f_minus - dxdt))
    assert not torch.allclose(method.tangent(x_t, t, dxdt, None, ramp=1.0)[1], g)
    head = list(method.logvar.parameters())
    assert {id(p) for p in method.phases()[0].parameters} >= {id(p) for p in head}
    method.double()
    loss = method.losses("student", Batch(x0=RING.train_x[:32].double()), 5, torch.Generator().manual_seed(0))
    loss["loss"].backward()
    assert head[-1].grad is not None and float(head[-1].grad.abs().sum()) > 0


def test_sampling_levels_and_one_step_is_the_consistency_function():
    method = SCD(RING.analytic, double_student(), SCMConfig(sigma_max=80.0, sampling_t_mid=1.1))
    assert method.sampling(1).sigmas == [80.0]
    assert method.sampling(2).sigmas == [80.0, pytest.approx(SD * math.tan(1.1))]
    levels = method.sampling(4).sigmas
    assert len(levels) == 4 and levels[-1] == pytest.approx(SD * math.tan(1.1 / 3))
    noise = torch.randn(16, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    one = sample(method.student, noise, "consistency", torch.tensor([80.0]))
    t_max = torch.full((16,), math.atan(80.0 / SD), dtype=DT)
    assert torch.allclose(one, trigflow_consistency(method.student, torch.cos(t_max)[:, None] * 80.0 * noise, t_max))
    with pytest.raises(ConfigError, match="nfe"):
        method.sampling(0)


def test_bad_configs_are_refused_and_methods_are_registered():
    assert METHODS["sct"] is SCT and METHODS["scd"] is SCD
    with pytest.raises(ConfigError, match="jvp"):
        SCD(RING.analytic, double_student(), SCMConfig(jvp="backward"))
    with pytest.raises(ConfigError, match="EDMDenoiser"):
        SCD(RING.analytic, ConsistencyDenoiser(MLP((2,), width=8, depth=1), SD), SCMConfig())
    with pytest.raises(ConfigError, match="sampling_t_mid"):
        SCT(RING.analytic, double_student(), SCMConfig(sampling_t_mid=2.0))


# ------------------------------------------------------------------------------------ exact teacher
# Status: with 3000 steps (P_mean -0.5, P_std 1.6, tangent_warmup 300) sCD passes the 2-NFE bar (8/8 modes; 1000-1500
# steps failed or passed only borderline). sCT passes it with its second level chosen on the training split (8/8,
# 9.4, 1.29; 6/8 modes at the default level), and the reversed-velocity control fails it. The sCD student is the
# ring8-scd recipe's: time features at most 20 rad per unit of c_noise (sCM's "no large Fourier scales"; with the
# default features, up to 100, its high-noise fit oscillates) and tangent normalisation with c = 0.01 (on the ring
# |g| is about 0.3, so the paper's c = 0.1 only half-normalises it). Its 1-NFE flow-map error is then 0.079 / 0.106 /
# 0.088 over seeds 0 / 1 / 2, against CD's 0.076 / 0.075 / 0.080 at equal steps, so that check is a strict xfail: it
# reports the short-budget ordering and fails the run once it flips. Trained long (48,000 steps) sCD is lower.
# These trainings exceed the fast budget: --runslow only.
RING_CONFIG = SCMConfig(p_mean=-0.5, p_std=1.6, tangent_warmup=300, jvp="finite_difference")
SCD_RING_CONFIG = dataclasses.replace(RING_CONFIG, tangent_norm_c=0.01)
RING_STEPS = 3000
LONG_STEPS = 48_000


class SCDWithReversedTeacher(SCD):
    """A broken sCD: the teacher's velocity with the wrong sign (integrating the PF-ODE backwards)."""

    def velocity(self, x0, z, x_t, t, label):
        return -super().velocity(x0, z, x_t, t, label)


def learns_the_teachers_map(method_cls) -> tuple[bool, dict]:
    """The fast partial check (1500 steps): 8/8 modes at 2 NFE and >= 3x lower excess NLL than the best
    training-free solver. The within-mode spread is not required here: at 1500 steps sCD's is 1.45 (above the
    full bar's 1.3, which the slow tests check at 3000 steps)."""
    method, student = distil_on_ring(method_cls, RING_CONFIG, steps=1500)
    _, m = passes_issue_bar(draw(method, student, 2))
    return m["modes_covered"] == 8 and 3 * m["excess_nll"] <= best_training_free_excess_nll(2), m


def test_scd_learns_the_exact_teachers_map_and_a_reversed_teacher_does_not():
    ok, m = learns_the_teachers_map(SCD)
    assert ok, m
    ok, m = learns_the_teachers_map(SCDWithReversedTeacher)
    assert not ok, m


@pytest.fixture(scope="module")
def scd_student():
    return distil_on_ring(SCD, SCD_RING_CONFIG, steps=RING_STEPS, backbone=low_frequency_mlp)


@pytest.mark.slow
def test_scd_on_the_exact_ring_passes_the_bar_at_two_steps(scd_student):
    ok, m = passes_issue_bar(draw(*scd_student, 2))
    assert ok, m


@pytest.mark.slow
def test_sct_on_the_ring_data_passes_the_bar_at_two_steps_with_levels_chosen_on_the_training_split():
    """At the default second level (TrigFlow time 1.1: sigma 2.79) sCT covers 6/8 modes; at the level chosen
    on the training split (0.64 in a scratch run) it passed with 8/8, excess NLL 9.4 and spread 1.29."""
    ok, m = passes_issue_bar(draw_with_chosen_levels(*distil_on_ring(SCT, RING_CONFIG, steps=RING_STEPS), 2))
    assert ok, m


class SCTWithReversedVelocity(SCT):
    """A broken sCT: the conditional velocity with the wrong sign."""

    def velocity(self, x0, z, x_t, t, label):
        return -super().velocity(x0, z, x_t, t, label)


@pytest.mark.slow
def test_chosen_levels_do_not_rescue_an_sct_with_a_reversed_velocity():
    method, student = distil_on_ring(SCTWithReversedVelocity, RING_CONFIG, steps=RING_STEPS)
    ok, m = passes_issue_bar(draw_with_chosen_levels(method, student, 2))
    assert not ok, m


@pytest.mark.slow
def test_metrics_catch_an_scd_with_a_reversed_teacher():
    reversed_teacher = distil_on_ring(SCDWithReversedTeacher, SCD_RING_CONFIG, steps=RING_STEPS,
                                      backbone=low_frequency_mlp)
    ok, m = passes_issue_bar(draw(*reversed_teacher, 2))
    assert not ok, m


@pytest.mark.slow
def test_low_time_frequencies_cut_scds_one_step_flow_map_error(scd_student):
    """sCM's stability fix, measured: the same training with the default time features (up to 100 rad per unit of
    c_noise) leaves a one-step flow-map error of 0.42 (0.50 with c = 0.1); the recipe's (up to 20) 0.08."""
    default = distil_on_ring(SCD, SCD_RING_CONFIG, steps=RING_STEPS)
    assert flow_map_error(draw(*scd_student, 1)) < 0.5 * flow_map_error(draw(*default, 1))


@pytest.mark.slow
def test_a_tangent_normalisation_constant_near_the_tangents_norm_slows_scd(scd_student):
    """``g / (|g| + c)`` with ``c`` near or above ``|g|`` (about 0.3 on the ring) shrinks every update: with c = 1 the
    one-step flow-map error at 3000 steps is 0.35 against the recipe's (c = 0.01) 0.08."""
    damped = distil_on_ring(SCD, dataclasses.replace(SCD_RING_CONFIG, tangent_norm_c=1.0), steps=RING_STEPS,
                            backbone=low_frequency_mlp)
    assert flow_map_error(draw(*scd_student, 1)) < 0.5 * flow_map_error(draw(*damped, 1))


def one_step_errors(method_cls, config, steps: int, backbone, lr_schedule: str = "constant",
                    seeds: tuple[int, ...] = (0, 1, 2)) -> list[float]:
    """One-step flow-map errors over ``seeds`` (student initialisation and training); by default seeds 0-2, so
    that one lucky seed cannot pass a comparison of their means."""
    return [flow_map_error(draw(*distil_on_ring(method_cls, config, steps, backbone=backbone, seed=seed,
                                                lr_schedule=lr_schedule), 1)) for seed in seeds]


@pytest.mark.slow
def test_scd_with_an_annealed_rate_has_a_lower_one_step_flow_map_error_than_cd_at_equal_teacher_evaluations():
    """The ring8-scd recipe (6000 steps, cosine learning rate) against CD's recipe settings at the same teacher
    evaluations (3000 steps: CD makes two teacher calls per sample and step, sCD one). Runs of this harness gave
    0.051 / 0.064 / 0.074 against 0.076 / 0.075 / 0.080; at a constant rate sCD stays near 0.1 (mean 0.091 at
    3000 steps; 0.103 at 12,000, seed 0), above CD's mean."""
    scd_errors = one_step_errors(SCD, SCD_RING_CONFIG, 2 * RING_STEPS, low_frequency_mlp, lr_schedule="cosine")
    cd_errors = one_step_errors(ConsistencyDistillation, CDConfig(), RING_STEPS, small_mlp)
    assert sum(scd_errors) < sum(cd_errors), (scd_errors, cd_errors)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 3's bar at a short budget: over seeds 0-2 sCD's one-step flow-map error "
                   "at 3000 steps is 0.079 / 0.106 / 0.088 against CD's 0.076 / 0.075 / 0.080 (with both rates "
                   "annealed, 0.089 / 0.096 / 0.101 against 0.085 / 0.085 / 0.077); at 48,000 steps sCD is lower "
                   "(the slow test below; docs/consistency.md, where we differ)")
def test_scd_one_step_flow_map_error_is_below_discrete_cds_at_equal_steps():
    scd_errors = one_step_errors(SCD, SCD_RING_CONFIG, RING_STEPS, low_frequency_mlp)
    cd_errors = one_step_errors(ConsistencyDistillation, CDConfig(), RING_STEPS, small_mlp)
    assert sum(scd_errors) < sum(cd_errors), (scd_errors, cd_errors)


def cd_fixed_point_error(config: CDConfig) -> float:
    """One-step flow-map error of the map CD trains towards: the exact teacher's Heun hops between consecutive
    levels of CD's grid (and ``f(x, sigma_min) = x`` at its end). sCD's target is the exact map itself."""
    grid = karras_sigmas(config.num_scales, config.sigma_min, config.sigma_max, config.rho)
    return flow_map_error(sample(RING.analytic, NOISE.double(), "heun", grid).float())


def test_cds_target_carries_the_heun_grids_discretisation_error():
    """CD's fixed point on its default 18-level grid is 0.021 from the exact flow map (docs/consistency.md);
    halving every interval cuts that about fourfold (Heun is second order), so the floor is the grid's, not the
    teacher's."""
    floor, finer = cd_fixed_point_error(CDConfig()), cd_fixed_point_error(CDConfig(num_scales=35))
    assert 0.015 < floor < 0.03, floor
    assert finer < floor / 3, (floor, finer)


@pytest.mark.slow
def test_trained_long_scd_has_a_lower_one_step_flow_map_error_than_cd_at_equal_steps():
    """Issue 3's bar at equal steps, trained long: 48,000 steps, both rates annealed, seed 0 (about 12 + 9 min on
    one thread). Runs of this harness over seeds 0 / 1 / 2: sCD 0.0187 / 0.0196 / 0.0243 against CD 0.0254 /
    0.0266 / 0.0258 (seed 0 at 24,000 steps: 0.0267 against 0.0274; at 3000 steps CD leads, the strict xfail
    above). CD converges to its grid's Heun map, 0.021 from the exact one; sCD's target has no such floor."""
    (scd_error,) = one_step_errors(SCD, SCD_RING_CONFIG, LONG_STEPS, low_frequency_mlp, "cosine", seeds=(0,))
    (cd_error,) = one_step_errors(ConsistencyDistillation, CDConfig(), LONG_STEPS, small_mlp, "cosine", seeds=(0,))
    assert scd_error < cd_error, (scd_error, cd_error)
