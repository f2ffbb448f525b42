"""Latent Consistency Models (LCM). Luo, Tan, Huang, Li & Zhao, "Latent Consistency Models: Synthesizing
High-Resolution Images with Few-Step Inference", 2023.

Consistency distillation of the *guided* teacher ODE, with the guidance weight ``w`` a student input, so
one network serves a range of guidance scales. On the Karras grid ``s_0 = s_max > ... > s_{N-1} = s_min``
with a skip ``k``, ``i ~ U{0, ..., N-1-k}`` and ``w ~ U[w_min, w_max]`` per sample::

    x_hi  = x0 + s_i eps                                            (real data x0, label c)
    D_w   = D(x, s, null) + w (D(x, s, c) - D(x, s, null))            (CFG, "cfg" convention)
    x_lo  = DDIM_{D_w}(x_hi, s_i -> s_{i+k})                          (one skipping teacher step)
    L     = E[ d( f_theta(x_hi, s_i, c, w), sg f_theta-(x_lo, s_{i+k}, c, w) ) ]
    theta- <- mu theta- + (1 - mu) theta                             (EMA target network)

``f`` is the consistency parametrisation (``f(x, s_min) = x``) around a copy of the teacher's network with
one extra scalar input, the weight ``w``, whose embedding starts at zero (so the student starts as the
teacher whatever ``w``). ``d`` is the pseudo-Huber or squared L2 distance of
:mod:`~fewstep.methods.losses`. DDIM is Euler in the VE coordinate; because it is linear in
the x0-prediction, DDIM on ``D_w`` equals the paper's augmented-ODE step
``x + (1 + w') Phi(x, c) - w' Phi(x, null)`` (its ``w'`` is ours minus one). On an unconditional teacher
``w`` has nothing to act on and LCM is CD with a skipping DDIM step.

Guidance values in the config (``guidance_min``, ``guidance_max``, ``sampling_guidance``) are read in
``guidance_convention`` (see :mod:`fewstep.guidance`); the network sees the ``"cfg"`` weight. The exported
student is the network with ``w`` fixed at ``sampling_guidance`` (default: the teacher's own guidance),
sampled by multistep consistency sampling as CD.

Deviations from the paper: no latent space (the data are the teacher's space); the grid is EDM's Karras
schedule instead of the 1000-step DDPM grid (the skip counts levels of that grid); ``w`` enters through the
backbone's extra-condition embedding (sinusoidal features of ``w``) rather than SD's timestep-style
embedding; ``teacher_solver = "heun"`` is offered besides DDIM (the paper also tried other ODE solvers).
On a diffusers teacher (whose network takes no extra input) the student is LCM-LoRA's: no ``w`` input, the
teacher guided at the one weight ``sampling_guidance`` (``guidance_min`` and ``guidance_max`` are unused), the
consistency coefficients around the teacher's own prediction (:class:`~fewstep.models.denoiser.BoundaryDenoiser`),
and with ``lora_rank`` only a LoRA adapter trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.guidance import CONVENTIONS, GuidedDenoiser, cfg_weight
from fewstep.methods.base import DistillationMethod, MethodConfig, consistency_student
from fewstep.methods.losses import (
    DISTANCES,
    ODE_STEPS,
    check_choice,
    check_rate,
    default_huber_c,
    distance,
    ema_update_,
    multistep_sigmas,
    ode_step,
    target_copy,
)
from fewstep.models.denoiser import BoundaryDenoiser, Denoiser, FixedExtraDenoiser, innermost
from fewstep.paths import bcast
from fewstep.solvers import SIGMA_MAX, SIGMA_MIN, Sampling, karras_sigmas


@dataclass
class LCMConfig(MethodConfig):
    num_scales: int = 61
    skip: int = 3
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = 7.0
    teacher_solver: str = "euler"
    guidance_min: float = 1.0
    guidance_max: float = 3.0
    guidance_convention: str = "cfg"
    sampling_guidance: float | None = None
    target_ema: float = 0.95
    distance: str = "pseudo_huber"
    huber_c: float | None = None
    sampling_sigma_min: float = 0.1


class LatentConsistency(DistillationMethod):
    name = "lcm"
    family = "consistency"
    paper = "Luo et al. 2023, Latent Consistency Models"
    Config = LCMConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: LCMConfig):
        guided = teacher if isinstance(teacher, GuidedDenoiser) else GuidedDenoiser(innermost(teacher))
        super().__init__(guided, student, config)
        check_choice("distance", config.distance, DISTANCES)
        check_rate("target_ema", config.target_ema)
        check_choice("teacher_solver", config.teacher_solver, ODE_STEPS)
        check_choice("guidance_convention", config.guidance_convention, CONVENTIONS)
        if not 1 <= config.skip <= config.num_scales - 1:
            raise ConfigError(f"method_args.skip must be in [1, num_scales - 1 = {config.num_scales - 1}], "
                              f"got {config.skip}")
        if config.guidance_min > config.guidance_max:
            raise ConfigError(f"method_args.guidance_min ({config.guidance_min}) must not exceed guidance_max "
                              f"({config.guidance_max})")
        self.takes_weight = not isinstance(student, BoundaryDenoiser)
        if self.takes_weight and len(getattr(student.backbone, "extra_embeddings", ())) != 1:
            raise ConfigError("the LCM student's backbone needs exactly one extra condition (the guidance weight): "
                              "build it with LatentConsistency.build_student")
        self.sampling_weight = (guided.weight if config.sampling_guidance is None
                                else cfg_weight(config.sampling_guidance, config.guidance_convention))
        self.weight_range = (cfg_weight(config.guidance_min, config.guidance_convention),
                             cfg_weight(config.guidance_max, config.guidance_convention)) if self.takes_weight else (
            self.sampling_weight, self.sampling_weight)
        self.target = target_copy(student)
        self.register_buffer("grid", karras_sigmas(config.num_scales, config.sigma_min, config.sigma_max,
                                                   config.rho, dtype=torch.float32))
        self.huber_c = default_huber_c(student, config.huber_c)

    @classmethod
    def build_student(cls, teacher: Denoiser, config: LCMConfig, new_backbone: Callable[[], nn.Module],
                      sigma_data: float) -> Denoiser:
        """The teacher's network (or a new one) with one zero-initialised extra input for the guidance weight,
        and consistency coefficients: ``f(x, sigma_min, cond, w) = x``; a diffusers teacher's copy, which takes no
        extra input, at one guidance weight (LCM-LoRA's form)."""
        return consistency_student(teacher, new_backbone, sigma_data, config.sigma_min, extra_conditions=1)

    def guided_teacher(self, x: Tensor, s: Tensor, cond, weight: Tensor) -> Tensor:
        """The teacher's x0-prediction guided at the per-sample ``"cfg"`` weights ``weight`` (one evaluation per
        sample; unguided without a condition)."""
        return self.teacher(x, s, cond, weight=weight)

    def skipping_step(self, x: Tensor, s: Tensor, s_next: Tensor, cond, weight: Tensor) -> Tensor:
        """The guided teacher's ODE step from ``s`` to ``s_next`` (``skip`` levels down the grid)."""
        return ode_step(lambda y, level: self.guided_teacher(y, level, cond, weight), x, s, s_next,
                        self.config.teacher_solver)

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        x0, cond, k = batch.x0, batch.cond, self.config.skip
        index = torch.randint(0, self.config.num_scales - k, (x0.shape[0],), generator=generator,
                              device=x0.device)
        s_hi, s_lo = self.grid[index].to(x0), self.grid[index + k].to(x0)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device).to(x0)
        w_min, w_max = self.weight_range
        weight = w_min + (w_max - w_min) * torch.rand(x0.shape[0], generator=generator, device=x0.device).to(x0)
        x_hi = x0 + bcast(s_hi, x0) * eps
        extra = (weight[:, None],) if self.takes_weight else ()
        with torch.no_grad():
            x_lo = self.skipping_step(x_hi, s_hi, s_lo, cond, weight)
            target = self.target(x_lo, s_lo, cond, *extra)
        prediction = self.student(x_hi, s_hi, cond, *extra)
        return {"loss": distance(prediction, target, self.config.distance, self.huber_c).mean()}

    def after_update(self, phase: str, step: int) -> bool:
        ema_update_(self.target, self.student, self.config.target_ema)
        return False

    def student_denoiser(self) -> Denoiser:
        """The student at the sampling guidance weight: a plain ``(x, s, cond)`` denoiser sharing its weights."""
        return FixedExtraDenoiser(self.student, [self.sampling_weight]) if self.takes_weight else self.student

    def sampling(self, nfe: int) -> Sampling:
        levels = multistep_sigmas(nfe, self.config.sigma_max, self.config.sampling_sigma_min)
        return Sampling("consistency", levels)
