"""rfpp: improved one-round rectified flow (2-rectified flow++). Lee, Lin & Fanti, "Improving the Training of
Rectified Flows", NeurIPS 2024.

One reflow round on the teacher's pairs (:mod:`fewstep.methods.flow.rectify`; ``rounds`` may ask for more) with
two changes to the loss. Times are U-shaped: ``u ~ p(u) ∝ exp(a u)`` on [0, 1] joined with its mirror ``1 - u``
(:func:`~fewstep.methods.flow.rectify.u_shaped_times`), so both ends of the path weigh more. The premetric
(``premetric = "lpips_huber"``, the default) is, with ``v_theta - (z - x) = (x - x_hat) / t`` and the clean-sample
prediction ``x_hat = D_theta(x + s z, s)``::

    L = E_{(z, x), t} [ (1 - t) PH(v_theta - (z - x)) + lpips_weight LPIPS_phi(x_hat, x) / t ]
    PH(r) = (sqrt(|r|^2 + c^2) - c) / d,   c = 0.00054 d   (d: dimensions; rfpp's code)

``LPIPS_phi`` is an LPIPS-like distance (:func:`~fewstep.methods.flow.rectify.lpips_like`) on a small MLP
feature network ``phi`` made here: phase ``features`` trains it as a denoising autoencoder on the teacher's
endpoints for ``feature_steps`` updates; then a frozen copy serves the premetric. Until then the student trains
on the PH term alone. ``premetric = "pseudo_huber"`` drops the LPIPS term (the paper's "Huber" ablation) and
``"l2"`` is plain reflow with U-shaped times.

Deviations from the paper: the LPIPS network is a small denoising autoencoder trained here on the teacher's
samples, not an ImageNet VGG/AlexNet, and without learned layer weights; its term is switched on after
``feature_steps`` updates; the student starts from the teacher's network in its own parametrisation rather than
a velocity wrapper (the same function); no augmentation; time stops at ``t = 80/81``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.methods.base import Phase
from fewstep.methods.flow.rectify import (
    PREMETRICS,
    FeatureNet,
    RectifiedFlowConfig,
    RectifiedFlowMethod,
    lpips_like,
    u_shaped_times,
    velocity_distance,
    velocity_residual,
)


@dataclass
class RFPPConfig(RectifiedFlowConfig):
    premetric: str = "lpips_huber"
    time_a: float = 4.0  # the U-shaped density's exponent (rfpp's README commands; its code default is 2)
    lpips_weight: float = 1.0
    feature_width: int = 128
    feature_depth: int = 3
    feature_noise: float = 0.2  # the autoencoder's input noise, in units of the data's standard deviation
    feature_steps: int = 300


class RFPP(RectifiedFlowMethod):
    """One reflow round with U-shaped times and the LPIPS-Huber premetric on a feature network trained here."""

    name = "rfpp"
    paper = "Lee et al. 2024, Improving the Training of Rectified Flows"
    Config = RFPPConfig

    def __init__(self, teacher, student, config: RFPPConfig):
        super().__init__(teacher, student, config)
        if config.time_a < 0 or config.lpips_weight < 0 or config.feature_steps < 1:
            raise ConfigError("method_args: need time_a >= 0, lpips_weight >= 0 and feature_steps >= 1")
        sigma_data = getattr(student, "sigma_data", 0.5)
        self.features = FeatureNet(student.data_shape, config.feature_width, config.feature_depth,
                                   config.feature_noise * sigma_data)
        self.frozen_features = copy.deepcopy(self.features).requires_grad_(False).eval()
        self.register_buffer("feature_updates", torch.tensor(0))

    @classmethod
    def premetric_choices(cls) -> tuple[str, ...]:
        return (*PREMETRICS, "lpips_huber")

    @property
    def uses_lpips(self) -> bool:
        return self.config.premetric == "lpips_huber"

    @property
    def features_ready(self) -> bool:
        return int(self.feature_updates) >= self.config.feature_steps

    def phases(self) -> list[Phase]:
        student = Phase("student", list(self.student.parameters()))
        return [Phase("features", list(self.features.parameters())), student] if self.uses_lpips else [student]

    def sample_times(self, n: int, generator: torch.Generator, like: Tensor) -> Tensor:
        return u_shaped_times(n, self.config.time_a, generator, like)

    def premetric(self, x0_prediction: Tensor, endpoint: Tensor, t: Tensor) -> Tensor:
        residual = velocity_residual(x0_prediction, endpoint, t)
        if not self.uses_lpips:
            return velocity_distance(residual, self.config.premetric, self.huber_c)
        loss = (1 - t) * velocity_distance(residual, "pseudo_huber", self.huber_c)
        if self.features_ready and self.config.lpips_weight > 0:
            loss = loss + self.config.lpips_weight * lpips_like(self.frozen_features, x0_prediction, endpoint) / t
        return loss

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        if phase == "student":
            return super().losses(phase, batch, step, generator)
        if self.features_ready:  # trained: idle from here on
            return {"loss": torch.zeros((), device=batch.endpoint.device)}
        return {"loss": self.features.dae_loss(self.stage_pairs(batch, generator).endpoint, generator)}

    @torch.no_grad()
    def after_update(self, phase: str, step: int) -> bool:
        if phase == "features":
            self.feature_updates += 1
            if self.features_ready:
                self.frozen_features.load_state_dict(self.features.state_dict())
            return False
        return super().after_update(phase, step)

    def train(self, mode: bool = True) -> RFPP:
        super().train(mode)
        self.frozen_features.eval()
        return self
