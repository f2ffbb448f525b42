"""``DatasetSpec``: what fewstep knows about a dataset, in one place (samples, splits, exact density, what kind of
data it is and how its samples are scored)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from fewstep.conditions import Condition, TextCondition
from fewstep.models.analytic import GaussianMixture

KINDS = {"points": "vectors such as 2-D points: scatter plots, MLP students",
         "images": "(C, H, W) images: sample grids, wider MLP students"}
METRICS = {"swd": "sliced Wasserstein distance to the held-out split",
           "fd": "FD-digits: Frechet distance in the features of fewstep's digits classifier",
           "teacher_match": "distance to the teacher's samples from the same prompts and noise (text-to-image jobs)"}


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
    exact data log-density where one exists. ``normalisation`` says how stored values map to raw ones.
    ``kind`` (a key of :data:`KINDS`) says how samples are shown and which student network suits them;
    ``metric`` (a key of :data:`METRICS`) is the distance that ranks samples (lower is better): evaluation,
    level tuning and the benchmark read both from here, never from the data's shape. ``conditions`` are the
    conditions data-free sources draw from when they are not class labels (a text-to-image job's encoded prompts);
    ``train_y`` may then be the text conditions of ``train_x`` (captioned images), and ``prompts`` the texts of
    ``conditions``."""

    name: str
    data_shape: tuple[int, ...]
    train_x: Tensor
    ref_x: Tensor
    num_classes: int = 0
    train_y: Condition | None = None
    ref_y: Tensor | None = None
    analytic: GaussianMixture | None = None
    log_prob: Callable[[Tensor], Tensor] | None = None
    modes: Modes | None = None
    sigma_data: float = 0.5
    normalisation: dict = field(default_factory=dict)
    description: str = ""
    kind: str = "points"
    metric: str = "swd"
    conditions: TextCondition | None = None
    prompts: list[str] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"dataset {self.name!r}: kind must be one of {sorted(KINDS)}, got {self.kind!r}")
        if self.metric not in METRICS:
            raise ValueError(f"dataset {self.name!r}: metric must be one of {sorted(METRICS)}, got {self.metric!r}")

