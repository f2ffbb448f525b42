"""Noising paths ``x_t = alpha(t) * x0 + sigma(t) * eps`` and conversions between them.

Every path is one curve through the same family of marginals: at matched signal-to-noise ratio two
paths differ only by a scale of ``x``. fewstep therefore uses one common coordinate, the EDM / VE
noise level ``s = sigma(t) / alpha(t)`` (so ``x / alpha(t) = x0 + s * eps``):

* time on path A -> time on path B: ``t_B = B.t_from_ve_sigma(A.ve_sigma(t_A))`` (SNR matching);
* state on path A -> state on path B: ``x_B = x_A * B.alpha(t_B) / A.alpha(t_A)``.

Predictions (what a network outputs) are converted with :func:`x0_eps_from_prediction` and
:func:`prediction_from_x0_eps`; the kinds are

* ``"eps"``: the noise ``eps``;
* ``"x0"``: the clean sample;
* ``"v"``: ``alpha * eps - sigma * x0`` (Salimans & Ho);
* ``"velocity"``: the ODE velocity ``dx_t/dt = alpha'(t) x0 + sigma'(t) eps`` (flow matching);
* ``"edm"``: the raw output ``F`` of an EDM-preconditioned network, ``x0 = c_skip x~ + c_out F`` with
  ``x~ = x_t / alpha`` and ``s = sigma / alpha`` (needs ``sigma_data``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PREDICTIONS = ("eps", "x0", "v", "velocity", "edm")


class NoisePath:
    """A noising path. Subclasses give ``alpha``, ``sigma``, their time derivatives and the inverse of
    :meth:`ve_sigma`. ``t_clean`` is the time of clean data, ``t_noise`` the time of (almost) pure noise."""

    name: str = ""
    t_clean: float = 0.0
    t_noise: float = 1.0

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def t_from_ve_sigma(self, s: Tensor) -> Tensor:
        raise NotImplementedError

    def ve_sigma(self, t: Tensor) -> Tensor:
        """EDM noise level ``sigma(t) / alpha(t)``; log-SNR is ``-2 log ve_sigma``."""
        return self.sigma(t) / self.alpha(t)

    def log_snr(self, t: Tensor) -> Tensor:
        return -2.0 * torch.log(self.ve_sigma(t))

    def noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``x_t = alpha(t) x0 + sigma(t) eps`` with ``t`` broadcast over the batch."""
        return bcast(self.alpha(t), x0) * x0 + bcast(self.sigma(t), x0) * eps

    def config(self) -> dict:
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class VE(NoisePath):
    """EDM / variance-exploding: ``x_t = x0 + t eps``, time is the noise level ``sigma``."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.t_clean, self.t_noise = 0.0, sigma_max
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def alpha(self, t):
        return torch.ones_like(t)

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return torch.zeros_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)

    def t_from_ve_sigma(self, s):
        return s

    def config(self):
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class VPLinear(NoisePath):
    """DDPM's continuous VP path with linear ``beta(t) = beta_min + t (beta_max - beta_min)``, t in [0, 1]."""

    name = "vp_linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min, self.beta_max = beta_min, beta_max

    def _log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t):
        return torch.exp(self._log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)))

    def d_alpha(self, t):
        return -0.5 * (self.beta_min + t * (self.beta_max - self.beta_min)) * self.alpha(t)

    def d_sigma(self, t):
        a = self.alpha(t)
        return 0.5 * (self.beta_min + t * (self.beta_max - self.beta_min)) * a**2 / self.sigma(t)

    def ve_sigma(self, t):
        return torch.sqrt(torch.expm1(-2 * self._log_alpha(t)))

    def t_from_ve_sigma(self, s):
        db = self.beta_max - self.beta_min
        return (-self.beta_min + torch.sqrt(self.beta_min**2 + 2 * db * torch.log1p(s**2))) / db

    def config(self):
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max}


class VPCosine(NoisePath):
    """Cosine VP path ``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)``, t in [0, 1] (zero SNR at t=1)."""

    name = "vp_cosine"

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t):
        return torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_sigma(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def ve_sigma(self, t):
        return torch.tan(0.5 * math.pi * t)

    def t_from_ve_sigma(self, s):
        return torch.atan(s) * (2.0 / math.pi)


class RectifiedFlow(NoisePath):
    """Rectified flow / flow matching: ``x_t = (1 - t) x0 + t eps``, t=1 is noise, velocity ``eps - x0``."""

    name = "rectified_flow"

    def alpha(self, t):
        return 1.0 - t

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return -torch.ones_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)

    def t_from_ve_sigma(self, s):
        return s / (1.0 + s)


class TrigFlow(NoisePath):
    """TrigFlow (sCM): ``x_t = cos(t) x0 + sin(t) z`` with ``z ~ N(0, sigma_data^2)``, t in [0, pi/2].

    In the ``eps ~ N(0, 1)`` form used here that is ``sigma(t) = sigma_data * sin(t)``."""

    name = "trigflow"
    t_noise = 0.5 * math.pi

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def alpha(self, t):
        return torch.cos(t)

    def sigma(self, t):
        return self.sigma_data * torch.sin(t)

    def d_alpha(self, t):
        return -torch.sin(t)

    def d_sigma(self, t):
        return self.sigma_data * torch.cos(t)

    def ve_sigma(self, t):
        return self.sigma_data * torch.tan(t)

    def t_from_ve_sigma(self, s):
        return torch.atan(s / self.sigma_data)

    def config(self):
        return {"name": self.name, "sigma_data": self.sigma_data}


class VPDiscrete(NoisePath):
    """A discrete-time VP schedule (DDPM / diffusers): ``alphas_cumprod[i]`` at integer times ``i = 0..N-1``.

    Time is continuous: ``log ve_sigma`` is linear in ``t`` between integer times (diffusers'
    ``EulerDiscreteScheduler`` interpolation) and extended linearly beyond ``[0, N-1]``, so every noise level
    has a time; the state follows ``alpha = 1 / sqrt(1 + s^2)``, ``sigma = s / sqrt(1 + s^2)``."""

    name = "vp_discrete"

    def __init__(self, alphas_cumprod: list[float] | None = None):
        if alphas_cumprod is None:  # DDPM's schedule: 1000 steps, betas linear from 1e-4 to 0.02 (in float32)
            alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32, device="cpu"),
                                           0).tolist()
        if len(alphas_cumprod) < 2:
            raise ValueError("a discrete VP schedule needs at least two alphas_cumprod values")
        self.alphas_cumprod = [float(a) for a in alphas_cumprod]
        cumprod = torch.tensor(self.alphas_cumprod, dtype=torch.float64, device="cpu")  # CPU also when built on meta
        self.log_sigmas = 0.5 * torch.log((1 - cumprod) / cumprod)
        if not bool((self.log_sigmas.diff() > 0).all()):
            raise ValueError("alphas_cumprod must decrease strictly with time")
        self.t_clean, self.t_noise = 0.0, float(len(alphas_cumprod) - 1)

    def _segment(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Index of the interpolation segment of ``t``, its left log-sigma and its slope."""
        log_sigmas = self.log_sigmas.to(t.device)
        index = torch.floor(t.double()).long().clamp(0, len(log_sigmas) - 2)
        slope = log_sigmas[index + 1] - log_sigmas[index]
        return index, log_sigmas[index], slope

    def ve_sigma(self, t):
        index, left, slope = self._segment(t)
        return torch.exp(left + (t.double() - index) * slope).to(t.dtype)

    def alpha(self, t):
        return torch.rsqrt(1 + self.ve_sigma(t) ** 2)

    def sigma(self, t):
        s = self.ve_sigma(t)
        return s * torch.rsqrt(1 + s**2)

    def _d_ve_sigma(self, t):
        return self.ve_sigma(t) * self._segment(t)[2].to(t.dtype)

    def d_alpha(self, t):
        s = self.ve_sigma(t)
        return -s * (1 + s**2) ** -1.5 * self._d_ve_sigma(t)

    def d_sigma(self, t):
        return (1 + self.ve_sigma(t) ** 2) ** -1.5 * self._d_ve_sigma(t)

    def t_from_ve_sigma(self, s):
        log_sigmas = self.log_sigmas.to(s.device)
        log_s = torch.log(s.double())
        index = (torch.searchsorted(log_sigmas, log_s) - 1).clamp(0, len(log_sigmas) - 2)
        left, slope = log_sigmas[index], log_sigmas[index + 1] - log_sigmas[index]
        return (index + (log_s - left) / slope).to(s.dtype)

    def config(self):
        return {"name": self.name, "alphas_cumprod": self.alphas_cumprod}

    def __repr__(self) -> str:
        return f"VPDiscrete(num_timesteps={len(self.alphas_cumprod)})"


PATHS: dict[str, type[NoisePath]] = {
    cls.name: cls for cls in (VE, VPLinear, VPCosine, RectifiedFlow, TrigFlow, VPDiscrete)
}


def path_from_config(config: dict) -> NoisePath:
    """Rebuild a path from :meth:`NoisePath.config`."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in PATHS:
        raise ValueError(f"unknown noising path {name!r}; choose one of {sorted(PATHS)}")
    return PATHS[name](**config)


def bcast(value: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample value ``(B,)`` (or a scalar) to broadcast against ``like`` ``(B, ...)``."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.ndim == 0:
        return value
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def convert_time(t: Tensor, src: NoisePath, dst: NoisePath) -> Tensor:
    """The time on ``dst`` with the same signal-to-noise ratio as ``t`` on ``src``."""
    return dst.t_from_ve_sigma(src.ve_sigma(t))


def convert_state(x: Tensor, t: Tensor, src: NoisePath, dst: NoisePath) -> tuple[Tensor, Tensor]:
    """Map ``(x_t, t)`` on ``src`` to the equivalent ``(x_t', t')`` on ``dst``."""
    t_dst = convert_time(t, src, dst)
    return x * bcast(dst.alpha(t_dst) / src.alpha(t), x), t_dst


def edm_coefficients(s: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor]:
    """EDM preconditioning at VE noise level ``s``: ``(c_skip, c_out, c_in)``."""
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / torch.sqrt(s**2 + sigma_data**2)
    c_in = 1.0 / torch.sqrt(s**2 + sigma_data**2)
    return c_skip, c_out, c_in


def x0_eps_from_prediction(
    pred: Tensor, kind: str, x_t: Tensor, t: Tensor, path: NoisePath, sigma_data: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Read a network output of ``kind`` at ``(x_t, t)`` on ``path`` as the pair ``(x0, eps)``."""
    a, s = bcast(path.alpha(t), x_t), bcast(path.sigma(t), x_t)
    if kind == "eps":
        eps = pred
        x0 = (x_t - s * eps) / a
    elif kind == "x0":
        x0 = pred
        eps = (x_t - a * x0) / s
    elif kind == "v":
        norm = a**2 + s**2
        x0 = (a * x_t - s * pred) / norm
        eps = (s * x_t + a * pred) / norm
    elif kind == "velocity":
        da, ds = bcast(path.d_alpha(t), x_t), bcast(path.d_sigma(t), x_t)
        det = a * ds - s * da
        x0 = (ds * x_t - s * pred) / det
        eps = (a * pred - da * x_t) / det
    elif kind == "edm":
        ve = bcast(path.ve_sigma(t), x_t)
        c_skip, c_out, _ = edm_coefficients(ve, sigma_data)
        x0 = c_skip * (x_t / a) + c_out * pred
        eps = (x_t - a * x0) / s
    else:
        raise ValueError(f"unknown prediction kind {kind!r}; choose one of {PREDICTIONS}")
    return x0, eps


def prediction_from_x0_eps(
    x0: Tensor, eps: Tensor, kind: str, t: Tensor, path: NoisePath, sigma_data: float = 0.5
) -> Tensor:
    """The ``kind`` prediction that corresponds to ``(x0, eps)`` at time ``t`` on ``path``."""
    a, s = bcast(path.alpha(t), x0), bcast(path.sigma(t), x0)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return a * eps - s * x0
    if kind == "velocity":
        return bcast(path.d_alpha(t), x0) * x0 + bcast(path.d_sigma(t), x0) * eps
    if kind == "edm":
        ve = s / a
        c_skip, c_out, _ = edm_coefficients(ve, sigma_data)
        return (x0 - c_skip * (x0 + ve * eps)) / c_out
    raise ValueError(f"unknown prediction kind {kind!r}; choose one of {PREDICTIONS}")
