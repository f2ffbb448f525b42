"""Teacher-free consistency methods (CT, iCT, ECT): unit tests of their math, and exact-teacher tests on the
8-mode ring that fail when a method's target is wrong."""

import math

import pytest
import torch

from exact_ring import RING, distil_on_ring, draw, passes_issue_bar, small_mlp
from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.methods import METHODS
from fewstep.methods.consistency.consistency_training import (
    ConsistencyTraining,
    CTConfig,
    ct_num_scales,
    ct_target_ema,
    online_and_target,
)
from fewstep.methods.consistency.easy_consistency_tuning import EasyConsistencyTuning, ECTConfig, ect_r
from fewstep.methods.consistency.improved_consistency_training import (
    ICTConfig,
    ImprovedConsistencyTraining,
    ict_num_scales,
    lognormal_interval_probabilities,
)
from fewstep.models.analytic import GaussianMixture
from fewstep.models.denoiser import ConsistencyDenoiser, Denoiser
from fewstep.nets import MLP
from fewstep.train.teacher import TeacherConfig, TeacherTraining

TEACHER_FREE = (ConsistencyTraining, ImprovedConsistencyTraining, EasyConsistencyTuning)


class ForbiddenTeacher(Denoiser):
    """A teacher that must never be called: teacher-free methods use data only."""

    data_shape = (2,)

    def forward(self, x, s, label=None):
        raise AssertionError("a teacher-free method evaluated the teacher")


# ----------------------------------------------------------------------------------------------- math


@pytest.mark.parametrize("method_cls", TEACHER_FREE)
def test_students_satisfy_the_boundary_condition_and_never_call_a_teacher(method_cls):
    config = method_cls.Config()
    student = method_cls.build_student(RING.analytic, config, small_mlp, RING.sigma_data)
    assert isinstance(student, ConsistencyDenoiser)
    x = torch.randn(64, 2)
    assert torch.equal(student(x, torch.full((64,), config.sigma_min)), x)
    method = method_cls(ForbiddenTeacher(), student, config)
    losses = method.losses("student", Batch(x0=RING.train_x[:64]), 0, torch.Generator().manual_seed(0))
    losses["loss"].backward()
    assert method.teacher_evals == 0 and method.needs == {"data"} and METHODS[method.name] is method_cls
    assert all(p.grad is not None for p in student.parameters())


def test_ct_pair_is_the_exact_euler_step_in_expectation_for_a_gaussian():
    """For x0 ~ N(0, v), E[x_lo | x_hi] is linear in x_hi; its slope must be the Euler step of the PF-ODE
    dx/ds = (x - D(x, s)) / s with the exact denoiser D = v x / (v + s^2). Independent noise would give
    v / (v + s^2) instead."""
    v, n = 0.7, 400_000
    ct = ConsistencyTraining(ForbiddenTeacher(), ConsistencyDenoiser(small_mlp(), 1.0), CTConfig())
    gaussian = GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.full((1,), v))
    x0 = gaussian.sample(n, torch.Generator().manual_seed(0)).double()
    for s_hi, s_lo in ((2.0, 1.5), (0.5, 0.2)):
        x_hi, x_lo = ct.noisy_pair(x0, torch.full((n,), s_hi, dtype=x0.dtype), torch.full((n,), s_lo, dtype=x0.dtype),
                                   torch.Generator().manual_seed(1))
        slope = float((x_lo * x_hi).sum() / (x_hi * x_hi).sum())
        euler_slope = 1 + (s_lo - s_hi) * (1 - v / (v + s_hi**2)) / s_hi
        assert abs(slope - euler_slope) < 0.01, (slope, euler_slope)
        assert abs(euler_slope - v / (v + s_hi**2)) > 0.1  # what a pair with independent noise would give
        assert torch.allclose(x_hi - x0, (x_lo - x0) * s_hi / s_lo)  # one shared eps


def test_ct_curricula_endpoints_and_target_ema():
    assert ct_num_scales(0, 1000, 2, 150) == 2 and ct_num_scales(1000, 1000, 2, 150) == 151
    assert ct_num_scales(5000, 1000, 2, 150) == 151
    sizes = [ct_num_scales(k, 1000, 2, 150) for k in range(0, 1001, 50)]
    assert sizes == sorted(sizes) and len(set(sizes)) > 10
    assert math.isclose(ct_target_ema(2, 2, 0.9), 0.9) and ct_target_ema(151, 2, 0.9) > 0.998
    ct = ConsistencyTraining(ForbiddenTeacher(), ConsistencyDenoiser(small_mlp(), 1.4),
                             CTConfig(total_steps=100, start_target_ema=0.8))
    before = [p.detach().clone() for p in ct.target.parameters()]
    with torch.no_grad():
        for p in ct.student.parameters():
            p.add_(1.0)
    ct.after_update("student", 0)  # N(0) = s0, so mu = mu0
    for p_target, p_before, p in zip(ct.target.parameters(), before, ct.student.parameters(), strict=True):
        assert torch.allclose(p_target, 0.8 * p_before + 0.2 * p)
    assert not any(p.requires_grad for p in ct.target.parameters())


def test_ict_curriculum_doubles_from_s0_to_s1_in_equal_stages():
    k = 400_000  # the paper's run: 8 stages of 50k updates
    assert ict_num_scales(0, k, 10, 1280) == 11 and ict_num_scales(49_999, k, 10, 1280) == 11
    assert ict_num_scales(50_000, k, 10, 1280) == 21 and ict_num_scales(349_999, k, 10, 1280) == 641
    assert ict_num_scales(350_000, k, 10, 1280) == 1281 and ict_num_scales(k - 1, k, 10, 1280) == 1281
    assert ict_num_scales(10 * k, k, 10, 1280) == 1281
    assert [ict_num_scales(s, 800, 10, 80) for s in (0, 199, 200, 400, 600, 799)] == [11, 11, 21, 41, 81, 81]


def test_ict_draws_noise_levels_from_the_discretised_lognormal():
    """On a fine grid, the drawn levels' log must follow N(-1.1, 2^2) truncated to [s_min, s_max]."""
    ict = ImprovedConsistencyTraining(ForbiddenTeacher(), ConsistencyDenoiser(small_mlp(), 1.0),
                                      ICTConfig(total_steps=8, start_scales=1280))
    grid = ict.grid(0).double()
    assert grid.shape[0] == 1281
    probabilities = lognormal_interval_probabilities(grid, -1.1, 2.0)
    assert torch.isclose(probabilities.sum(), torch.tensor(1.0, dtype=grid.dtype)) and (probabilities > 0).all()
    index = ict.sample_intervals(grid, 50_000, torch.Generator().manual_seed(0))
    log_s = torch.log(grid[index])
    normal = torch.distributions.Normal(-1.1, 2.0)
    lo, hi = normal.cdf(torch.tensor(math.log(0.002))), normal.cdf(torch.tensor(math.log(80.0)))
    for q in (-5.0, -3.0, -1.1, 0.0, 2.0, 4.0):
        expected = float((normal.cdf(torch.tensor(q)) - lo) / (hi - lo))
        assert abs(float((log_s <= q).double().mean()) - expected) < 0.015, q
    uniform = torch.log(grid[torch.randint(0, 1280, (50_000,))])
    assert abs(float((uniform <= -1.1).double().mean()) - 0.5) > 0.1  # the check can tell the difference


class Drift(Denoiser):
    """``f(x, s) = 0.3 s``: the distance between two passes is ``0.3 |s_hi - s_lo| sqrt(dim)``."""

    data_shape, sigma_data = (2,), 0.5

    def forward(self, x, s, cond=None):
        return torch.zeros_like(x) + 0.3 * s[:, None]


def test_ict_loss_weights_the_distance_by_the_inverse_gap():
    """With :class:`Drift` the pseudo-Huber distance between the two passes is ~ 0.3 |s_hi - s_lo| sqrt(dim), so
    the weighted loss is ~ 0.3 sqrt(dim) whatever the intervals drawn."""
    ict = ImprovedConsistencyTraining(ForbiddenTeacher(), Drift(), ICTConfig(total_steps=10, start_scales=40,
                                                                           huber_c=0.0))
    loss = ict.losses("student", Batch(x0=torch.randn(256, 2)), 0, torch.Generator().manual_seed(0))["loss"]
    assert math.isclose(float(loss), 0.3 * math.sqrt(2), rel_tol=1e-4)


def test_ect_gap_shrinks_by_q_per_stage_to_zero_and_stage_zero_is_denoising():
    t = torch.exp(torch.linspace(-6, 4.3, 200, dtype=torch.float64))
    assert torch.equal(ect_r(t, 0), torch.zeros_like(t))  # dt = t n(t) >= t: r = 0 everywhere
    gaps = [t - ect_r(t, stage) for stage in range(1, 30)]
    assert all(((g > 0) & (g <= t)).all() for g in gaps)
    for stage in range(4, 29):  # once r > 0 for every t, dt halves each stage (q = 2)
        assert torch.allclose(gaps[stage] / gaps[stage - 1], torch.full_like(t, 0.5))
    assert float((gaps[-1] / t).max()) < 1e-7
    assert torch.allclose(ect_r(torch.tensor([100.0]), 1), torch.tensor([50.0]), atol=1e-6)  # n(t) -> 1
    assert torch.equal(ect_r(t, 5000), t)  # a run of thousands of stages: the gap vanishes, no overflow


@pytest.mark.parametrize("stage", [0, 1, 2, 6])
def test_ect_inverse_gap_weighting_makes_the_loss_independent_of_the_gap(stage):
    """With x0 = 0 the target is 0.3 r (0 where r = 0), so 1 / (t - r) times the L2 distance is 0.3 sqrt(2) for
    every draw, at every stage; the reference code's weighting is not."""
    batch, generator = Batch(x0=torch.zeros(512, 2)), torch.Generator()
    config = ECTConfig(start_stage=stage, huber_c=0.0)
    ect = EasyConsistencyTuning(ForbiddenTeacher(), Drift(), config)
    assert math.isclose(float(ect.losses("student", batch, 0, generator.manual_seed(0))["loss"]), 0.3 * math.sqrt(2),
                        rel_tol=1e-5)
    edm = EasyConsistencyTuning(ForbiddenTeacher(), Drift(), ECTConfig(start_stage=stage, weighting="edm"))
    assert abs(float(edm.losses("student", batch, 0, generator.manual_seed(0))["loss"]) - 0.3 * math.sqrt(2)) > 0.1


def test_ect_first_stage_is_edms_denoising_loss():
    """At stage 0 every target is x0: with the mean squared distance and the reference code's weighting the
    loss equals EDM's teacher loss on the same draws (same lognormal, same weighting (s^2 + sd^2) / (s sd)^2)."""
    torch.manual_seed(0)
    student = ConsistencyDenoiser(MLP((2,), width=32, depth=2), sigma_data=1.4)
    ect = EasyConsistencyTuning(ForbiddenTeacher(), student, ECTConfig(start_stage=0, distance="l2", weighting="edm",
                                                                       p_mean=-1.2, p_std=1.2))
    edm = TeacherTraining(student, TeacherConfig(sigma_data=1.4, p_mean=-1.2, p_std=1.2))
    x0 = RING.train_x[:128]
    ect_loss = ect.losses("student", Batch(x0=x0), 0, torch.Generator().manual_seed(3))["loss"]
    edm_loss = edm.losses("denoiser", Batch(x0=x0), 0, torch.Generator().manual_seed(3))["loss"]
    assert torch.allclose(ect_loss, edm_loss, rtol=1e-5)
    later = ect.losses("student", Batch(x0=x0), ect.config.steps_per_stage, torch.Generator().manual_seed(3))
    assert not torch.allclose(later["loss"], edm_loss, rtol=1e-2) and float(later["r_over_t"]) > 0


def test_online_and_target_share_the_dropout_mask():
    torch.manual_seed(0)
    net = ConsistencyDenoiser(MLP((2,), width=64, depth=2, dropout=0.5), 1.0).train()
    x, s = torch.randn(32, 2), torch.full((32,), 1.0)
    online, target = online_and_target(net, net, x, s, x, s, None)
    assert torch.equal(online.detach(), target) and online.requires_grad and not target.requires_grad
    assert not torch.equal(net(x, s), net(x, s))  # dropout is active: only the shared mask makes them equal


@pytest.mark.parametrize(("method_cls", "bad", "match"), [
    (ConsistencyTraining, {"distance": "lpips"}, "distance"),
    (ConsistencyTraining, {"start_scales": 1}, "start_scales"),
    (ConsistencyTraining, {"start_target_ema": 1.0}, "start_target_ema"),
    (ImprovedConsistencyTraining, {"total_steps": 0}, "total_steps"),
    (ImprovedConsistencyTraining, {"p_std": 0.0}, "p_std"),
    (EasyConsistencyTuning, {"q": 1.0}, "q"),
    (EasyConsistencyTuning, {"steps_per_stage": 0}, "steps_per_stage"),
    (EasyConsistencyTuning, {"weighting": "snr"}, "weighting"),
])
def test_bad_configs_are_refused(method_cls, bad, match):
    with pytest.raises((ValueError, ConfigError), match=match):
        method_cls(ForbiddenTeacher(), ConsistencyDenoiser(small_mlp(), 1.0), method_cls.Config(**bad))


# ------------------------------------------------------------------------------------ exact teacher


def independent_eps_pair(x0, s_hi, s_lo, generator):
    """A broken CT-family pair: the target's input has its own noise, so it is no ODE step of x_hi."""
    eps_hi, eps_lo = (torch.randn(x0.shape, generator=generator, dtype=x0.dtype) for _ in range(2))
    return x0 + s_hi[:, None] * eps_hi, x0 + s_lo[:, None] * eps_lo


class ICTWithIndependentNoise(ImprovedConsistencyTraining):
    def noisy_pair(self, x0, s_hi, s_lo, generator):
        return independent_eps_pair(x0, s_hi, s_lo, generator)


class ECTWithIndependentNoise(EasyConsistencyTuning):
    def noisy_pair(self, x0, t, r, generator):
        return independent_eps_pair(x0, t, r, generator)


ICT_RING = ICTConfig(total_steps=1500, final_scales=160)
ECT_RING = ECTConfig(start_stage=0, steps_per_stage=200)  # no pretrained ring network: stage 0 pretrains it


def test_ict_on_the_exact_ring_beats_every_training_free_solver_at_two_steps():
    ok, m = passes_issue_bar(draw(*distil_on_ring(ImprovedConsistencyTraining, ICT_RING, steps=1500), 2))
    assert ok, m


def test_metrics_catch_an_ict_whose_target_has_independent_noise():
    ok, m = passes_issue_bar(draw(*distil_on_ring(ICTWithIndependentNoise, ICT_RING, steps=1500), 2))
    assert not ok, m


def test_ect_on_the_exact_ring_beats_every_training_free_solver_at_two_steps():
    ok, m = passes_issue_bar(draw(*distil_on_ring(EasyConsistencyTuning, ECT_RING, steps=1500), 2))
    assert ok, m


def test_metrics_catch_an_ect_whose_target_has_independent_noise():
    ok, m = passes_issue_bar(draw(*distil_on_ring(ECTWithIndependentNoise, ECT_RING, steps=1500), 2))
    assert not ok, m


@pytest.mark.slow
def test_ct_on_the_exact_ring_beats_every_training_free_solver_at_two_steps():
    config = CTConfig(total_steps=2000, final_scales=40, start_target_ema=0.5)
    ok, m = passes_issue_bar(draw(*distil_on_ring(ConsistencyTraining, config, steps=2000), 2))
    assert ok, m
