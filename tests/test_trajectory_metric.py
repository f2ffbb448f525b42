"""Trajectory straightness and curvature (:mod:`fewstep.eval.trajectory`) on cases whose answer is known: a
hand-made bent path, a point mass (straight paths at constant speed), Gaussian data (straight rays travelled at
a varying speed, with a straightness known by quadrature) and the 8-mode ring (bent paths)."""

import math

import pytest
import torch
from scipy.integrate import quad

from fewstep.data import load_dataset
from fewstep.errors import DataError
from fewstep.eval.trajectory import curvature, record_solve, record_trajectory, straightness
from fewstep.models.analytic import GaussianMixture
from fewstep.solvers import append_zero, karras_sigmas, solve, solver_sigmas


def noise(n: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gaussian(c: float) -> GaussianMixture:
    return GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.tensor([c**2]))


def test_a_right_angle_path_by_hand():
    """Rectified-flow points z = (1, 1), (1, 0), (0, 0) at t = 1/2, 1/4, 0, stored as VE states x = z (1 + s)
    at s = t / (1 - t) = 1, 1/3, 0. Mean velocity v = (1, 1) / (1/2) = (2, 2); the two segments' velocities are
    (0, 4) and (4, 0), each 8 from v in squared norm for dt = 1/4: S = (2 * 8 / 4) / (1/2) = 8. The corner is
    1/sqrt(2) from the diagonal chord of length sqrt(2): curvature 1/2."""
    levels = torch.tensor([1.0, 1 / 3, 0.0], dtype=torch.float64)
    z = torch.tensor([[[1.0, 1.0]], [[1.0, 0.0]], [[0.0, 0.0]]], dtype=torch.float64)
    states = z * (1 + levels)[:, None, None]
    assert straightness(levels, states) == pytest.approx(8.0, rel=1e-12)
    assert curvature(levels, states) == pytest.approx(0.5, rel=1e-12)


def test_recording_sees_every_level_and_ends_at_the_sample():
    mixture, x = load_dataset("ring8").analytic, noise(50)
    levels, states = record_solve(mixture, x, "heun", 7)
    assert torch.equal(levels, solver_sigmas("heun", 7))
    assert states.shape == (len(levels), 50, 2)
    assert torch.equal(states[0], x * levels[0]) and torch.equal(states[-1], solve(mixture, x, "heun", 7))
    levels, states = record_trajectory(mixture, x, "consistency", torch.tensor([80.0, 0.5]),
                                       torch.Generator().manual_seed(0))
    assert levels.tolist() == [80.0, 0.5, 0.0] and states.shape == (3, 50, 2)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_a_point_mass_gives_straight_constant_speed_paths(solver: str):
    """D(x, s) = m exactly (one component with zero variance): x_s = m + s n, i.e. z_t = (1 - t) m + t n, a
    straight line at constant velocity n - m, which both solvers follow exactly."""
    point = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
    levels, states = record_solve(GaussianMixture(torch.ones(1), point, torch.zeros(1)), noise(), solver, 35)
    assert torch.allclose(states[-1], point.expand(len(noise()), -1), atol=1e-12)
    assert straightness(levels, states) < 1e-20
    assert curvature(levels, states) < 1e-12


def sigma(t: float, c: float) -> float:
    return math.sqrt((1 - t) ** 2 * c**2 + t**2)


def speed(t: float, c: float) -> float:
    """d sigma_t / dt."""
    return (t - (1 - t) * c**2) / sigma(t, c)


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_gaussian_data_gives_straight_rays_at_a_known_straightness(c: float):
    """Data N(0, c^2 I): the exact ODE is x_s = sqrt(c^2 + s^2) xi, i.e. z_t = sigma_t xi with
    sigma_t = sqrt((1 - t)^2 c^2 + t^2) and xi = s_max n / sqrt(c^2 + s_max^2): rays through 0, so curvature 0.
    The speed sigma_t' varies, so on the recorded span [0, T], T = s_max / (1 + s_max), the straightness is
    S = E|xi|^2 (1/T) int_0^T (sigma_t' - (sigma_T - c) / T)^2 dt."""
    x = noise()
    levels, states = record_solve(gaussian(c), x, "heun", 201)
    s_max = float(levels[0])
    span = s_max / (1 + s_max)
    xi_sq = float((x**2).sum(1).mean()) * s_max**2 / (c**2 + s_max**2)
    chord_speed = (sigma(span, c) - c) / span
    expected = xi_sq * quad(lambda t: (speed(t, c) - chord_speed) ** 2, 0, span)[0] / span
    assert straightness(levels, states) == pytest.approx(expected, rel=1e-3)
    assert expected > 0.4
    assert curvature(levels, states) < 1e-12
    # the ray is travelled inward, then back out: |z_t| dips below both ends (so path length / chord > 1)
    norms = (states / (1 + levels)[:, None, None]).norm(dim=-1).mean(1)
    assert norms.min() < 0.95 * min(norms[0], norms[-1])


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_gaussian_straightness_over_the_whole_time_is_liu_et_al(c: float):
    """Started at s_max = 1e4 (T = 0.9999) the record spans almost all of [0, 1], and S is Liu et al.'s
    E|z_1|^2 int_0^1 (sigma_t' - (1 - c))^2 dt with z_1 = xi (from s_max = 80 it differs by up to 5%, at c = 2)."""
    x, s_max = noise(), 1e4
    levels, states = record_trajectory(gaussian(c), x, "heun", append_zero(karras_sigmas(200, sigma_max=s_max)))
    xi_sq = float((x**2).sum(1).mean()) * s_max**2 / (c**2 + s_max**2)
    expected = xi_sq * quad(lambda t: (speed(t, c) - (1 - c)) ** 2, 0, 1)[0]
    assert straightness(levels, states) == pytest.approx(expected, rel=1e-3)
    assert curvature(levels, states) < 1e-12


def test_the_ring_bends_its_paths():
    """Paths first head for the data mean, then turn towards one of 8 modes: curvature clearly above 0 (about
    0.25 at 35 Heun evaluations) and far above the straight cases' rounding error."""
    levels, states = record_solve(load_dataset("ring8").analytic, noise(500), "heun", 35)
    assert 0.15 < curvature(levels, states) < 0.4
    assert straightness(levels, states) > 1.0


def test_bad_records_are_refused():
    states = torch.zeros(3, 4, 2)
    with pytest.raises(DataError, match="strictly decreasing"):
        straightness(torch.tensor([1.0, 1.0, 0.0]), states)
    with pytest.raises(DataError, match="K >= 2"):
        curvature(torch.tensor([1.0, 0.0]), states)
