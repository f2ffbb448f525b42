"""Progressive Distillation (PD). Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion
Models", ICLR 2022.

Rounds halve the number of sampling steps. In a round with an ``N``-step student grid
``s_0 > s_1 > ... > s_N = 0`` (every other level of the ``2N``-step grid, whose midpoints are ``s_{i+1/2}``),
the round's teacher (the original teacher in round one, then the previous round's student) takes two
deterministic DDIM steps, and the student learns to take them in one::

    x      = x0 + s_i eps
    x'     = DDIM_teacher(x,  s_i -> s_{i+1/2});   x'' = DDIM_teacher(x', s_{i+1/2} -> s_{i+1})
    x0~    = (s_i x'' - s_{i+1} x) / (s_i - s_{i+1})     (the x0 whose single DDIM step lands on x'')
    L      = E[ w(s_i) |x0_theta(x, s_i) - x0~|^2 ],   w = sigma_data^2 / s^2 + 1  ("SNR + 1")

DDIM is Euler in the VE coordinate (:func:`fewstep.solvers.sample_euler`), so the target formula is path
free. After ``steps_per_round`` updates the student becomes the teacher, ``N`` halves and the optimizer
state is reset, until ``N = final_steps``; further updates keep refining the final round.

Parametrisation: the student is the teacher's EDM-preconditioned network, initialised from its weights.
EDM's output ``F`` at ``sigma_data = 1`` is exactly minus the v-prediction of the VP path with
``alpha = 1 / sqrt(1 + s^2)`` (for other ``sigma_data``, of the data scaled by ``1 / sigma_data``), so this is
the v-prediction the paper requires for stability at low signal-to-noise ratio. Deviation: the grid is
EDM's Karras schedule with ``s_max = 80`` rather than the cosine schedule's zero-SNR endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.data.batch import Batch
from fewstep.methods.base import DistillationMethod, MethodConfig
from fewstep.methods.losses import target_copy
from fewstep.models.denoiser import Denoiser
from fewstep.paths import bcast
from fewstep.solvers import SIGMA_MAX, SIGMA_MIN, Sampling, append_zero, euler_step, karras_sigmas


@dataclass
class PDConfig(MethodConfig):
    start_steps: int = 64
    final_steps: int = 4
    steps_per_round: int = 500
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = 7.0


class ProgressiveDistillation(DistillationMethod):
    name = "pd"
    family = "trajectory"
    paper = "Salimans & Ho 2022, Progressive Distillation for Fast Sampling of Diffusion Models"
    Config = PDConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: PDConfig):
        super().__init__(teacher, student, config)
        start, final = config.start_steps, config.final_steps
        if final < 1 or start < 2 * final or start % final or (start // final) & (start // final - 1):
            raise ValueError(f"start_steps / final_steps must be a power of two >= 2, got {start} / {final}")
        self.register_buffer("base_grid", append_zero(karras_sigmas(start, config.sigma_min, config.sigma_max,
                                                                    config.rho, dtype=torch.float32)))
        # The previous round's student (unused in round 0, where the teacher itself is distilled). Round
        # counters are buffers so that a checkpoint resumes in the right round.
        self.previous_student = target_copy(student).eval()
        self.register_buffer("round_index", torch.tensor(0))
        self.register_buffer("updates_in_round", torch.tensor(0))

    @staticmethod
    def halvings(start_steps: int, final_steps: int) -> int:
        """Rounds from ``start_steps`` down to ``final_steps``, each halving the steps."""
        return (start_steps // final_steps).bit_length() - 1

    @classmethod
    def run_schedule(cls, steps: int, args: dict) -> dict:
        """The run's steps split evenly over the halving rounds."""
        defaults = PDConfig()
        rounds = cls.halvings(args.get("start_steps", defaults.start_steps), args.get("final_steps",
                                                                                       defaults.final_steps))
        return {"steps_per_round": max(1, steps // max(rounds, 1))}  # __init__ refuses a start with no rounds

    @property
    def student_steps(self) -> int:
        """Sampling steps the student is learning in the current round."""
        return self.config.start_steps // 2 ** (int(self.round_index) + 1)

    @property
    def round_teacher(self) -> Denoiser:
        return self.teacher if int(self.round_index) == 0 else self.previous_student

    @property
    def rounds(self) -> int:
        """Number of halving rounds from ``start_steps`` to ``final_steps``."""
        return self.halvings(self.config.start_steps, self.config.final_steps)

    def grid(self, steps: int) -> Tensor:
        """The ``steps``-step grid (``steps + 1`` levels ending at 0), nested in the base grid."""
        return self.base_grid[:: self.config.start_steps // steps]

    def teacher_step(self, x: Tensor, s: Tensor, s_next: Tensor, cond) -> Tensor:
        """One DDIM step of the round's teacher from ``s`` to ``s_next``."""
        return euler_step(lambda y, level: self.round_teacher(y, level, cond), x, s, s_next)

    def two_step_target(self, x: Tensor, s: Tensor, s_mid: Tensor, s_next: Tensor, cond) -> Tensor:
        """The x0 whose single DDIM step ``s -> s_next`` lands where two DDIM steps of the round's teacher land."""
        x_next = self.teacher_step(self.teacher_step(x, s, s_mid, cond), s_mid, s_next, cond)
        return (bcast(s, x) * x_next - bcast(s_next, x) * x) / bcast(s - s_next, x)

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        x0, cond = batch.x0, batch.cond
        fine = self.grid(2 * self.student_steps).to(x0)
        index = torch.randint(0, self.student_steps, (x0.shape[0],), generator=generator, device=x0.device)
        s, s_mid, s_next = fine[2 * index], fine[2 * index + 1], fine[2 * index + 2]
        eps = torch.randn(x0.shape, generator=generator, device=x0.device).to(x0)
        x = x0 + bcast(s, x0) * eps
        with torch.no_grad():
            target = self.two_step_target(x, s, s_mid, s_next, cond)
        weight = self.student.sigma_data**2 / s**2 + 1.0
        error = (self.student(x, s, cond) - target).flatten(1).pow(2).mean(1)
        student_steps = torch.tensor(float(self.student_steps), device=x0.device)
        return {"loss": (weight * error).mean(), "student_steps": student_steps}

    @torch.no_grad()
    def after_update(self, phase: str, step: int) -> bool:
        self.updates_in_round += 1
        if int(self.updates_in_round) < self.config.steps_per_round or self.student_steps <= self.config.final_steps:
            return False
        self.previous_student.load_state_dict(self.student.state_dict())
        self.round_index += 1
        self.updates_in_round.zero_()
        return True

    def train(self, mode: bool = True) -> ProgressiveDistillation:
        super().train(mode)
        self.previous_student.eval()
        return self

    def sampling(self, nfe: int) -> Sampling:
        """DDIM on the student's grid when ``nfe`` is a grid size it was trained for, else on Karras levels."""
        if nfe <= self.config.start_steps and self.config.start_steps % nfe == 0:
            return Sampling("euler", self.grid(nfe).tolist())
        return Sampling("euler", append_zero(karras_sigmas(nfe, self.config.sigma_min, self.config.sigma_max,
                                                           self.config.rho)).tolist())
