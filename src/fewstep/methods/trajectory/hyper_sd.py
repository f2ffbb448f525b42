"""Hyper-SD's Trajectory Segmented Consistency Distillation (TSCD). Ren et al., "Hyper-SD: Trajectory Segmented
Consistency Model for Efficient Image Synthesis", 2024.

The Karras grid ``s_0 = s_max > s_1 > ... > s_{N-1} = s_min`` is cut into ``K`` segments of ``m = (N - 1) / K``
intervals, with edges ``e_i = s_{i m}``. Within a segment the student is a consistency function that maps to
the segment's *lower* edge, not to the data: for a level ``s`` inside the segment whose lower edge is ``e``,
the student's clean-sample estimate ``g_theta`` (the teacher's EDM network, copied) is read as one DDIM jump::

    f_theta(x, s, e) = (e / s) x + (1 - e / s) g_theta(x, s),        so f_theta(x, e, e) = x exactly.

With ``j ~ U{0, ..., N-2}``, ``e`` the lower edge of the segment that contains the interval ``(s_{j+1}, s_j]``::

    x_hi  = x0 + s_j eps                                        (real data x0)
    x_lo  = Heun_teacher(x_hi, s_j -> s_{j+1})                  (one 2nd-order step of the original teacher)
    L     = E[ d( f_theta(x_hi, s_j, e), sg f_theta-(x_lo, s_{j+1}, e) ) ]
    theta- <- mu theta- + (1 - mu) theta                        (EMA target network)

When ``s_{j+1} = e`` the target is ``x_lo`` itself (the boundary condition), which anchors every segment.
``d`` is CD's pseudo-Huber (or squared L2) distance, on the states at the edge. Stages halve ``K``:
8 -> 4 -> 2 -> 1 (from ``start_segments``), ``steps_per_stage`` updates each; the last stage (``K = 1``, edge
``s_min``: plain consistency distillation) runs until training ends. A new stage keeps the student's weights
(its initialisation is the previous stage's student), restarts the EMA target from them, and resets the
optimizer (``after_update`` returns True).

Choice of teacher across stages: the solver step always uses the *original* teacher, as in the paper's loss
(a teacher ODE step, a stop-gradient target network); only the student and its target carry over between
stages. Using the previous stage's student as the solver (as progressive distillation does) would compound
its errors into every later stage.

Sampling, from the final (one-segment) student: at ``n`` NFE, multistep consistency sampling (evaluate
``g_theta``, re-noise with fresh noise) at the upper edges of an ``n``-segment cut of the grid,
``karras_sigmas(n + 1)[:-1]`` (for ``n`` dividing ``N - 1`` these are exactly the nested segment edges of the
training stages), like the LCM/TCD schedulers Hyper-SD is used with. 1 NFE is ``g_theta(s_max z, s_max)``.
The sample is ``g_theta``, which differs from the trained map to the last edge, ``f(x, s, s_min)``, by
``(s_min / s)(x - g_theta)``: below the ``s_min`` noise the grid ends at.

Out of scope (not implemented): Hyper-SD's adversarial loss, human-feedback learning (reward models) and the
score-distillation (DMD) stage for 1 step; LoRA training (we fine-tune the whole network); the TCD ``gamma``
sampler. The teacher step is Heun in the VE coordinate rather than DDIM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.methods.base import DistillationMethod, MethodConfig, teacher_backbone_copy
from fewstep.methods.losses import (
    DISTANCES,
    check_choice,
    check_rate,
    default_huber_c,
    distance,
    ema_update_,
    target_copy,
)
from fewstep.models.denoiser import Denoiser, EDMDenoiser
from fewstep.paths import bcast
from fewstep.solvers import SIGMA_MAX, SIGMA_MIN, Sampling, heun_step, karras_sigmas


@dataclass
class HyperSDConfig(MethodConfig):
    num_scales: int = 33
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = 7.0
    target_ema: float = 0.95
    distance: str = "pseudo_huber"
    huber_c: float | None = None
    start_segments: int = 8
    steps_per_stage: int = 500


def segment_map(denoiser: Denoiser, x: Tensor, s: Tensor, edge: Tensor, cond=None) -> Tensor:
    """``f(x, s, edge) = (edge / s) x + (1 - edge / s) D(x, s)``: one DDIM jump to the segment edge with the
    denoiser's clean-sample estimate; exactly ``x`` when ``s == edge``."""
    ratio = bcast(edge / s, x)
    return ratio * x + (1 - ratio) * denoiser(x, s, cond)


class HyperSD(DistillationMethod):
    name = "hyper_sd"
    family = "trajectory"
    paper = "Ren et al. 2024, Hyper-SD: Trajectory Segmented Consistency Model for Efficient Image Synthesis"
    Config = HyperSDConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: HyperSDConfig):
        super().__init__(teacher, student, config)
        check_choice("distance", config.distance, DISTANCES)
        check_rate("target_ema", config.target_ema)
        start = config.start_segments
        if start < 1 or start & (start - 1):
            raise ConfigError(f"method_args.start_segments must be a power of two, got {start}")
        if (config.num_scales - 1) % start:
            raise ConfigError(f"method_args.num_scales - 1 must be a multiple of start_segments ({start}), got "
                             f"num_scales = {config.num_scales}")
        if config.steps_per_stage < 1:
            raise ConfigError(f"method_args.steps_per_stage must be >= 1, got {config.steps_per_stage}")
        self.target = target_copy(student)
        self.register_buffer("grid", karras_sigmas(config.num_scales, config.sigma_min, config.sigma_max,
                                                   config.rho, dtype=torch.float32))
        self.huber_c = default_huber_c(student, config.huber_c)
        # Stage counters are buffers so that a checkpoint resumes in the right stage.
        self.register_buffer("stage_index", torch.tensor(0))
        self.register_buffer("updates_in_stage", torch.tensor(0))

    @classmethod
    def run_schedule(cls, steps: int, args: dict) -> dict:
        """The run's steps split evenly over the stages (``start_segments``, halved down to 1)."""
        stages = args.get("start_segments", HyperSDConfig.start_segments).bit_length()
        return {"steps_per_stage": max(1, steps // stages)}

    @classmethod
    def build_student(cls, teacher: Denoiser, config: HyperSDConfig, new_backbone: Callable[[], nn.Module],
                      sigma_data: float) -> Denoiser:
        """The teacher's EDM network (or a new one): at the start every segment map is a teacher DDIM jump."""
        return EDMDenoiser(teacher_backbone_copy(teacher) or new_backbone(), sigma_data)

    @property
    def segments(self) -> int:
        """Number of segments in the current stage."""
        return max(1, self.config.start_segments // 2 ** int(self.stage_index))

    def lower_edge_index(self, index: Tensor) -> Tensor:
        """Grid index of the lower edge of the segment holding the interval ``(s_{index+1}, s_index]``."""
        per_segment = (self.config.num_scales - 1) // self.segments
        return (torch.div(index, per_segment, rounding_mode="floor") + 1) * per_segment

    def teacher_step(self, x: Tensor, s: Tensor, s_next: Tensor, cond) -> Tensor:
        """One Heun step of the original teacher's probability-flow ODE from ``s`` to ``s_next`` (both > 0)."""
        return heun_step(lambda y, level: self.teacher(y, level, cond), x, s, s_next)

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        x0, cond = batch.x0, batch.cond
        index = torch.randint(0, self.config.num_scales - 1, (x0.shape[0],), generator=generator, device=x0.device)
        s_hi, s_lo = self.grid[index].to(x0), self.grid[index + 1].to(x0)
        edge = self.grid[self.lower_edge_index(index)].to(x0)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device).to(x0)
        x_hi = x0 + bcast(s_hi, x0) * eps
        with torch.no_grad():
            x_lo = self.teacher_step(x_hi, s_hi, s_lo, cond)
            target = segment_map(self.target, x_lo, s_lo, edge, cond)
        prediction = segment_map(self.student, x_hi, s_hi, edge, cond)
        return {"loss": distance(prediction, target, self.config.distance, self.huber_c).mean(),
                "segments": torch.tensor(float(self.segments), device=x0.device)}

    @torch.no_grad()
    def after_update(self, phase: str, step: int) -> bool:
        ema_update_(self.target, self.student, self.config.target_ema)
        self.updates_in_stage += 1
        if self.segments == 1 or int(self.updates_in_stage) < self.config.steps_per_stage:
            return False
        self.stage_index += 1
        self.updates_in_stage.zero_()
        self.target.load_state_dict(self.student.state_dict())
        return True

    def sampling(self, nfe: int) -> Sampling:
        levels = karras_sigmas(nfe + 1, self.config.sigma_min, self.config.sigma_max, self.config.rho)[:-1]
        return Sampling("consistency", levels.tolist())
