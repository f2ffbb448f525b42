"""Denoisers: the one interface every teacher and student presents to methods, solvers and evaluation.

A :class:`Denoiser` answers one question in the path-free VE coordinate: given ``x = x0 + s * eps`` and the
noise level ``s`` (per sample), what is the clean sample ``x0``? Everything else (the ODE velocity on any
path, a score, a guided prediction) is derived from that answer, so a method written once works with an
exact analytic teacher, a network trained here, or a diffusers model.

Networks ("backbones", see :mod:`fewstep.nets`) are read as denoisers through a preconditioner:

* :class:`EDMDenoiser`: EDM's ``x0 = c_skip x + c_out F(c_in x, log(s)/4)``;
* :class:`ConsistencyDenoiser`: the same with consistency-model coefficients, so ``f(x, s_min) = x``;
* :class:`TwoTimeDenoiser`: EDM's form with the target time ``s_next`` as an extra input (and optionally more
  inputs, e.g. a guidance scale), the output ``g`` of a flow map ``G(x, s, s_next) = (s_next/s) x +
  (1 - s_next/s) g`` (CTM, MeanFlow, flow-map distillation);
* :class:`PathDenoiser`: a network trained on another path with another prediction (eps on VP, velocity
  on rectified flow, ...), given ``x_t`` and its own time ``t * time_scale``;
* :class:`BoundaryDenoiser`: consistency coefficients around another denoiser (a diffusers student);
* :class:`FixedExtraDenoiser`: one of these with its extra scalar inputs held fixed.

Wrappers (:class:`DenoiserWrapper`) answer through another denoiser: :class:`CountingDenoiser` counts the
evaluations a method spends, :class:`~fewstep.guidance.GuidedDenoiser` applies classifier-free guidance.
"""

from __future__ import annotations

import hashlib
import itertools
import json

import torch
from torch import Tensor, nn

from fewstep.conditions import Condition
from fewstep.paths import (
    NoisePath,
    VPDiscrete,
    bcast,
    edm_coefficients,
    path_from_config,
    x0_eps_from_prediction,
)
from fewstep.solvers import SIGMA_MAX


class Denoiser(nn.Module):
    """Base class: ``forward(x, s, cond=None) -> x0`` with ``x = x0 + s * eps`` and ``s`` of shape ``(B,)``.

    Networks also take ``extra``, a ``(B, k)`` tensor of further scalar inputs passed to the backbone (a
    second time for two-time maps, a guidance scale), for students built with ``extra_conditions = k``.

    ``data_shape`` is the shape of one sample; ``num_classes`` is 0 for models without class labels. ``cond`` is
    a condition of :mod:`fewstep.conditions` (class labels, with the index ``num_classes`` as classifier-free
    guidance's null condition; text-encoder output; or None), passed to the network unchanged."""

    data_shape: tuple[int, ...] = ()
    num_classes: int = 0

    def forward(self, x: Tensor, s: Tensor, cond: Condition | None = None) -> Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Where its weights live (an analytic model's buffers); the CPU for a model with neither."""
        tensor = next(itertools.chain(self.parameters(), self.buffers()), None)
        return torch.device("cpu") if tensor is None else tensor.device


class DenoiserWrapper(Denoiser):
    """A denoiser that answers through another one (``self.denoiser``): guidance, counting."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser
        self.data_shape, self.num_classes = denoiser.data_shape, denoiser.num_classes


def innermost(denoiser: Denoiser) -> Denoiser:
    """The denoiser inside every :class:`DenoiserWrapper` around it."""
    while isinstance(denoiser, DenoiserWrapper):
        denoiser = denoiser.denoiser
    return denoiser


class CountingDenoiser(DenoiserWrapper):
    """A denoiser that counts its evaluations: a call on ``B`` samples adds ``B`` to ``evals`` and 1 to ``calls``,
    whatever it costs inside (a guided call, which runs the network on ``2B`` samples, is one evaluation of the
    guided teacher). Every method sees its teacher through one, so no method counts by hand."""

    def __init__(self, denoiser: Denoiser):
        super().__init__(denoiser)
        self.evals, self.calls = 0, 0

    def forward(self, x: Tensor, s: Tensor, cond: Condition | None = None, **options) -> Tensor:
        self.evals += x.shape[0]
        self.calls += 1
        return self.denoiser(x, s, cond, **options)


def fingerprint(denoiser: nn.Module) -> str:
    """A hash that identifies what ``denoiser`` computes: its weights and buffers, and the configuration of every
    module in it that has one (``config()`` of preconditioners and wrappers, ``hparams`` of backbones)."""
    digest = hashlib.sha256()
    for module in denoiser.modules():
        config = module.config() if callable(getattr(module, "config", None)) else getattr(module, "hparams", None)
        digest.update(f"{type(module).__name__}:{json.dumps(config, sort_keys=True, default=str)};".encode())
    for name, tensor in denoiser.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def as_sigma(s: Tensor | float, x: Tensor) -> Tensor:
    """A per-sample noise level of shape ``(B,)`` in the dtype and device of ``x``."""
    s = torch.as_tensor(s, dtype=x.dtype, device=x.device)
    return s.expand(x.shape[0]) if s.ndim == 0 else s


def x0_on_path(
    denoiser: Denoiser, x_t: Tensor, t: Tensor, path: NoisePath, cond: Condition | None = None
) -> Tensor:
    """The denoiser's clean-sample prediction read on ``path`` at time ``t``."""
    t = as_sigma(t, x_t)
    return denoiser(x_t / bcast(path.alpha(t), x_t), path.ve_sigma(t), cond)


def velocity_on_path(
    denoiser: Denoiser, x_t: Tensor, t: Tensor, path: NoisePath, cond: Condition | None = None
) -> Tensor:
    """The probability-flow ODE velocity ``dx_t/dt`` on ``path`` implied by the denoiser."""
    t = as_sigma(t, x_t)
    x0 = x0_on_path(denoiser, x_t, t, path, cond)
    eps = (x_t - bcast(path.alpha(t), x_t) * x0) / bcast(path.sigma(t), x_t)
    return bcast(path.d_alpha(t), x_t) * x0 + bcast(path.d_sigma(t), x_t) * eps


class EDMDenoiser(Denoiser):
    """EDM preconditioning (Karras et al. 2022) around a backbone ``F(x, c_noise, cond, extra)``."""

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.sigma_data = sigma_data
        self.data_shape = tuple(backbone.data_shape)
        self.num_classes = int(backbone.num_classes)

    def coefficients(self, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return edm_coefficients(s, self.sigma_data)

    def forward(self, x, s, cond=None, extra=None):
        s = as_sigma(s, x)
        c_skip, c_out, c_in = (bcast(c, x) for c in self.coefficients(s))
        out = self.backbone(c_in * x, 0.25 * torch.log(s), cond, extra)
        return c_skip * x + c_out * out.to(x.dtype)

    def config(self) -> dict:
        return {"kind": "edm", "sigma_data": self.sigma_data}


class ConsistencyDenoiser(EDMDenoiser):
    """Consistency-model parametrisation (Song et al. 2023): the boundary condition ``f(x, s_min) = x`` holds
    exactly because ``c_skip(s_min) = 1`` and ``c_out(s_min) = 0``::

        c_skip = sd^2 / ((s - s_min)^2 + sd^2),   c_out = sd (s - s_min) / sqrt(sd^2 + s^2)
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002):
        super().__init__(backbone, sigma_data)
        self.sigma_min = sigma_min

    def coefficients(self, s):
        sd, ds = self.sigma_data, s - self.sigma_min
        c_skip = sd**2 / (ds**2 + sd**2)
        c_out = sd * ds / torch.sqrt(sd**2 + s**2)
        c_in = 1.0 / torch.sqrt(s**2 + sd**2)
        return c_skip, c_out, c_in

    def config(self) -> dict:
        return {"kind": "consistency", "sigma_data": self.sigma_data, "sigma_min": self.sigma_min}


TARGET_TIMES = ("log", "flow_time")  # how a TwoTimeDenoiser feeds its target time to the backbone


class TwoTimeDenoiser(EDMDenoiser):
    """The two-time output ``g(x, s, s_next)`` of a flow map (Consistency Trajectory Models, Kim et al. 2023)::

        G(x, s, s_next) = (s_next/s) x + (1 - s_next/s) g(x, s, s_next),   s_next <= s

    ``g`` is EDM-preconditioned at ``s`` with ``s_next`` fed to the backbone's first extra condition, encoded by
    ``target_time``:

    * ``"log"`` (CTM's): ``log(max(s_next, zero_level)) / 4``, like ``c_noise``; the target time 0 is read as
      ``zero_level``, below every positive level a sampler uses. Its derivative in ``s_next`` is zero below
      ``zero_level``;
    * ``"flow_time"``: ``s_next / (1 + s_next)``, the rectified-flow time of the level, in ``[0, 1)``: smooth at
      ``s_next = 0`` with derivative 1 there, so a map's derivative in its target time (a Lagrangian tangent) is
      the network's.

    A backbone with more extra conditions takes the rest as ``extra`` (shape ``(B, k)``, e.g. a guidance scale),
    after the target time. ``s_next=None`` means 0, so ``denoiser(x, s, cond)`` is the one-jump map to clean data.
    A backbone whose extra conditions are still zero (a fresh :func:`~fewstep.nets.add_extra_conditions`) gives
    ``g(x, s, s_next) = `` the EDM denoiser for every ``s_next``, so a flow map built on a teacher's copy starts as
    the teacher's DDIM jump."""

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5, zero_level: float = 1e-4,
                 target_time: str = "log"):
        super().__init__(backbone, sigma_data)
        if len(getattr(backbone, "extra_embeddings", ())) < 1:
            raise ValueError("a TwoTimeDenoiser needs a backbone with an extra condition (the target time), and "
                             "one more per further input: build it with extra_conditions=1 (or more) or "
                             "fewstep.nets.add_extra_conditions")
        if target_time not in TARGET_TIMES:
            raise ValueError(f"target_time must be one of {TARGET_TIMES}, got {target_time!r}")
        self.zero_level, self.target_time = zero_level, target_time
        self.further_inputs = len(backbone.extra_embeddings) - 1

    def encode_target(self, s_next: Tensor) -> Tensor:
        """The backbone's input for the target time ``s_next`` (see the class docstring)."""
        if self.target_time == "log":
            return 0.25 * torch.log(s_next.clamp(min=self.zero_level))
        return s_next / (1 + s_next)

    def forward(self, x, s, cond=None, s_next=None, extra=None):
        s = as_sigma(s, x)
        s_next = torch.zeros_like(s) if s_next is None else as_sigma(s_next, x)
        inputs = self.encode_target(s_next)[:, None]
        if (extra is None) != (self.further_inputs == 0):
            raise ValueError(f"this two-time denoiser takes {self.further_inputs} further input(s) besides the "
                             f"target time: pass extra of shape ({x.shape[0]}, {self.further_inputs})"
                             if self.further_inputs else "this two-time denoiser takes no further inputs (extra)")
        if extra is not None:
            inputs = torch.cat([inputs, extra.to(inputs)], dim=1)
        return super().forward(x, s, cond, inputs)

    def config(self) -> dict:
        return {"kind": "two_time", "sigma_data": self.sigma_data, "zero_level": self.zero_level,
                "target_time": self.target_time}


class PathDenoiser(Denoiser):
    """A backbone trained on ``path`` that outputs ``prediction`` given ``(x_t, t * time_scale, cond)``."""

    def __init__(self, backbone: nn.Module, path: NoisePath, prediction: str, time_scale: float = 1.0,
                 sigma_data: float = 0.5):
        super().__init__()
        self.backbone, self.path, self.prediction = backbone, path, prediction
        self.time_scale, self.sigma_data = time_scale, sigma_data
        self.data_shape = tuple(backbone.data_shape)
        self.num_classes = int(backbone.num_classes)

    def forward(self, x, s, cond=None, extra=None):
        s = as_sigma(s, x)
        t = self.path.t_from_ve_sigma(s)
        x_t = x * bcast(self.path.alpha(t), x)
        out = self.backbone(x_t, t * self.time_scale, cond, extra).to(x.dtype)
        return x0_eps_from_prediction(out, self.prediction, x_t, t, self.path, self.sigma_data)[0]

    def config(self) -> dict:
        return {"kind": "path", "path": self.path.config(), "prediction": self.prediction,
                "time_scale": self.time_scale, "sigma_data": self.sigma_data}


class BoundaryDenoiser(Denoiser):
    """Consistency coefficients around a denoiser that predicts ``x0`` its own way (LCM's form, for a student that
    is a copy of a diffusers teacher read on its path)::

        f(x, s) = c_skip x + c_out D(x, s),   c_skip = sd^2 / ((s - s_min)^2 + sd^2),
                                              c_out  = (s - s_min) / sqrt((s - s_min)^2 + sd^2)

    so ``f(x, s_min) = x`` exactly and ``f`` is ``D`` once ``s >> sd``: built on the teacher's copy, the student
    starts as the teacher's one-jump denoiser wherever the noise dominates."""

    def __init__(self, denoiser: Denoiser, sigma_min: float = 0.002):
        super().__init__()
        self.denoiser, self.sigma_min = denoiser, sigma_min
        self.sigma_data = float(denoiser.sigma_data)
        self.data_shape, self.num_classes = denoiser.data_shape, denoiser.num_classes

    @property
    def backbone(self) -> nn.Module:
        return self.denoiser.backbone

    def forward(self, x, s, cond=None, extra=None):
        s = as_sigma(s, x)
        ds, sd = s - self.sigma_min, self.sigma_data
        c_skip, c_out = sd**2 / (ds**2 + sd**2), ds / torch.sqrt(ds**2 + sd**2)
        return bcast(c_skip, x) * x + bcast(c_out, x) * self.denoiser(x, s, cond, extra)

    def config(self) -> dict:
        return {"kind": "boundary", "sigma_min": self.sigma_min, "denoiser": self.denoiser.config()}


class FixedExtraDenoiser(Denoiser):
    """A network denoiser with its ``extra`` scalar conditions held fixed, so that it answers the plain
    ``(x, s, cond)`` call (e.g. a guidance-conditioned LCM student at its sampling guidance scale)."""

    def __init__(self, denoiser: EDMDenoiser | PathDenoiser, extra: list[float]):
        super().__init__()
        self.denoiser, self.extra = denoiser, [float(value) for value in extra]
        self.data_shape, self.num_classes = denoiser.data_shape, denoiser.num_classes

    @property
    def backbone(self) -> nn.Module:
        return self.denoiser.backbone

    def forward(self, x, s, cond=None):
        extra = torch.tensor(self.extra, dtype=x.dtype, device=x.device).expand(x.shape[0], -1)
        return self.denoiser(x, s, cond, extra)

    def config(self) -> dict:
        return {"kind": "fixed_extra", "extra": self.extra, "denoiser": self.denoiser.config()}


def denoiser_from_config(backbone: nn.Module, config: dict) -> Denoiser:
    """Rebuild a preconditioned denoiser from its ``config()`` around ``backbone``."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind == "edm":
        return EDMDenoiser(backbone, **config)
    if kind == "consistency":
        return ConsistencyDenoiser(backbone, **config)
    if kind == "two_time":
        return TwoTimeDenoiser(backbone, **config)
    if kind == "path":
        config["path"] = path_from_config(config["path"])
        return PathDenoiser(backbone, **config)
    if kind == "fixed_extra":
        return FixedExtraDenoiser(denoiser_from_config(backbone, config["denoiser"]), config["extra"])
    if kind == "boundary":
        return BoundaryDenoiser(denoiser_from_config(backbone, config["denoiser"]), config["sigma_min"])
    raise ValueError(f"unknown denoiser kind {kind!r}; expected 'edm', 'consistency', 'two_time', 'path', "
                     "'boundary' or 'fixed_extra'")


def max_level(denoiser: Denoiser) -> float | None:
    """The highest noise level (VE sigma) of a denoiser whose path ends at a finite one (a discrete VP schedule: about
    14.6 for Stable Diffusion's), or None (every level has a time)."""
    inner = innermost(denoiser)
    if not isinstance(inner, PathDenoiser) or not isinstance(inner.path, VPDiscrete):
        return None
    return float(inner.path.ve_sigma(torch.tensor(inner.path.t_noise, dtype=torch.float64)))


def start_level(denoiser: Denoiser) -> float:
    """The level a solve of ``denoiser``'s ODE starts from: EDM's ``SIGMA_MAX`` (80), or a discrete VP path's last
    level where that is lower (a network is not asked about timesteps it was never trained on)."""
    level = max_level(denoiser)
    return SIGMA_MAX if level is None else min(level, SIGMA_MAX)
