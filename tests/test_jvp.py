"""Forward-mode JVPs against central differences, and the finite-difference fallback."""

import pytest
import torch

from fewstep.errors import ConfigError
from fewstep.jvp import jvp
from fewstep.models.denoiser import EDMDenoiser
from fewstep.nets import MLP

DT = torch.float64


def double_mlp(dropout: float = 0.0) -> MLP:
    torch.manual_seed(0)
    return MLP((3,), width=32, depth=2, dropout=dropout).double()


def inputs(seed: int = 0) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    x, vx = torch.randn(16, 3, generator=g, dtype=DT), torch.randn(16, 3, generator=g, dtype=DT)
    s, vs = torch.rand(16, generator=g, dtype=DT) + 0.2, torch.randn(16, generator=g, dtype=DT)
    return (x, s), (vx, vs)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def central_difference(fn, primals, tangents, h=1e-5):
    plus = fn(*(p + h * v for p, v in zip(primals, tangents, strict=True)))
    minus = fn(*(p - h * v for p, v in zip(primals, tangents, strict=True)))
    return (plus - minus) / (2 * h)


@pytest.mark.parametrize("wrap", ["backbone", "edm_denoiser"])
def test_forward_mode_matches_central_differences_in_float64(wrap):
    net = double_mlp()
    fn = net if wrap == "backbone" else EDMDenoiser(net, sigma_data=0.7)
    primals, tangents = inputs()
    with torch.no_grad():
        out, derivative = jvp(fn, primals, tangents, method="forward")
        assert torch.equal(out, fn(*primals))
        assert relative_error(derivative, central_difference(fn, primals, tangents)) < 1e-6
        wrong_direction = central_difference(fn, primals, (tangents[0], -tangents[1]))
        assert relative_error(derivative, wrong_direction) > 1e-2


def test_finite_difference_fallback_matches_forward_mode():
    fn = EDMDenoiser(double_mlp(), sigma_data=0.7)
    primals, tangents = inputs(1)
    with torch.no_grad():
        _, forward = jvp(fn, primals, tangents, method="forward")
        out, fallback = jvp(fn, primals, tangents, method="finite_difference", eps=1e-4)
    assert torch.equal(out, fn(*primals))
    assert relative_error(fallback, forward) < 1e-6


def test_auto_falls_back_when_an_operation_has_no_forward_mode_rule():
    class NoForwardMode(torch.autograd.Function):
        """``x^3`` with a backward rule only (like a fused attention kernel)."""

        @staticmethod
        def forward(ctx, x):
            return x**3

    def fn(x):
        return NoForwardMode.apply(x)

    x, v = torch.linspace(-1, 1, 9, dtype=DT), torch.ones(9, dtype=DT)
    with pytest.raises(RuntimeError):
        jvp(fn, (x,), (v,), method="forward")
    out, derivative = jvp(fn, (x,), (v,), method="auto", eps=1e-5)
    assert torch.allclose(out, x**3) and torch.allclose(derivative, 3 * x**2, atol=1e-8)


def test_finite_difference_passes_replay_the_same_dropout_mask():
    net = double_mlp(dropout=0.5).train()
    primals, tangents = inputs(2)
    with torch.no_grad():
        _, derivative = jvp(net, primals, (torch.zeros_like(tangents[0]), torch.zeros_like(tangents[1])),
                            method="finite_difference")
    assert torch.equal(derivative, torch.zeros_like(derivative))  # different masks would not cancel


def test_bad_arguments_are_refused():
    net, (primals, tangents) = double_mlp(), inputs()
    with pytest.raises(ConfigError, match="jvp method"):
        jvp(net, primals, tangents, method="reverse")
    with pytest.raises(ConfigError, match="eps"):
        jvp(net, primals, tangents, method="finite_difference", eps=0.0)
    with pytest.raises(ValueError, match="one tangent per primal"):
        jvp(net, primals, tangents[:1])
