"""The rectified-flow family's base and shared math: reflow rounds on (noise, endpoint) pairs, an optional final
distillation stage, the time samplers, the velocity premetrics and the small LPIPS-like feature network. Reflow,
InstaFlow, rfpp and SlimFlow subclass :class:`RectifiedFlowMethod`, each in its own file.

**Coordinates.** The student stays a denoiser in fewstep's VE coordinate ``x = x0 + s eps``, with the teacher's
parametrisation (a copy of its network and preconditioner; a fresh EDM-preconditioned network for an analytic
teacher). The rectified-flow path ``z_t = (1 - t) x0 + t eps`` is the same curve through ``t = s / (1 + s)``,
``z = x / (1 + s)`` (:mod:`fewstep.paths`), and its velocity read from a denoiser ``D`` is
``v = (z_t - D) / t``. For a pair ``(z, x)`` (standard-normal noise, the ODE endpoint solved from it) the straight
line's point at time ``t`` is ``x + s z`` in VE coordinates and its velocity ``z - x``, so the reflow residual is
a weighted clean-sample error::

    v_theta(z_t, t) - (z - x) = (x - D_theta(x + s z, s)) / t,      s = t / (1 - t)

This keeps every teacher (EDM or a flow-matching network) usable without a velocity wrapper, and Euler on the
student's levels is a straight segment in the rectified-flow coordinate (DDIM is Euler in both). Times are kept
to ``[t(sigma_min), t(sigma_max)] = [0.002, 80/81]``: pairs start at ``sigma_max z`` as every fewstep sampler does,
so the path's last ``1/81`` of time (``t > 80/81``) is never trained or sampled.

**Stages.** Stage ``k < rounds`` is reflow round ``k + 1``: round one on the teacher's pairs (the
``teacher_pairs`` source, whose cost is charged to the run), every later round on pairs that the previous
round's student makes with ``pair_solver`` at ``round_nfe`` evaluations from fresh noise (no teacher calls).
Methods with a distillation stage (``distills``) end with one more stage on pairs of the last reflow student,
whose loss adds ``reflow_weight`` times the reflow loss on the same pairs (:meth:`RectifiedFlowMethod.losses`):
without it, training only the one-step jump at ``t_max`` unlearns the rest of the flow and 2- and 4-step Euler
sampling breaks (docs/flow.md). Each stage but the last lasts ``steps_per_round`` updates; the optimizer state
is reset between stages.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.methods.base import DistillationMethod, MethodConfig, PairRequest
from fewstep.methods.losses import check_choice, pseudo_huber, squared_l2
from fewstep.models.denoiser import Denoiser, EDMDenoiser, innermost, start_level
from fewstep.paths import bcast
from fewstep.solvers import DEFAULT_TEACHER_NFE, SIGMA_MAX, SIGMA_MIN, TEACHER_SOLVERS, Sampling, solve

PREMETRICS = ("l2", "pseudo_huber")


def rf_time(s: Tensor | float) -> Tensor | float:
    """Rectified-flow time ``t = s / (1 + s)`` of the VE level ``s``."""
    return s / (1 + s)


def ve_level(t: Tensor | float) -> Tensor | float:
    """VE level ``s = t / (1 - t)`` of the rectified-flow time ``t``."""
    return t / (1 - t)


T_MIN, T_MAX = rf_time(SIGMA_MIN), rf_time(SIGMA_MAX)


def uniform_times(n: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """``n`` times uniform on ``[T_MIN, T_MAX]`` (Liu et al.'s uniform ``t``)."""
    u = torch.rand(n, generator=generator, device=like.device, dtype=like.dtype)
    return T_MIN + (T_MAX - T_MIN) * u


def u_shaped_times(n: int, a: float, generator: torch.Generator, like: Tensor) -> Tensor:
    """rfpp's U-shaped times: ``u ~ p(u) ∝ exp(a u)`` on [0, 1] by inverting its CDF, ``n`` draws joined with
    their mirrors ``1 - u``, shuffled, the first ``n`` kept, then scaled to ``[T_MIN, T_MAX]``. The density is
    ``a cosh(a (u - 1/2)) / (2 sinh(a / 2))``-shaped: most mass near both ends (``a = 0`` is uniform)."""
    r = torch.rand(n, generator=generator, device=like.device, dtype=like.dtype)
    u = r if a == 0 else torch.log1p(r * math.expm1(a)) / a
    both = torch.cat([u, 1 - u])
    u = both[torch.randperm(2 * n, generator=generator, device=like.device)[:n]]
    return T_MIN + (T_MAX - T_MIN) * u


def straight_point(endpoint: Tensor, noise: Tensor, s: Tensor) -> Tensor:
    """The pair's straight line at VE level ``s``: ``endpoint + s noise`` (``z_t / (1 - t)``)."""
    return endpoint + bcast(s, endpoint) * noise


def velocity_residual(x0_prediction: Tensor, endpoint: Tensor, t: Tensor) -> Tensor:
    """``v_theta - (z - x) = (x - D_theta) / t``: the rectified-flow velocity error of a clean-sample prediction
    at time ``t`` against the pair's straight-line velocity."""
    return (endpoint - x0_prediction) / bcast(t, endpoint)


def rfpp_huber_c(data_shape: tuple[int, ...], huber_c: float | None) -> float:
    """rfpp's pseudo-Huber constant ``c = 0.00054 d`` (on the sum of squares), unless ``huber_c`` is given."""
    return huber_c if huber_c is not None else 0.00054 * math.prod(data_shape)


def velocity_distance(residual: Tensor, kind: str, huber_c: float) -> Tensor:
    """Per-sample premetric of a velocity residual: the mean square (``"l2"``), or rfpp's pseudo-Huber
    ``(sqrt(|r|^2 + c^2) - c) / d`` (``"pseudo_huber"``)."""
    if kind == "pseudo_huber":
        return pseudo_huber(residual, torch.zeros_like(residual), huber_c) / residual[0].numel()
    return squared_l2(residual, torch.zeros_like(residual))


def uniform_t_levels(nfe: int) -> list[float]:
    """``nfe`` Euler steps evenly spaced in rectified-flow time from ``T_MAX`` to 0, as VE levels (the first is
    ``SIGMA_MAX``, the last 0)."""
    return [SIGMA_MAX if k == 0 else float(ve_level(T_MAX * (1 - k / nfe))) for k in range(nfe)] + [0.0]


@torch.no_grad()
def solve_pairs(denoiser: Denoiser, noise: Tensor, labels: Tensor | None, solver: str, nfe: int,
                chunk: int = 1024) -> Tensor:
    """Endpoints of ``denoiser``'s ODE solved from standard-normal ``noise`` by ``solver`` at ``nfe`` evaluations
    (:func:`fewstep.solvers.solve`), ``chunk`` samples at a time."""
    endpoints = []
    for start in range(0, noise.shape[0], chunk):
        cond = None if labels is None else labels[start:start + chunk]
        endpoints.append(solve(lambda x, s, cond=cond: denoiser(x, s, cond), noise[start:start + chunk], solver, nfe,
                               sigma_max=start_level(denoiser)))
    return torch.cat(endpoints)


class FeatureNet(nn.Module):
    """A small MLP feature network for an LPIPS-like premetric, made and trained here (never a downloaded network,
    never the evaluation's): ``depth`` SiLU layers of ``width`` units on the flattened sample, and a linear decoder
    that makes it a denoising autoencoder (:meth:`dae_loss`) on the pairs' endpoints."""

    def __init__(self, data_shape: tuple[int, ...], width: int, depth: int, noise_level: float):
        super().__init__()
        if width < 1 or depth < 1 or noise_level <= 0:
            raise ValueError(f"feature network needs width >= 1, depth >= 1 and noise_level > 0, got {width}, "
                             f"{depth}, {noise_level}")
        dim = math.prod(data_shape)
        self.layers = nn.ModuleList(nn.Linear(dim if i == 0 else width, width) for i in range(depth))
        self.decoder = nn.Linear(width, dim)
        self.noise_level = noise_level

    def features(self, x: Tensor) -> list[Tensor]:
        """Every layer's activations ``(B, width)``."""
        h, out = x.flatten(1), []
        for layer in self.layers:
            h = nn.functional.silu(layer(h))
            out.append(h)
        return out

    def dae_loss(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Mean squared reconstruction error of ``x`` from ``x + noise_level eps``."""
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        reconstruction = self.decoder(self.features(x + self.noise_level * eps)[-1]).reshape(x.shape)
        return squared_l2(reconstruction, x).mean()


def lpips_like(features: FeatureNet, a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-sample LPIPS-like distance: over the feature layers, the squared distance of the unit-normalised
    activations (LPIPS's channel normalisation with unit layer weights), averaged over units and summed over
    layers."""
    total = a.new_zeros(a.shape[0])
    for fa, fb in zip(features.features(a), features.features(b), strict=True):
        fa = fa / (fa.norm(dim=1, keepdim=True) + eps)
        fb = fb / (fb.norm(dim=1, keepdim=True) + eps)
        total = total + (fa - fb).pow(2).mean(1)
    return total


@dataclass
class RectifiedFlowConfig(MethodConfig):
    """What every method of the family has: the teacher's pairs, reflow rounds and the velocity premetric."""

    num_pairs: int = 10000
    pair_solver: str = "heun"
    pair_nfe: int = DEFAULT_TEACHER_NFE
    rounds: int = 1
    round_nfe: int = 16  # a later round's pairs: the previous round's student, pair_solver at this many evaluations
    steps_per_round: int = 1000
    premetric: str = "l2"
    huber_c: float | None = None  # rfpp's 0.00054 * dim when None


@dataclass
class DistillingFlowConfig(RectifiedFlowConfig):
    """A method with a distillation stage after its reflow rounds (InstaFlow, SlimFlow)."""

    reflow_weight: float = 1.0  # the reflow term kept in the distillation stage


class RectifiedFlowMethod(DistillationMethod):
    """Reflow rounds (then a distillation stage where ``distills``); see the module docstring. Subclasses choose
    :meth:`sample_times`, :meth:`coupled_noise`, :meth:`premetric` and :meth:`distill_losses`."""

    family = "flow"
    needs = frozenset({"teacher_pairs"})
    Config = RectifiedFlowConfig
    distills: ClassVar[bool] = False  # whether a distillation stage follows the reflow rounds

    def __init__(self, teacher: Denoiser, student: Denoiser, config: RectifiedFlowConfig):
        super().__init__(teacher, student, config)
        check_choice("pair_solver", config.pair_solver, TEACHER_SOLVERS)
        check_choice("premetric", config.premetric, self.premetric_choices())
        if min(config.num_pairs, config.pair_nfe, config.rounds, config.round_nfe, config.steps_per_round) < 1:
            raise ConfigError("method_args: num_pairs, pair_nfe, rounds, round_nfe and steps_per_round must be >= 1")
        if self.distills and config.reflow_weight < 0:
            raise ConfigError(f"method_args.reflow_weight must be >= 0, got {config.reflow_weight}")
        if config.huber_c is not None and config.huber_c <= 0:
            raise ConfigError(f"method_args.huber_c must be positive, got {config.huber_c}")
        self.huber_c = rfpp_huber_c(student.data_shape, config.huber_c)
        # The previous stage's student (frozen): it made the current pairs and, for SlimFlow, guides.
        self.previous = copy.deepcopy(student).requires_grad_(False).eval()
        own = config.num_pairs if self.stages > 1 else 0  # pairs made by the method itself after round one
        self.register_buffer("own_noise", torch.zeros(own, *student.data_shape))
        self.register_buffer("own_endpoint", torch.zeros(own, *student.data_shape))
        self.register_buffer("own_label", torch.arange(own) % max(student.num_classes, 1))
        self.register_buffer("stage", torch.tensor(0))
        self.register_buffer("updates_in_stage", torch.tensor(0))

    @classmethod
    def premetric_choices(cls) -> tuple[str, ...]:
        return PREMETRICS

    @classmethod
    def build_student(cls, teacher: Denoiser, config: RectifiedFlowConfig, new_backbone: Callable[[], nn.Module],
                      sigma_data: float) -> Denoiser:
        """A trainable copy of the teacher's denoiser (network and preconditioner, so an EDM or a flow-matching
        teacher keeps its parametrisation), or a fresh EDM-preconditioned ``new_backbone()`` for an analytic one."""
        inner = innermost(teacher)
        if getattr(inner, "backbone", None) is None:
            return EDMDenoiser(new_backbone(), sigma_data)
        return copy.deepcopy(inner).requires_grad_(True)

    @classmethod
    def stage_count(cls, rounds: int) -> int:
        return rounds + int(cls.distills)

    @property
    def stages(self) -> int:
        return self.stage_count(self.config.rounds)

    @classmethod
    def run_schedule(cls, steps: int, args: dict) -> dict:
        """The run's steps split evenly over the reflow rounds and the distillation stage."""
        rounds = args.get("rounds", RectifiedFlowConfig.rounds)
        return {"steps_per_round": max(1, steps // max(cls.stage_count(rounds), 1))}

    def pair_request(self) -> PairRequest:
        return PairRequest(self.config.num_pairs, self.config.pair_solver, self.config.pair_nfe)

    # --- the pieces subclasses choose --------------------------------------------------------------------------

    def sample_times(self, n: int, generator: torch.Generator, like: Tensor) -> Tensor:
        return uniform_times(n, generator, like)

    def coupled_noise(self, noise: Tensor, generator: torch.Generator) -> Tensor:
        """The noise a reflow step pairs with the endpoint (the pair's own here; SlimFlow anneals it)."""
        return noise

    def premetric(self, x0_prediction: Tensor, endpoint: Tensor, t: Tensor) -> Tensor:
        """Per-sample distance of the velocity residual (:func:`velocity_residual`)."""
        return velocity_distance(velocity_residual(x0_prediction, endpoint, t), self.config.premetric, self.huber_c)

    def distill_losses(self, pairs: Batch, generator: torch.Generator) -> dict[str, Tensor]:
        raise NotImplementedError

    # --- the stages --------------------------------------------------------------------------------------------

    def stage_pairs(self, batch: Batch, generator: torch.Generator) -> Batch:
        """The current stage's pairs: the teacher's (the batch) in round one, the method's own after it."""
        if int(self.stage) == 0:
            return batch
        index = torch.randint(0, self.own_noise.shape[0], (batch.size,), generator=generator).to(
            self.own_noise.device)
        cond = self.own_label[index] if self.student.num_classes > 0 else None
        return Batch(noise=self.own_noise[index], endpoint=self.own_endpoint[index], cond=cond)

    def reflow_losses(self, pairs: Batch, generator: torch.Generator) -> dict[str, Tensor]:
        """``E_t premetric(v_theta(z_t, t) - (z - x))`` on the straight line between the pair's ends."""
        endpoint = pairs.endpoint
        noise = self.coupled_noise(pairs.noise, generator)
        t = self.sample_times(endpoint.shape[0], generator, endpoint)
        s = ve_level(t)
        prediction = self.student(straight_point(endpoint, noise, s), s, pairs.cond)
        return {"loss": self.premetric(prediction, endpoint, t).mean()}

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        pairs = self.stage_pairs(batch, generator)
        stage = int(self.stage)
        if stage < self.config.rounds:
            values = self.reflow_losses(pairs, generator)
        else:
            values = self.distill_losses(pairs, generator)
            if self.config.reflow_weight > 0:
                reflow = self.reflow_losses(pairs, generator)["loss"]
                values = {**values, "loss": values["loss"] + self.config.reflow_weight * reflow, "reflow": reflow}
        return {**values, "stage": torch.tensor(float(stage), device=pairs.endpoint.device)}

    @torch.no_grad()
    def make_own_pairs(self) -> None:
        """Pairs of the previous stage's student from fresh noise (seeded by the stage), solved with
        ``pair_solver`` at ``round_nfe`` evaluations; labels cycle through the classes."""
        noise = torch.randn(self.own_noise.shape, generator=torch.Generator().manual_seed(1000 + int(self.stage)))
        noise = noise.to(self.own_noise)
        labels = self.own_label if self.student.num_classes > 0 else None
        self.own_noise.copy_(noise)
        self.own_endpoint.copy_(solve_pairs(self.previous, noise, labels, self.config.pair_solver,
                                            self.config.round_nfe))

    @torch.no_grad()
    def after_update(self, phase: str, step: int) -> bool:
        """Count the stage's updates; at its end (not the last stage's) freeze the student as ``previous``, make
        the next stage's pairs from it, and reset the optimizer."""
        if phase != "student":
            return False
        self.updates_in_stage += 1
        if int(self.updates_in_stage) < self.config.steps_per_round or int(self.stage) + 1 >= self.stages:
            return False
        self.previous.load_state_dict(self.student.state_dict())
        self.stage += 1
        self.updates_in_stage.zero_()
        self.make_own_pairs()
        return True

    def train(self, mode: bool = True) -> RectifiedFlowMethod:
        super().train(mode)
        self.previous.eval()
        return self

    def sampling(self, nfe: int) -> Sampling:
        """Euler (straight segments in rectified-flow time) on levels evenly spaced in ``t`` from ``T_MAX``."""
        return Sampling("euler", uniform_t_levels(nfe))
