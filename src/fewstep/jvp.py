"""Jacobian-vector products ``J_fn(primals) @ tangents`` for the methods that need a time derivative of a
network along a trajectory (sCM, MeanFlow, flow maps).

Forward mode (:func:`torch.func.jvp`) is exact and costs about one extra forward pass. Some kernels have no
forward-mode rule (flash / memory-efficient attention, some fused ops, FSDP-wrapped modules); for those the
central finite difference ``(fn(p + eps v) - fn(p - eps v)) / (2 eps)`` is the fallback, with error
``O(eps^2)`` plus rounding ``O(u / eps)`` (``u`` the unit round-off: use float64 where precision matters).
Each of its perturbed passes starts from the same random state, so dropout masks agree between them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fewstep.errors import ConfigError

JVP_METHODS = ("auto", "forward", "finite_difference")


def jvp(fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor], method: str = "auto",
        eps: float = 1e-3) -> tuple[Tensor, Tensor]:
    """``(fn(*primals), d/dh fn(*(p + h v)) at h=0)`` for ``v`` in ``tangents``.

    ``method``: ``"forward"`` (forward-mode AD), ``"finite_difference"`` (central difference with step ``eps``
    along the tangents), or ``"auto"``: forward mode, falling back to finite differences when ``fn`` has an
    operation without forward-mode support."""
    if method not in JVP_METHODS:
        raise ConfigError(f"jvp method must be one of {JVP_METHODS}, got {method!r}")
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise ValueError(f"jvp needs one tangent per primal, got {len(primals)} primals and {len(tangents)} "
                         "tangents")
    if method == "finite_difference":
        return finite_difference_jvp(fn, primals, tangents, eps)
    if method == "forward":
        return torch.func.jvp(fn, primals, tangents)
    try:
        return torch.func.jvp(fn, primals, tangents)
    except (RuntimeError, NotImplementedError):
        return finite_difference_jvp(fn, primals, tangents, eps)


def finite_difference_jvp(fn: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...],
                          eps: float) -> tuple[Tensor, Tensor]:
    """Central-difference JVP; the output pass draws randomness as a plain call would, and the two perturbed
    passes replay the same random state."""
    if eps <= 0:
        raise ConfigError(f"finite-difference jvp step eps must be > 0, got {eps}")
    shifted = [tuple(p + sign * eps * v for p, v in zip(primals, tangents, strict=True)) for sign in (1, -1)]
    outputs = []
    for inputs in shifted:
        with torch.random.fork_rng():
            outputs.append(fn(*inputs))
    return fn(*primals), (outputs[0] - outputs[1]) / (2 * eps)
