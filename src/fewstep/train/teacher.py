"""Training a teacher denoiser on data with EDM's denoising loss (Karras et al. 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models", ``training/loss.py: EDMLoss``)::

    ln s ~ N(P_mean, P_std^2),   eps ~ N(0, I),   lambda(s) = (s^2 + sd^2) / (s sd)^2
    L = E[ lambda(s) * mean_i (D(x0 + s eps, s, label) - x0)_i^2 ]

Deviation from EDM: the squared error is averaged over coordinates instead of summed (a constant factor,
which keeps the loss scale independent of the data size). Labels are replaced by the null index
``num_classes`` with probability ``p_uncond`` so that one network is both the conditional and the
unconditional model (classifier-free guidance). Optimisation: AdamW, learning rate 1e-3 held constant
after a linear warm-up of 100 steps, EMA weights for the returned model. Teacher training is a method like
any other (:class:`TeacherTraining`), run by the shared loop of :mod:`fewstep.train.trainer`, so it gets
checkpoints, resume, logging and the divergence guard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from fewstep.data.batch import Batch
from fewstep.data.sources import RealData
from fewstep.errors import ConfigError, DataError
from fewstep.methods.base import Phase
from fewstep.methods.losses import edm_weight
from fewstep.models.denoiser import EDMDenoiser
from fewstep.models.io import one_line
from fewstep.nets import build_backbone
from fewstep.paths import bcast
from fewstep.train.trainer import TrainConfig, train


def _teacher_train_config() -> TrainConfig:
    return TrainConfig(lr=1e-3, warmup_steps=100)


@dataclass
class TeacherConfig:
    """EDM loss settings and the loop settings (``train``) for teacher training."""

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    p_uncond: float = 0.1
    train: TrainConfig = field(default_factory=_teacher_train_config)

    def __post_init__(self):
        if not self.sigma_data > 0:
            raise ConfigError(f"teacher config: sigma_data must be positive, got {self.sigma_data!r}")
        if not self.p_std > 0:
            raise ConfigError(f"teacher config: p_std must be positive, got {self.p_std!r}")
        if not 0 <= self.p_uncond < 1:
            raise ConfigError(f"teacher config: p_uncond must be in [0, 1), got {self.p_uncond!r}")


class TeacherTraining(nn.Module):
    """The trainer's method protocol for training ``denoiser`` from data (no teacher): one phase."""

    name: ClassVar[str] = "teacher_training"
    needs: ClassVar[frozenset[str]] = frozenset({"data"})
    fsdp_refusal: ClassVar[str | None] = None
    teacher_evals: ClassVar[int] = 0  # it learns from data alone

    def __init__(self, denoiser: EDMDenoiser, config: TeacherConfig):
        super().__init__()
        self.denoiser = denoiser
        self.config = config

    def phases(self) -> list[Phase]:
        return [Phase("denoiser", list(self.denoiser.parameters()))]

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        x0, c = batch.x0, self.config
        s = torch.exp(c.p_mean + c.p_std * torch.randn(x0.shape[0], generator=generator, device=x0.device,
                                                       dtype=x0.dtype))
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x0_pred = self.denoiser(x0 + bcast(s, x0) * eps, s, self._dropped_labels(batch.cond, generator))
        squared_error = (x0_pred - x0) ** 2
        return {"loss": (bcast(edm_weight(s, c.sigma_data), x0) * squared_error).mean(),
                "mse": squared_error.mean().detach()}

    def _dropped_labels(self, label: Tensor | None, generator: torch.Generator) -> Tensor | None:
        """Labels with each replaced by the null index ``num_classes`` with probability ``p_uncond``."""
        num_classes = self.denoiser.num_classes
        if num_classes == 0:
            return None
        if label is None:
            raise DataError(f"a class-conditional teacher ({num_classes} classes) needs labelled batches")
        drop = torch.rand(label.shape, generator=generator, device=label.device) < self.config.p_uncond
        return torch.where(drop, torch.full_like(label, num_classes), label)

    def after_update(self, phase: str, step: int) -> bool:
        return False

    def student_denoiser(self) -> EDMDenoiser:
        return self.denoiser


def train_teacher(dataset_x: Tensor, dataset_y: Tensor | None, backbone_name: str, backbone_hparams: dict,
                  config: TeacherConfig | None = None, run_dir: str | Path | None = None,
                  progress: bool = True) -> EDMDenoiser:
    """Train an :class:`EDMDenoiser` around ``build_backbone(backbone_name, **backbone_hparams)`` on
    ``dataset_x`` (``(N, *data_shape)``) and return its EMA weights (eval mode, on the training device).

    ``dataset_y`` (``(N,)`` labels in ``[0, num_classes)``) is required when the backbone is class-conditional
    and ignored when it is not. Pass the dataset's ``sigma_data`` in ``config``."""
    config = TeacherConfig() if config is None else config
    torch.manual_seed(config.train.seed)  # the initial weights come from the global RNG: make them the seed's
    try:
        backbone = build_backbone(backbone_name, **backbone_hparams)
    except (TypeError, ValueError) as error:  # a misspelt or out-of-range setting: the user's input
        raise ConfigError(f"teacher backbone_args for {backbone_name!r}: {one_line(error)}") from error
    if tuple(dataset_x.shape[1:]) != backbone.data_shape:
        raise DataError(f"training samples have shape {tuple(dataset_x.shape[1:])} but the backbone expects "
                        f"data_shape {backbone.data_shape}")
    labels = None
    if backbone.num_classes:
        if dataset_y is None:
            raise DataError(f"the backbone is class-conditional ({backbone.num_classes} classes): give labels")
        labels = dataset_y.long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= backbone.num_classes):
            raise DataError(f"labels must be in [0, {backbone.num_classes}), got [{int(labels.min())}, "
                            f"{int(labels.max())}]")
    method = TeacherTraining(EDMDenoiser(backbone, config.sigma_data), config)
    result = train(method, RealData(dataset_x.float(), labels), config.train, run_dir=run_dir, progress=progress)
    return result.ema_student
