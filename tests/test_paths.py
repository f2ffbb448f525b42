import itertools
import math

import pytest
import torch

from fewstep.models.analytic import ring_mixture
from fewstep.models.denoiser import PathDenoiser, velocity_on_path, x0_on_path
from fewstep.paths import (
    PATHS,
    VE,
    RectifiedFlow,
    TrigFlow,
    VPCosine,
    VPDiscrete,
    VPLinear,
    convert_state,
    convert_time,
    path_from_config,
    prediction_from_x0_eps,
    x0_eps_from_prediction,
)
from fewstep.solvers import sample, solver_sigmas

ALL_PATHS = [VE(), VPLinear(), VPCosine(), RectifiedFlow(), TrigFlow(0.5), VPDiscrete()]
DT = torch.float64


def interior_times(path, n=64):
    """Times strictly inside the path where alpha > 0 and sigma > 0."""
    lo, hi = path.t_clean, path.t_noise
    span = hi - lo
    return torch.linspace(lo + 1e-3 * span, hi - 1e-3 * span, n, dtype=DT)


@pytest.mark.parametrize("path", ALL_PATHS, ids=lambda p: p.name)
def test_ve_sigma_round_trip(path):
    t = interior_times(path)
    assert torch.allclose(path.t_from_ve_sigma(path.ve_sigma(t)), t, atol=1e-6, rtol=0)


@pytest.mark.parametrize("path", ALL_PATHS, ids=lambda p: p.name)
def test_derivatives_match_finite_differences(path):
    t = interior_times(path)
    h = 1e-6 * (path.t_noise - path.t_clean)
    for f, df in ((path.alpha, path.d_alpha), (path.sigma, path.d_sigma)):
        numeric = (f(t + h) - f(t - h)) / (2 * h)
        assert torch.allclose(df(t), numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("src", ALL_PATHS, ids=lambda p: p.name)
@pytest.mark.parametrize("dst", ALL_PATHS, ids=lambda p: p.name)
def test_time_and_state_conversion_round_trip(src, dst):
    t = interior_times(src)
    x = torch.randn(t.shape[0], 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    x_dst, t_dst = convert_state(x, t, src, dst)
    assert torch.allclose(dst.log_snr(t_dst), src.log_snr(t), atol=1e-6)
    x_back, t_back = convert_state(x_dst, t_dst, dst, src)
    assert torch.allclose(t_back, t, atol=1e-6, rtol=0)
    assert torch.allclose(x_back, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("path", ALL_PATHS, ids=lambda p: p.name)
@pytest.mark.parametrize("kind", ["eps", "x0", "v", "velocity", "edm"])
def test_prediction_round_trip(path, kind):
    g = torch.Generator().manual_seed(1)
    t = interior_times(path, 32)
    x0 = torch.randn(32, 4, dtype=DT, generator=g)
    eps = torch.randn(32, 4, dtype=DT, generator=g)
    x_t = path.noise(x0, eps, t)
    pred = prediction_from_x0_eps(x0, eps, kind, t, path)
    x0_back, eps_back = x0_eps_from_prediction(pred, kind, x_t, t, path)
    assert torch.allclose(x0_back, x0, atol=1e-6, rtol=0)
    assert torch.allclose(eps_back, eps, atol=1e-6, rtol=0)


def test_velocity_is_time_derivative_of_path():
    path, g = RectifiedFlow(), torch.Generator().manual_seed(2)
    x0, eps = torch.randn(8, 2, dtype=DT, generator=g), torch.randn(8, 2, dtype=DT, generator=g)
    t = torch.full((8,), 0.3, dtype=DT)
    v = prediction_from_x0_eps(x0, eps, "velocity", t, path)
    assert torch.allclose(v, eps - x0)


def test_unknown_kinds_are_refused():
    with pytest.raises(ValueError, match="prediction kind"):
        x0_eps_from_prediction(torch.zeros(1, 2), "score", torch.zeros(1, 2), torch.ones(1), VE())
    with pytest.raises(ValueError, match="noising path"):
        path_from_config({"name": "nope"})
    for name, cls in PATHS.items():
        assert path_from_config(cls().config() if name != "trigflow" else TrigFlow(0.7).config()).name == name


class ExactNetOnPath(torch.nn.Module):
    """The exact mixture denoiser presented as a network on ``path`` that outputs ``kind``."""

    def __init__(self, mixture, path, kind):
        super().__init__()
        self.mixture, self.path, self.kind = mixture, path, kind
        self.data_shape, self.num_classes = mixture.data_shape, 0

    def forward(self, x_t, t, label=None, extra=None):
        s = self.path.ve_sigma(t)
        x0 = self.mixture(x_t / self.path.alpha(t)[:, None], s)
        eps = (x_t - self.path.alpha(t)[:, None] * x0) / self.path.sigma(t)[:, None]
        return prediction_from_x0_eps(x0, eps, self.kind, t, self.path)


@pytest.mark.parametrize(("path", "kind"), [(VPLinear(), "eps"), (VPCosine(), "v"), (RectifiedFlow(), "velocity"),
                                            (TrigFlow(0.5), "edm")])
def test_one_denoiser_through_two_paths_gives_the_same_trajectory(path, kind):
    mixture = ring_mixture()
    wrapped = PathDenoiser(ExactNetOnPath(mixture, path, kind), path, kind)
    noise = torch.randn(256, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    sigmas = solver_sigmas("heun", 15, sigma_max=60.0)
    direct = sample(mixture, noise, "heun", sigmas)
    through_path = sample(wrapped, noise, "heun", sigmas)
    assert torch.allclose(direct, through_path, atol=1e-6, rtol=0)


def test_velocity_on_path_integrates_to_the_same_endpoint():
    """Euler in t on the rectified-flow path equals DDIM (Euler in s) on the VE coordinate."""
    mixture, path = ring_mixture(), RectifiedFlow()
    noise = torch.randn(128, 2, dtype=DT, generator=torch.Generator().manual_seed(4))
    ts = torch.linspace(1 - 1e-4, 0.0, 41, dtype=DT)
    x = path.sigma(ts[0]) * noise  # = alpha(t0) * (ve_sigma(t0) * noise): the same start as the VE sampler
    for t, t_next in itertools.pairwise(ts):
        x = x + (t_next - t) * velocity_on_path(mixture, x, t, path)
    sigmas = path.ve_sigma(ts)
    sigmas[-1] = 0.0
    ddim = sample(mixture, noise, "euler", sigmas)
    assert torch.allclose(x, ddim, atol=1e-6)
    assert torch.allclose(x0_on_path(mixture, x, torch.tensor(0.0, dtype=DT), path), x, atol=1e-9)


def test_convert_time_matches_known_formulas():
    t = torch.linspace(0.05, 1.5, 20, dtype=DT)
    trig, rf = TrigFlow(0.5), RectifiedFlow()
    s_rf = convert_time(t, trig, rf)
    expected = 0.5 * torch.sin(t) / (torch.cos(t) + 0.5 * torch.sin(t))  # SANA-Sprint's RF <-> TrigFlow map
    assert torch.allclose(s_rf, expected, atol=1e-12)
    assert torch.allclose(convert_time(t, trig, VE()), 0.5 * torch.tan(t))
    assert math.isclose(float(VPCosine().ve_sigma(torch.tensor(0.5, dtype=DT))), 1.0, rel_tol=1e-12)
