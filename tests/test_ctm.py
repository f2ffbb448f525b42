"""Consistency Trajectory Models: the flow-map student, its sampler and loss, and exact-teacher tests on the
analytic 8-mode ring (with and without the auxiliary denoising loss) that fail when the target is wrong."""

import pytest
import torch

from exact_ring import NOISE, RING, best_training_free_excess_nll, distil_on_ring, passes_issue_bar, small_mlp
from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.methods import METHODS
from fewstep.methods.losses import pseudo_huber
from fewstep.methods.trajectory.consistency_trajectory import ConsistencyTrajectory, CTMConfig
from fewstep.models.analytic import GaussianMixture, ring_mixture
from fewstep.models.denoiser import Denoiser, EDMDenoiser, TwoTimeDenoiser
from fewstep.models.io import load_model, save_model
from fewstep.nets import MLP, add_extra_conditions
from fewstep.solvers import count_nfe, sample, sample_consistency, sample_euler, sample_flow_map

DT = torch.float64
V = 0.5  # variance of the single-Gaussian data whose flow map is known in closed form


def gaussian_teacher(variance: float = V) -> GaussianMixture:
    return GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.full((1,), variance))


class ExactGaussianFlowMap(Denoiser):
    """The exact flow map of data N(0, V I): the ODE keeps ``x_s / sqrt(V + s^2)`` constant, so
    ``G(x, t, s) = x sqrt(V + s^2) / sqrt(V + t^2)``; returns the ``g`` with that ``G`` (for ``s < t``)."""

    data_shape = (2,)

    def forward(self, x, t, label=None, s=None):
        s = torch.zeros_like(t) if s is None else s
        jump = x * (torch.sqrt(V + s**2) / torch.sqrt(V + t**2))[:, None]
        ratio = (s / t)[:, None]
        return (jump - ratio * x) / (1 - ratio)


def random_two_time_student(seed: int = 0) -> TwoTimeDenoiser:
    """A two-time student whose target-time input matters (its extra condition is no longer zero)."""
    student = TwoTimeDenoiser(add_extra_conditions(small_mlp(seed), 1), sigma_data=1.4)
    with torch.no_grad():
        for p in student.backbone.extra_embeddings.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    return student


def bind(student):
    return lambda x, s, *target: student(x, s, None, *target)


# ----------------------------------------------------------------------------------------------- math


def test_a_jump_to_the_same_time_is_the_identity():
    student = random_two_time_student()
    x = torch.randn(32, 2)
    for level in (80.0, 1.0, 0.002, 0.0):
        t = torch.full((32,), level)
        assert torch.equal(ConsistencyTrajectory.jump(student, x, t, t, None), x)
    t, s = torch.full((32,), 2.0), torch.full((32,), 0.5)
    assert not torch.allclose(ConsistencyTrajectory.jump(student, x, t, s, None), x)


def test_a_student_built_on_a_teacher_network_starts_as_the_teacher_for_every_target_time():
    teacher = EDMDenoiser(small_mlp(3), sigma_data=1.4)
    student = ConsistencyTrajectory.build_student(teacher, CTMConfig(), small_mlp, 1.4)
    x, t = torch.randn(64, 2), torch.rand(64) * 10 + 0.01
    expected = teacher(x, t)
    for s in (torch.zeros(64), t * 0.3, t):
        assert torch.allclose(student(x, t, None, s), expected, atol=1e-6)
    assert torch.allclose(student(x, t), expected, atol=1e-6)
    assert len(teacher.backbone.extra_embeddings) == 0  # the teacher's own network is untouched


def test_the_jump_to_zero_is_the_one_step_consistency_function():
    """With s = 0 CTM's G(x, t, 0) is g(x, t, 0): the plain denoiser interface, which one-step flow-map and
    one-step consistency sampling both return."""
    student = random_two_time_student()
    x, t = torch.randn(64, 2), torch.full((64,), 80.0)
    jumped = ConsistencyTrajectory.jump(student, x, t, torch.zeros(64), None)
    assert torch.equal(jumped, student(x, t))
    assert torch.equal(jumped, student(x, t, None, torch.zeros(64)))
    one_flow_map = sample_flow_map(bind(student), x, torch.tensor([80.0, 0.0]))
    one_consistency = sample_consistency(bind(student), x, torch.tensor([80.0]))
    assert torch.equal(one_flow_map, jumped) and torch.equal(one_consistency, jumped)
    assert not torch.allclose(student(x, t, None, torch.full((64,), 1.0)), jumped)


def test_the_loss_with_target_time_zero_is_the_consistency_distillation_loss():
    """s = 0 makes the CTM term d(G(x_t, t, 0), sg G-(Heun(x_t, t -> u), u, 0)): CD's loss for
    f(x, t) = G(x, t, 0), with the EMA target as CD's target network."""
    ctm = ConsistencyTrajectory(ring_mixture(), random_two_time_student(0), CTMConfig(dsm_weight=0.0))
    ctm.target = random_two_time_student(5).requires_grad_(False)  # a target distinct from the student
    n, batch = ctm.config.num_scales, 128
    gen = torch.Generator().manual_seed(0)
    x0, eps = RING.train_x[:batch], torch.randn(batch, 2, generator=gen)
    i = torch.randint(0, n - 1, (batch,), generator=gen)
    j, k = i + 1, torch.full((batch,), n)
    loss = ctm.ctm_losses(x0, None, eps, i, j, k)["consistency"]
    t, u = ctm.grid[i], ctm.grid[j]
    x_t = x0 + t[:, None] * eps
    cd_form = pseudo_huber(ctm.student(x_t, t), ctm.target(ctm.teacher_step(x_t, t, u, None), u), ctm.huber_c)
    assert torch.allclose(loss, cd_form.mean(), rtol=1e-5)


def test_the_map_to_time_zero_passes_gradients_to_its_input_but_not_to_its_weights():
    """G_sg uses the student's current weights under stop-gradient: the same gradients as a frozen copy."""
    gen = torch.Generator().manual_seed(0)
    x0, eps = RING.train_x[:64], torch.randn(64, 2, generator=gen)
    i = torch.randint(0, 17, (64,), generator=gen)
    j, k = i + 1, torch.randint(0, 19, (64,), generator=gen).clamp(min=i + 1)
    grads = []
    for frozen_copy in (False, True):
        ctm = ConsistencyTrajectory(ring_mixture(), random_two_time_student(), CTMConfig(dsm_weight=0.5))
        if frozen_copy:
            copy = random_two_time_student().requires_grad_(False)
            ctm.frozen_student = lambda x, t, label, s, copy=copy: copy(x, t, label, s)
        ctm.ctm_losses(x0, None, eps, i, j, k)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in ctm.student.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


def test_two_jumps_through_an_exact_flow_map_land_where_one_jump_does():
    flow_map = ExactGaussianFlowMap()
    x = torch.randn(256, 2, dtype=DT, generator=torch.Generator().manual_seed(1)) * 5.0
    one = sample_flow_map(bind(flow_map), x, torch.tensor([5.0, 0.0], dtype=DT))
    two = sample_flow_map(bind(flow_map), x, torch.tensor([5.0, 0.7, 0.0], dtype=DT))
    four = sample_flow_map(bind(flow_map), x, torch.tensor([5.0, 2.0, 0.7, 0.1, 0.0], dtype=DT))
    assert torch.allclose(one, two, atol=1e-12) and torch.allclose(one, four, atol=1e-12)
    ode = sample(gaussian_teacher(), x / 5.0, "heun", torch.linspace(5.0, 0.0, 2001, dtype=DT))
    assert torch.allclose(one, ode, atol=1e-5)  # and it is the ODE's flow map


def test_the_loss_vanishes_for_the_exact_flow_map_and_not_for_another_teachers():
    config = CTMConfig(num_scales=40, distance="l2", dsm_weight=0.0, teacher_steps=2)
    x0 = gaussian_teacher().sample(512, torch.Generator().manual_seed(1))
    losses = []
    for variance in (V, 2 * V):
        ctm = ConsistencyTrajectory(gaussian_teacher(variance), ExactGaussianFlowMap(), config)
        losses.append(float(ctm.losses("student", Batch(x0=x0), 0, torch.Generator().manual_seed(2))["loss"]))
    assert losses[0] < 1e-6  # only the Heun steps' discretisation error remains
    assert losses[0] < losses[1] / 100, losses


def test_the_teacher_runs_up_to_teacher_steps_heun_steps_and_stops_at_u():
    ctm = ConsistencyTrajectory(ring_mixture(), random_two_time_student().double(), CTMConfig(teacher_steps=3))
    ctm.grid = ctm.grid.double()
    n = ctm.config.num_scales
    x = torch.randn(4, 2, dtype=DT, generator=torch.Generator().manual_seed(0)) * 3
    i = torch.tensor([0, 5, n - 3, n - 2])
    j = torch.clamp(i + 3, max=n - 1)
    solved = ctm.teacher_solve(x, i, j, None)
    for row in range(4):
        levels = ctm.grid[int(i[row]):int(j[row]) + 1]
        expected = sample(ring_mixture(), x[row:row + 1] / levels[0], "heun", levels)
        assert torch.allclose(solved[row:row + 1], expected, atol=1e-12)
    assert ctm.teacher_evals == 3 * 2 * 4


def test_times_are_ordered_and_reach_zero():
    ctm = ConsistencyTrajectory(ring_mixture(), random_two_time_student(), CTMConfig(teacher_steps=2))
    i, j, k = ctm.draw_times(20000, torch.Generator().manual_seed(0))
    n = ctm.config.num_scales
    assert bool((i < j).all() and (j <= k).all() and (k <= n).all() and (j <= n - 1).all())
    assert bool((k == n).any() and (k == j).any()) and float(ctm.grid[n]) == 0.0


def test_dsm_term_trains_g_at_equal_times_to_denoise():
    """The DSM term is EDM's weighted denoising error of g(x_t, t, t): zero for a g returning x0."""
    ctm = ConsistencyTrajectory(ring_mixture(), random_two_time_student(), CTMConfig(dsm_weight=2.0))
    gen = torch.Generator().manual_seed(0)
    out = ctm.losses("student", Batch(x0=RING.train_x[:64]), 0, gen)
    assert torch.allclose(out["loss"], out["consistency"] + 2.0 * out["dsm"])
    assert float(out["dsm"].detach()) > 0
    no_dsm = ConsistencyTrajectory(ring_mixture(), random_two_time_student(), CTMConfig(dsm_weight=0.0))
    assert "dsm" not in no_dsm.losses("student", Batch(x0=RING.train_x[:64]), 0, torch.Generator().manual_seed(0))


def test_flow_map_sampler_reduces_to_euler_and_gamma_one_to_consistency_sampling():
    student = random_two_time_student()
    noise, sigmas = torch.randn(64, 2), torch.tensor([80.0, 3.0, 0.5, 0.0])
    plain = EDMDenoiser(small_mlp(), 1.4)
    assert torch.allclose(sample(lambda x, s, *target: plain(x, s), noise, "flow_map", sigmas),
                          sample_euler(plain, noise * 80.0, sigmas))
    gamma_one = sample_flow_map(bind(student), noise * 80.0, sigmas, torch.Generator().manual_seed(4), gamma=1.0)
    consistency = sample_consistency(bind(student), noise * 80.0, sigmas, torch.Generator().manual_seed(4))
    assert torch.allclose(gamma_one, consistency)
    assert count_nfe("flow_map", sigmas) == 3


def test_sampling_specs_spend_exactly_nfe_evaluations():
    for gamma, sampler in ((0.0, "flow_map"), (1.0, "consistency")):
        ctm = ConsistencyTrajectory(ring_mixture(), random_two_time_student(), CTMConfig(sampling_gamma=gamma))
        for nfe in (1, 2, 4):
            spec = ctm.sampling(nfe)
            assert spec.sampler == sampler and spec.sigmas[0] == 80.0
            assert count_nfe(spec.sampler, torch.tensor(spec.sigmas)) == nfe


def test_two_time_student_saves_and_loads(tmp_path):
    student = random_two_time_student()
    save_model(tmp_path / "m", student, {"role": "student"})
    loaded, meta = load_model(tmp_path / "m")
    assert isinstance(loaded, TwoTimeDenoiser) and meta["denoiser"]["kind"] == "two_time"
    x, t, s = torch.randn(16, 2), torch.full((16,), 5.0), torch.full((16,), 0.3)
    assert torch.equal(loaded(x, t, None, s), student(x, t, None, s))
    assert torch.equal(loaded(x, t), student(x, t))


def test_bad_configs_and_backbones_are_refused():
    for bad in ({"distance": "lpips"}, {"sampling_gamma": 0.5}, {"teacher_steps": 0}, {"dsm_weight": -1.0},
                {"num_scales": 1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            ConsistencyTrajectory(ring_mixture(), random_two_time_student(), CTMConfig(**bad))
    with pytest.raises(ValueError, match="extra condition"):
        TwoTimeDenoiser(MLP((2,), width=16, depth=1))
    assert METHODS["ctm"] is ConsistencyTrajectory and ConsistencyTrajectory.needs == {"data"}


# ------------------------------------------------------------------------------------ exact teacher

class CTMWithFlippedStep(ConsistencyTrajectory):
    """A broken CTM: the teacher step goes the wrong way (sign flipped in the target)."""

    def teacher_step(self, x, s, s_next, cond):
        return 2 * x - super().teacher_step(x, s, s_next, cond)


def draw(method, student, nfe: int) -> torch.Tensor:
    spec = method.sampling(nfe)
    return sample(bind(student), NOISE, spec.sampler, torch.tensor(spec.sigmas), torch.Generator().manual_seed(12))


RING_STEPS = 1000


@pytest.mark.parametrize("dsm_weight", [1.0, 0.0], ids=["with_dsm", "without_dsm"])
def test_ctm_on_the_exact_ring_beats_every_training_free_solver_at_two_steps(dsm_weight):
    method, student = distil_on_ring(ConsistencyTrajectory, CTMConfig(dsm_weight=dsm_weight), steps=RING_STEPS)
    ok, m = passes_issue_bar(draw(method, student, 2))
    assert ok, (m, best_training_free_excess_nll(2))
    assert method.teacher_evals == 2 * 256 * RING_STEPS


def test_metrics_catch_a_ctm_with_a_flipped_target():
    method, student = distil_on_ring(CTMWithFlippedStep, CTMConfig(), steps=RING_STEPS)
    ok, m = passes_issue_bar(draw(method, student, 2))
    assert not ok, m

