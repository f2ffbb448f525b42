"""Trajectory-Backward Consistency Model (TBCM): image-free consistency distillation on the teacher's own
sampling trajectories. After "Image-Free Timestep Distillation via Continuous-Time Consistency with
Trajectory-Sampled Pairs" (2025, code hustvl/TBCM).

No real data: training states come from teacher ODE solves started at noise. On the Karras grid
``s_0 = s_max > ... > s_{N-1} = s_min`` each rollout records the whole Heun trajectory

    x_{s_0} = s_max z,   x_{s_{i+1}} = Heun_teacher(x_{s_i}, s_i -> s_{i+1})          (z ~ N(0, I))

and the loss is CD's (:mod:`consistency_distillation`) on consecutive recorded states, whose teacher step
is therefore already paid for: with a trajectory ``x`` from the pool and ``i ~ U{0, ..., N-2}``::

    L = E[ d( f_theta(x_{s_i}, s_i), sg f_theta-(x_{s_{i+1}}, s_{i+1}) ) ]

Rollouts are cached: each step rolls out ``rollouts_per_step`` trajectories from the batch's noise into a
first-in-first-out pool of ``pool_size`` trajectories, and the batch's training pairs are drawn from the
pool (``rollouts_per_step = pool_size = batch size`` is the paper's fresh rollout every step). Each rollout
costs ``2 (N - 1)`` teacher evaluations, counted in ``teacher_evals``; the loss itself calls no teacher.

Deviations from the paper: the paper applies the continuous-time sCM loss (TrigFlow, tangents from the
stored ``dx/dt``, adaptive weighting, tangent warm-up) on jittered shifted-flow-matching times, with a
black-image filter; here it is discrete CD on the fixed Karras grid with an EMA target. The paper drops the
pure-noise first state; here it is kept, since discrete CD learns the one-step map at ``s_max`` from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.data.batch import Batch
from fewstep.errors import ConfigError, DataError
from fewstep.methods.consistency.consistency_distillation import CDConfig, ConsistencyDistillation
from fewstep.methods.losses import distance
from fewstep.models.denoiser import Denoiser


@dataclass
class TBCMConfig(CDConfig):
    pool_size: int = 4096
    rollouts_per_step: int = 32


class TrajectoryBackwardConsistency(ConsistencyDistillation):
    name = "tbcm"
    family = "consistency"
    paper = "2025, Image-Free Timestep Distillation via Continuous-Time Consistency with Trajectory-Sampled Pairs"
    needs = frozenset({"noise"})
    Config = TBCMConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: TBCMConfig):
        super().__init__(teacher, student, config)
        if config.pool_size < 1:
            raise ConfigError(f"method_args.pool_size must be >= 1, got {config.pool_size}")
        if not 1 <= config.rollouts_per_step <= config.pool_size:
            raise ConfigError(f"method_args.rollouts_per_step must be in [1, pool_size={config.pool_size}], "
                              f"got {config.rollouts_per_step}")
        shape = (config.pool_size, config.num_scales, *student.data_shape)
        self.register_buffer("pool", torch.zeros(shape))
        self.register_buffer("pool_label", torch.full((config.pool_size,), student.num_classes, dtype=torch.long))
        self.register_buffer("pool_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("pool_next", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def rollout(self, noise: Tensor, cond) -> Tensor:
        """The teacher's Heun trajectories from ``noise`` down the grid: shape ``(B, N, *data_shape)``."""
        x = noise * self.grid[0]
        states = [x]
        for s, s_next in zip(self.grid[:-1], self.grid[1:], strict=True):
            x = self.teacher_step(x, s.expand(x.shape[0]).to(x), s_next.expand(x.shape[0]).to(x), cond)
            states.append(x)
        return torch.stack(states, dim=1)

    @torch.no_grad()
    def add_rollouts(self, noise: Tensor, cond: Tensor | None) -> None:
        """Roll out trajectories from ``noise`` into the pool, overwriting the oldest."""
        count = noise.shape[0]
        slots = (self.pool_next + torch.arange(count, device=self.pool.device)) % self.config.pool_size
        self.pool[slots] = self.rollout(noise, cond).to(self.pool)
        if cond is not None:
            self.pool_label[slots] = cond.to(self.pool_label)
        self.pool_next.copy_((self.pool_next + count) % self.config.pool_size)
        self.pool_filled.copy_(torch.clamp(self.pool_filled + count, max=self.config.pool_size))

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        if batch.noise is None:
            raise ValueError("tbcm trains on noise only: the batch must carry noise")
        if batch.cond is not None and not isinstance(batch.cond, Tensor):
            raise DataError("tbcm's trajectory pool keeps class labels; it cannot hold text conditions")
        fresh = min(self.config.rollouts_per_step, batch.size)
        self.add_rollouts(batch.noise[:fresh], None if batch.cond is None else batch.cond[:fresh])
        device = self.pool.device
        which = (torch.rand(batch.size, generator=generator, device=device) * self.pool_filled).long()
        index = torch.randint(0, self.config.num_scales - 1, (batch.size,), generator=generator, device=device)
        x_hi, x_lo = self.pool[which, index], self.pool[which, index + 1]
        cond = self.pool_label[which] if batch.cond is not None else None
        with torch.no_grad():
            target = self.target(x_lo, self.grid[index + 1], cond)
        prediction = self.student(x_hi, self.grid[index], cond)
        return {"loss": distance(prediction, target, self.config.distance, self.huber_c).mean()}
