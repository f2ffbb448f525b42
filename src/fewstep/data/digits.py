"""scikit-learn's 8x8 handwritten digits (1797 images, 10 classes; shipped with scikit-learn, no download).

Pixels (integers 0..16) are stored as float32 ``x = raw / 8 - 1`` in ``[-1, 1]``, shape ``(1, 8, 8)``. The
split is fixed by the seed: ``REF_SIZE`` held-out reference images, stratified by class (each class gets
its share of the reference set, rounded by largest remainder), and the rest for training.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep.data.spec import DatasetSpec

REF_SIZE = 597
RAW_MAX, SCALE, SHIFT = 16.0, 8.0, -1.0

DESCRIPTIONS = {"digits": "scikit-learn 8x8 digits in [-1, 1], 10 classes: 1200 train / 597 held-out reference"}


def stratified_counts(counts: Tensor, total: int) -> Tensor:
    """Per-class sizes summing to ``total``, proportional to ``counts`` (largest-remainder rounding)."""
    quota = counts.to(torch.float64) * total / counts.sum()
    sizes = quota.floor().long()
    shortfall = total - int(sizes.sum())
    by_remainder = torch.argsort(quota - sizes, descending=True, stable=True)
    sizes[by_remainder[:shortfall]] += 1
    return sizes


def split_indices(labels: Tensor, ref_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(train, ref)`` index tensors: a seeded shuffle, each class's first share goes to ``ref``, the rest
    (shuffled once more) to ``train``."""
    order = torch.randperm(labels.shape[0], generator=generator)
    shuffled = labels[order]
    sizes = stratified_counts(torch.bincount(labels), ref_size)
    rank_in_class = torch.empty_like(order)
    for c in range(sizes.shape[0]):
        members = shuffled == c
        rank_in_class[members] = torch.arange(int(members.sum()))
    is_ref = rank_in_class < sizes[shuffled]
    train = order[~is_ref]
    # Shuffle again: classes fill their reference quota at different points, which would leave the start
    # of the train split dominated by a few classes.
    return train[torch.randperm(train.shape[0], generator=generator)], order[is_ref]


def to_raw(x: Tensor) -> Tensor:
    """Stored values back to raw pixel values (0..16)."""
    return (x - SHIFT) * SCALE


def digits(seed: int = 0) -> DatasetSpec:
    from sklearn.datasets import load_digits  # imported here: scikit-learn takes seconds to import

    bunch = load_digits()
    images = torch.as_tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / SCALE + SHIFT
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    train, ref = split_indices(labels, REF_SIZE, torch.Generator().manual_seed(seed))
    train_x = images[train]
    return DatasetSpec(
        name="digits", data_shape=(1, 8, 8), train_x=train_x, ref_x=images[ref], num_classes=10,
        train_y=labels[train], ref_y=labels[ref], sigma_data=round(float(train_x.std()), 2),
        normalisation={"kind": "affine", "scale": SCALE, "shift": SHIFT, "raw_range": [0.0, RAW_MAX],
                       "formula": "stored = raw / scale + shift; raw = (stored - shift) * scale"},
        description=DESCRIPTIONS["digits"], kind="images", metric="fd")
