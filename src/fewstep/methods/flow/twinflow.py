"""TwinFlow: self-adversarial flows. Cheng, Sun, Li & Lin, "TwinFlow: Realizing One-step Generation on Large
Models with Self-adversarial Flows", 2025 (code inclusionAI/TwinFlow, ``src/methodes/twinflow/twinflow.py``).

One network, three readings of it, told apart by two zero-initialised scalar inputs ``(jump, fake)`` of a backbone
with consistency coefficients (EDM's preconditioning with ``net(x, sigma_min) = x`` exactly, the boundary the
jump needs; the paper's target-time and negative-time embeddings)::

    D_real(x, s) = net(x, s; 0, 0)    the real trajectory's denoiser (its velocity (x - D)/s)
    f(x, s)      = net(x, s; 1, 0)    the jump to time 0 along the real trajectory: the generator
    D_fake(x, s) = net(x, s; 0, 1)    the twin ("negative time") trajectory's denoiser: noise <-> its own samples

With ``x_g = f(sigma_max z, sigma_max)``, on a Karras grid ``s_0 > ... > s_{N-1}`` (``t = s_i``, ``u = s_{i+1}``), per
batch of real data ``x0``::

    L_cons  = d( f(x0 + t eps, t), sg f-(Euler_real(x0 + t eps, t -> u), u) )            (real trajectory)
    L_fake  = lambda(sigma) mean_D || D_fake(sg x_g + sigma eps, sigma) - sg x_g ||^2     (twin trajectory)
    L_rect  = 1/2 mean_D || x_g - sg(x_g - clamp(D_fake(x) - V_real(x), +-c)) ||^2,  x = sg x_g + sigma eps
    L_flow  = lambda(sigma) mean_D || D_real(x0 + sigma eps, sigma) - x0 ||^2              (velocity: self only)
    L       = L_cons + fake_weight L_fake + rectify_weight L_rect [+ flow_weight L_flow]

``f-`` is the jump reading of an EMA copy of the network (``theta- <- mu theta- + (1 - mu) theta``, ``mu =
target_ema``), ``Euler_real`` one DDIM step along the real velocity and ``V_real`` the real denoiser, both
without gradient:

* ``velocity: teacher`` (fewstep's default, a distillation): the frozen teacher ``D``. The network's twin branches
  are then the generator and its own fake score; the rectification is DMD's step with the fake score living in the
  generator's own weights;
* ``velocity: self`` (the paper's setting, "no fixed teacher"): the network's own ``D_real``, which ``L_flow``
  trains by flow matching on the data; the teacher is never called.

``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2`` is EDM's weight, ``sigma`` drawn by index from DMD2's Karras grid
(the rectification's from its ``[0.02, 0.98]`` part), ``d`` pseudo-Huber or squared L2. Teacher evaluations per
sample: 2 with ``velocity: teacher`` (the Euler step and the rectification), 0 with ``self``. Sampling: the jump to
0, re-noised at Karras levels (:func:`~fewstep.solvers.sample_consistency`; the paper's UCGM sampler at
``stochast_ratio`` 1).

Deviations from the code: the target time is restricted to ``tt in {t, 0}`` (``jump`` 0 or 1), because sampling
only jumps to 0; the four buckets (end-to-end, small jumps, any jumps, adversarial) become one batch in which every
term is taken; the recursive RCGM target (two steps) is a one-step consistency target of the EMA network; no
CFG-enhanced target (a guided teacher is distilled with its own scale); EDM weights and pseudo-Huber or L2 instead
of the tangent time weighting and the Barron-reweighted L2; the rectification's clamp is in clean-sample units
(``rectify_clamp``), not velocity units; the negative-time embedding is a second extra input, not a sign of the
time.
"""

from __future__ import annotations

import copy
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
    edm_weight,
    ema_update_,
    squared_l2,
)
from fewstep.methods.scores import fake_score_loss, karras_index_sigma, noised, pseudo_target_loss
from fewstep.models.denoiser import ConsistencyDenoiser, Denoiser, FixedExtraDenoiser
from fewstep.nets import add_extra_conditions
from fewstep.solvers import SIGMA_MAX, SIGMA_MIN, Sampling, euler_step, karras_sigmas, solver_sigmas

VELOCITIES = ("teacher", "self")
REAL, JUMP, FAKE = (0.0, 0.0), (1.0, 0.0), (0.0, 1.0)  # the (jump, fake) inputs of the three readings


@dataclass
class TwinFlowConfig(MethodConfig):
    velocity: str = "teacher"  # where the real trajectory's velocity comes from: the teacher, or the network itself
    num_scales: int = 18
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = 7.0
    target_ema: float = 0.95
    distance: str = "pseudo_huber"
    huber_c: float | None = None
    fake_weight: float = 1.0
    rectify_weight: float = 0.5  # the code's dist_match_cof
    rectify_clamp: float = 1.0
    flow_weight: float = 1.0  # velocity: self only


class TwinFlow(DistillationMethod):
    name = "twinflow"
    family = "flow"
    paper = "Cheng et al. 2025, TwinFlow: Realizing One-step Generation on Large Models with Self-adversarial Flows"
    needs = frozenset({"data"})
    Config = TwinFlowConfig

    def __init__(self, teacher: Denoiser, student: ConsistencyDenoiser, config: TwinFlowConfig):
        super().__init__(teacher, student, config)
        check_choice("velocity", config.velocity, VELOCITIES)
        check_choice("distance", config.distance, DISTANCES)
        check_rate("target_ema", config.target_ema)
        if config.num_scales < 2:
            raise ConfigError(f"method_args.num_scales must be >= 2, got {config.num_scales}")
        if min(config.fake_weight, config.rectify_weight, config.flow_weight) < 0 or config.rectify_clamp <= 0:
            raise ConfigError("method_args: fake_weight, rectify_weight and flow_weight must be >= 0, rectify_clamp "
                              "> 0")
        if len(getattr(student.backbone, "extra_embeddings", ())) != 2:
            raise ConfigError("a TwinFlow student needs a backbone with two extra conditions (jump, fake): build it "
                              "with TwinFlow.build_student")
        grid = karras_sigmas(config.num_scales, config.sigma_min, config.sigma_max, config.rho, dtype=torch.float32)
        self.register_buffer("grid", grid)
        self.target = copy.deepcopy(student).requires_grad_(False)
        self.huber_c = default_huber_c(student, config.huber_c)

    @classmethod
    def build_student(cls, teacher: Denoiser, config: TwinFlowConfig, new_backbone: Callable[[], nn.Module],
                      sigma_data: float) -> ConsistencyDenoiser:
        """The teacher's network (or a new one) with the two zero-initialised inputs ``(jump, fake)`` and
        consistency coefficients: every reading starts as (nearly) the teacher's denoiser."""
        backbone = teacher_backbone_copy(teacher) or new_backbone()
        return ConsistencyDenoiser(add_extra_conditions(backbone, 2), sigma_data, config.sigma_min)

    def reading(self, x: Tensor, s: Tensor, cond, which: tuple[float, float], network: Denoiser | None = None
                ) -> Tensor:
        """The network (``self.student`` unless another is given) read as ``D_real``, ``f`` or ``D_fake``
        (:data:`REAL`, :data:`JUMP`, :data:`FAKE`)."""
        extra = torch.tensor(which, dtype=x.dtype, device=x.device).expand(x.shape[0], -1)
        return (network or self.student)(x, s, cond, extra)

    @torch.no_grad()
    def real_denoiser(self, x: Tensor, s: Tensor, cond) -> Tensor:
        """The real trajectory's denoiser: the teacher's, or the network's own (``velocity: self``)."""
        return self.teacher(x, s, cond) if self.config.velocity == "teacher" else self.reading(x, s, cond, REAL)

    def consistency_loss(self, x0: Tensor, cond, generator: torch.Generator) -> Tensor:
        i = torch.randint(0, self.config.num_scales - 1, (x0.shape[0],), generator=generator, device=x0.device)
        t, u = self.grid[i].to(x0), self.grid[i + 1].to(x0)
        x_t = noised(x0, t, generator)
        with torch.no_grad():
            x_u = euler_step(lambda y, level: self.real_denoiser(y, level, cond), x_t, t, u)
            target = self.reading(x_u, u, cond, JUMP, self.target)
        return distance(self.reading(x_t, t, cond, JUMP), target, self.config.distance, self.huber_c).mean()

    def flow_loss(self, x0: Tensor, cond, generator: torch.Generator) -> Tensor:
        sigma = karras_index_sigma(x0.shape[0], generator, x0)
        denoised = self.reading(noised(x0, sigma, generator), sigma, cond, REAL)
        return (edm_weight(sigma, self.student.sigma_data) * squared_l2(denoised, x0)).mean()

    def rectify_loss(self, x_generated: Tensor, cond, generator: torch.Generator) -> Tensor:
        sigma = karras_index_sigma(x_generated.shape[0], generator, x_generated, 0.02, 0.98)
        with torch.no_grad():
            x = noised(x_generated, sigma, generator)
            gap = self.reading(x, sigma, cond, FAKE) - self.real_denoiser(x, sigma, cond)
        clamp = self.config.rectify_clamp
        return pseudo_target_loss(x_generated, gap.clamp(-clamp, clamp))

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        c, x0, cond = self.config, batch.x0, batch.cond
        losses = {"consistency": self.consistency_loss(x0, cond, generator)}
        loss = losses["consistency"]
        if c.fake_weight > 0 or c.rectify_weight > 0:
            z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            top = torch.full((x0.shape[0],), c.sigma_max, device=x0.device, dtype=x0.dtype)
            x_generated = self.reading(c.sigma_max * z, top, cond, JUMP)
        if c.fake_weight > 0:
            fake = lambda x, s, label: self.reading(x, s, label, FAKE)  # noqa: E731
            sigma = karras_index_sigma(x0.shape[0], generator, x0)
            losses["fake"] = fake_score_loss(fake, x_generated, sigma, cond, generator, self.student.sigma_data)
            loss = loss + c.fake_weight * losses["fake"]
        if c.rectify_weight > 0:
            losses["rectify"] = self.rectify_loss(x_generated, cond, generator)
            loss = loss + c.rectify_weight * losses["rectify"]
        if c.velocity == "self" and c.flow_weight > 0:
            losses["flow"] = self.flow_loss(x0, cond, generator)
            loss = loss + c.flow_weight * losses["flow"]
        return {"loss": loss, **{name: value.detach() for name, value in losses.items()}}

    def after_update(self, phase: str, step: int) -> bool:
        ema_update_(self.target, self.student, self.config.target_ema)
        return False

    def student_denoiser(self) -> Denoiser:
        """The generator reading ``f``, which samples and is exported."""
        return FixedExtraDenoiser(self.student, list(JUMP))

    def sampling(self, nfe: int) -> Sampling:
        c = self.config
        return Sampling("consistency", solver_sigmas("euler", nfe, c.sigma_min, c.sigma_max, c.rho).tolist()[:-1])
