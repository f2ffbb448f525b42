"""``DatasetSpec``: what fewstep knows about a dataset, in one place (samples, splits, exact density)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from fewstep.models.analytic import GaussianMixture


@dataclass
class Modes:
    """Mode structure of a mixture-like dataset: means ``(K, d)``, isotropic stds ``(K,)``, weights ``(K,)``."""

    means: Tensor
    stds: Tensor
    weights: Tensor


@dataclass
class DatasetSpec:
    """A dataset with a fixed train / reference split.

    ``train_x`` trains teachers and feeds "data" methods; ``ref_x`` is held out and only used to measure
    quality. ``analytic`` is the exact Gaussian-mixture teacher where the data is one; ``log_prob`` the
    exact data log-density where one exists. ``normalisation`` says how stored values map to raw ones."""

    name: str
    data_shape: tuple[int, ...]
    train_x: Tensor
    ref_x: Tensor
    num_classes: int = 0
    train_y: Tensor | None = None
    ref_y: Tensor | None = None
    analytic: GaussianMixture | None = None
    log_prob: Callable[[Tensor], Tensor] | None = None
    modes: Modes | None = None
    sigma_data: float = 0.5
    normalisation: dict = field(default_factory=dict)
    description: str = ""
