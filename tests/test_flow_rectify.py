"""The rectified-flow family (reflow, InstaFlow, rfpp, SlimFlow): the shared math of
:mod:`fewstep.methods.flow.rectify`, the stage machinery, and each method against the exact 8-mode ring teacher,
with a control whose coupling is shuffled (plain flow matching on independent pairs) that must fail the same
assertion."""

import math

import pytest
import torch

from exact_ring import NOISE, RING, best_training_free_excess_nll, distil_on_ring, draw, passes_issue_bar, small_mlp
from fewstep.data.batch import Batch
from fewstep.data.sources import TeacherPairs
from fewstep.errors import ConfigError
from fewstep.eval.trajectory import record_solve, straightness
from fewstep.methods import METHODS
from fewstep.methods.flow.instaflow import InstaFlow
from fewstep.methods.flow.rectify import (
    T_MAX,
    T_MIN,
    DistillingFlowConfig,
    FeatureNet,
    RectifiedFlowConfig,
    lpips_like,
    rf_time,
    solve_pairs,
    straight_point,
    u_shaped_times,
    uniform_t_levels,
    ve_level,
    velocity_distance,
    velocity_residual,
)
from fewstep.methods.flow.reflow import Reflow
from fewstep.methods.flow.rfpp import RFPPConfig
from fewstep.methods.flow.slimflow import SlimFlow, SlimFlowConfig
from fewstep.models.analytic import GaussianMixture
from fewstep.models.denoiser import EDMDenoiser, velocity_on_path
from fewstep.nets import MLP
from fewstep.paths import RectifiedFlow
from fewstep.pipeline import check_method

FLOW = ("reflow", "instaflow", "rfpp", "slimflow")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ math


def test_time_conversions_and_sampling_levels():
    s = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    assert torch.allclose(ve_level(rf_time(s)), s, rtol=1e-12)
    assert pytest.approx(80 / 81) == T_MAX and pytest.approx(0.002 / 1.002) == T_MIN
    levels = torch.tensor(uniform_t_levels(4), dtype=torch.float64)
    assert levels[0] == 80.0 and levels[-1] == 0.0
    assert torch.allclose(rf_time(levels), T_MAX * torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    assert uniform_t_levels(1) == [80.0, 0.0]


def test_u_shaped_times_put_mass_at_both_ends_symmetrically():
    like = torch.zeros(1, dtype=torch.float64)
    t = u_shaped_times(200_000, 4.0, gen(), like)
    assert float(t.min()) >= T_MIN and float(t.max()) <= T_MAX
    u = (t - T_MIN) / (T_MAX - T_MIN)
    ends, middle = float(((u < 0.1) | (u > 0.9)).float().mean()), float(((u > 0.4) & (u < 0.6)).float().mean())
    # density ∝ exp(4u) + exp(4(1 - u)) on [0, 1]: 0.2 of the line at the ends holds P = 0.4776, the middle 0.0559
    edge = (math.exp(4 * 0.1) - 1 + math.exp(4) - math.exp(4 * 0.9)) / (math.exp(4) - 1)
    centre = (math.exp(4 * 0.6) - math.exp(4 * 0.4)) / (math.exp(4) - 1)
    assert ends == pytest.approx(edge, abs=0.005) and middle == pytest.approx(centre, abs=0.005)
    assert float(u.mean()) == pytest.approx(0.5, abs=0.003)
    flat = (u_shaped_times(200_000, 0.0, gen(), like) - T_MIN) / (T_MAX - T_MIN)
    assert float(((flat > 0.4) & (flat < 0.6)).float().mean()) == pytest.approx(0.2, abs=0.005)


def test_the_reflow_residual_is_the_rectified_flow_velocity_error():
    """For any denoiser D, v_D(z_t, t) on the rectified-flow path minus the pair's velocity z - x equals
    (x - D(x + s z, s)) / t with z_t = (1 - t) x + t z."""
    torch.manual_seed(0)
    student = EDMDenoiser(MLP((2,), width=32, depth=2), 0.5).double()
    x, z = torch.randn(64, 2, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
    t = torch.rand(64, dtype=torch.float64) * 0.9 + 0.05
    z_t = (1 - t[:, None]) * x + t[:, None] * z
    with torch.no_grad():
        velocity = velocity_on_path(student, z_t, t, RectifiedFlow())
        s = ve_level(t)
        residual = velocity_residual(student(straight_point(x, z, s), s), x, t)
    assert torch.allclose(velocity - (z - x), residual, atol=1e-10)


def test_the_reflow_loss_vanishes_on_a_straight_exact_flow_and_not_elsewhere():
    """Data at one point m: the exact denoiser is m everywhere, every teacher path is the straight line from the
    noise to m, and the reflow loss on its pairs is 0; a denoiser off by 0.1 is not."""
    m = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
    point = GaussianMixture(torch.ones(1), m, torch.zeros(1))
    noise = torch.randn(256, 2, generator=gen(), dtype=torch.float64)
    endpoint = solve_pairs(point, noise, None, "heun", 7)
    assert torch.allclose(endpoint, m.expand(256, -1), atol=1e-12)
    method = Reflow(point, point, RectifiedFlowConfig())
    pairs = Batch(noise=noise, endpoint=endpoint)
    assert float(method.reflow_losses(pairs, gen())["loss"]) < 1e-20
    shifted = GaussianMixture(torch.ones(1), m + 0.1, torch.zeros(1))
    method.student = shifted
    assert float(method.reflow_losses(pairs, gen())["loss"]) > 1e-3


def test_rfpp_pseudo_huber_is_l1_like_for_large_and_quadratic_for_small_residuals():
    c, d = 0.00054 * 2, 2
    big, small = torch.tensor([[3.0, 4.0]]), torch.tensor([[3e-5, 4e-5]])
    assert float(velocity_distance(big, "pseudo_huber", c)) == pytest.approx((5.0 - c) / d, rel=1e-4)
    assert float(velocity_distance(small, "pseudo_huber", c)) == pytest.approx((5e-5) ** 2 / (2 * c) / d, rel=1e-3)
    assert float(velocity_distance(big, "l2", c)) == pytest.approx(12.5)


def test_lpips_like_is_a_premetric_on_unit_normalised_features():
    torch.manual_seed(0)
    features = FeatureNet((2,), 16, 3, 0.1)
    a, b = torch.randn(32, 2), torch.randn(32, 2)
    assert torch.equal(lpips_like(features, a, a), torch.zeros(32))
    assert torch.allclose(lpips_like(features, a, b), lpips_like(features, b, a))
    assert bool((lpips_like(features, a, b) > 0).all())
    # at most 4 per layer: unit vectors are at most 2 apart, and the mean over units divides by the width
    assert bool((lpips_like(features, a, b) <= 3 * 4 / 16).all())


def test_the_feature_network_learns_to_denoise_the_ring():
    torch.manual_seed(0)
    features = FeatureNet((2,), 64, 2, 0.3)
    optimizer = torch.optim.Adam(features.parameters(), lr=3e-3)
    x = RING.train_x[:2000]
    before = float(features.dae_loss(x, gen(1)))
    for step in range(200):
        optimizer.zero_grad()
        features.dae_loss(x[torch.randint(0, 2000, (256,), generator=gen(step))], gen(step)).backward()
        optimizer.step()
    assert float(features.dae_loss(x, gen(1))) < 0.1 * before


# ------------------------------------------------------------------------------------------------ stages


def test_a_second_reflow_round_trains_on_the_first_rounds_own_pairs():
    student = EDMDenoiser(small_mlp(), RING.sigma_data)
    method = Reflow(RING.analytic, student, RectifiedFlowConfig(num_pairs=64, rounds=2, round_nfe=3,
                                                                steps_per_round=3))
    assert method.own_noise.shape == (64, 2)
    assert [method.after_update("student", k) for k in range(3)] == [False, False, True]
    assert int(method.stage) == 1 and int(method.updates_in_stage) == 0
    expected = solve_pairs(student, method.own_noise, None, "heun", 3)
    assert torch.allclose(method.own_endpoint, expected, atol=1e-6)
    pairs = method.stage_pairs(Batch(noise=torch.zeros(8, 2), endpoint=torch.zeros(8, 2)), gen())
    assert bool((pairs.noise != 0).all())  # the method's own pairs, not the batch
    assert not any(method.after_update("student", k) for k in range(10))  # the last stage never ends
    fresh = Reflow(RING.analytic, EDMDenoiser(small_mlp(1), RING.sigma_data), method.config)
    fresh.load_state_dict(method.state_dict())
    assert int(fresh.stage) == 1 and torch.equal(fresh.own_endpoint, method.own_endpoint)
    assert Reflow.run_schedule(1000, {"rounds": 2}) == {"steps_per_round": 500}
    assert InstaFlow.run_schedule(900, {}) == {"steps_per_round": 450}


def test_slimflow_anneals_its_noise_from_independent_to_coupled():
    method = SlimFlow(RING.analytic, EDMDenoiser(small_mlp(), RING.sigma_data), SlimFlowConfig(anneal_steps=4))
    noise = torch.randn(4000, 2, generator=gen())
    first = method.coupled_noise(noise, gen(1))
    assert abs(float((first * noise).mean())) < 0.05  # beta = 1: fresh noise only
    method.updates_in_stage.fill_(2)
    half = method.coupled_noise(noise, gen(1))
    assert float((half * noise).mean()) == pytest.approx(math.sqrt(0.75), abs=0.05)
    method.updates_in_stage.fill_(4)
    assert torch.equal(method.coupled_noise(noise, gen(1)), noise)
    assert SlimFlow.run_schedule(1000, {}) == {"steps_per_round": 500, "anneal_steps": 250}


def test_slimflow_refuses_a_student_as_large_as_its_network_teacher():
    teacher = EDMDenoiser(MLP((2,), width=64, depth=2), 0.5)
    small = SlimFlow.build_student(teacher, SlimFlowConfig(), lambda: MLP((2,), width=32, depth=2), 0.5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in teacher.parameters())
    with pytest.raises(ConfigError, match="smaller than its teacher"):
        SlimFlow.build_student(teacher, SlimFlowConfig(), lambda: MLP((2,), width=64, depth=2), 0.5)
    copied = Reflow.build_student(teacher, RectifiedFlowConfig(), lambda: MLP((2,), width=8, depth=1), 0.5)
    assert torch.equal(copied(torch.ones(3, 2), torch.ones(3)), teacher(torch.ones(3, 2), torch.ones(3)))


@pytest.mark.parametrize(("name", "args", "match"), [
    ("reflow", {"pair_solver": "rk4"}, "pair_solver"),
    ("reflow", {"rounds": 0}, "rounds"),
    ("instaflow", {"premetric": "lpips_huber"}, "premetric"),
    ("instaflow", {"reflow_weight": -1.0}, "reflow_weight"),
    ("reflow", {"reflow_weight": 1.0}, "reflow_weight"),  # no distillation stage to weigh it in
    ("rfpp", {"time_a": -1.0}, "time_a"),
    ("slimflow", {"guide_t_max": 1.0}, "guide_t_max"),
])
def test_bad_arguments_are_refused_before_anything_runs(name, args, match):
    with pytest.raises(ConfigError, match=match):
        check_method(name, args, RING)


def test_registry_and_sampling():
    for name in FLOW:
        cls = METHODS[name]
        assert cls.family == "flow" and cls.needs == {"teacher_pairs"}
        spec = check_method(name, {}, RING, device="cpu").sampling(2)
        assert spec.sampler == "euler" and spec.sigmas == uniform_t_levels(2)


# ------------------------------------------------------------------------------------------------ exact ring


def ring_pairs(config) -> TeacherPairs:
    from fewstep.cache import cache_dir

    return TeacherPairs(RING.analytic, config.num_pairs, cache_dir() / "pairs", config.pair_solver, config.pair_nfe,
                        progress=False)


def with_coupling_shuffled(cls):
    """``cls`` with every stage's pairs' endpoints permuted within the batch: independent noise and data, i.e.
    plain flow matching (the 1-rectified flow) instead of reflow: the control the exact-ring tests must fail."""

    class Shuffled(cls):
        name = f"{cls.name}_shuffled"

        def stage_pairs(self, batch, generator):
            pairs = super().stage_pairs(batch, generator)
            order = torch.randperm(pairs.endpoint.shape[0], generator=generator)
            return Batch(noise=pairs.noise, endpoint=pairs.endpoint[order], cond=pairs.cond)

    return Shuffled


CONFIGS = {
    "reflow": RectifiedFlowConfig(num_pairs=2000),
    "instaflow": DistillingFlowConfig(num_pairs=2000),
    "rfpp": RFPPConfig(num_pairs=2000, feature_steps=150),
    "slimflow": SlimFlowConfig(num_pairs=2000),
}


def ring_student(name: str, steps: int = 600, shuffled: bool = False):
    """``name`` trained ``steps`` steps on 2,000 exact-teacher pairs, its stages fitted to the run."""
    cls = METHODS[name]
    cls = with_coupling_shuffled(cls) if shuffled else cls
    config = CONFIGS[name]
    return distil_on_ring(cls, cls.Config(**{**config.__dict__, **cls.run_schedule(steps, config.__dict__)}),
                          steps, source=ring_pairs(config))


def covers_modes_and_beats_solvers(samples: torch.Tensor) -> tuple[bool, dict]:
    """The issue's bar without its spread clause: 8/8 modes and >= 3x lower excess NLL than the best training-free
    solver at 2 NFE (600-step students are not yet sharp; the whole bar is checked at 1,500 steps, slow)."""
    _, m = passes_issue_bar(samples)
    return m["modes_covered"] == 8 and 3 * m["excess_nll"] <= best_training_free_excess_nll(2), m


@pytest.fixture(scope="module")
def reflow_student():
    return ring_student("reflow")


@pytest.fixture(scope="module")
def flow_matching_student():
    return ring_student("reflow", shuffled=True)


def test_one_reflow_round_at_least_halves_the_straightness_of_the_teachers_paths(reflow_student,
                                                                                   flow_matching_student):
    """Straightness (Liu et al.'s S, :mod:`fewstep.eval.trajectory`) of the ODE paths from the same noise, each
    solved with Heun at 35 evaluations: the exact teacher's, the reflowed student's, and the control's (flow
    matching on independent pairs learns the teacher's own curved flow)."""
    noise = NOISE[:1000]
    teacher = straightness(*record_solve(RING.analytic, noise, "heun", 35))
    with torch.no_grad():
        reflowed = straightness(*record_solve(reflow_student[1], noise, "heun", 35))
        control = straightness(*record_solve(flow_matching_student[1], noise, "heun", 35))
    assert reflowed <= 0.5 * teacher, (reflowed, teacher)
    assert control > 0.5 * teacher, (control, teacher)


def test_reflow_passes_the_ring_bar_at_two_steps_and_flow_matching_does_not(reflow_student, flow_matching_student):
    ok, m = passes_issue_bar(draw(*reflow_student, 2))
    assert ok, m
    ok, m = passes_issue_bar(draw(*flow_matching_student, 2))
    assert not ok, m


@pytest.mark.parametrize("name", ["instaflow", "rfpp", "slimflow"])
def test_each_method_covers_the_ring_and_beats_every_solver_at_two_steps(name):
    ok, m = covers_modes_and_beats_solvers(draw(*ring_student(name), 2))
    assert ok, m


@pytest.mark.slow
@pytest.mark.parametrize("name", ["instaflow", "rfpp", "slimflow"])
def test_each_method_fails_that_with_its_coupling_shuffled(name):
    ok, m = covers_modes_and_beats_solvers(draw(*ring_student(name, shuffled=True), 2))
    assert not ok, m


@pytest.mark.slow
@pytest.mark.parametrize("name", ["instaflow", "rfpp", "slimflow"])
def test_each_method_passes_the_whole_ring_bar_at_two_steps_after_1500_steps(name):
    ok, m = passes_issue_bar(draw(*ring_student(name, steps=1500), 2))
    assert ok, m
