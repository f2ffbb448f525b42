"""Sample-quality metrics for 2-D and analytic datasets, against the exact density and the held-out ``ref_x``.

A few-step student fails in three ways, and each has a metric that sees it:

* samples **off the data** (between modes, off the checkerboard): higher ``nll``, lower ``in_mode_fraction``,
  higher ``off_support``;
* samples **collapsed onto mode centres** (too little spread): ``nll`` goes *down*, so ``spread_ratio`` (well
  below 1) is the metric that shows it;
* **missing or unbalanced modes**: ``modes_covered`` < ``modes_total``, a larger ``mode_balance`` (the total
  variation ``(1/2) sum_k |p_k - w_k|`` between the share ``p_k`` of in-mode samples assigned to mode ``k`` and its
  weight ``w_k``), ``mode_weight_worst = max_k |p_k - w_k|`` (the one worst mode) and
  ``mode_weight_worst_relative = max_k |p_k / w_k - 1|`` (relative to the weight: on the imbalanced grid, whose
  weights span 1:20, the lightest mode at half its weight is an absolute error of only 0.003).

``swd`` and ``mmd`` compare whole distributions with ``ref_x`` and apply to every dataset. Every estimate
from finite samples has a floor: :func:`noise_floor_toy` gives the values real data reaches at the same
sample size, and :func:`reference_nll` the NLL of the reference set.

Mode rules (``dataset.modes``: means ``mu_k``, isotropic stds ``s_k``, weights ``w_k``): a sample belongs to
the mode nearest in standardised distance ``|x - mu_k| / s_k`` and is *in mode* if that distance is below
``IN_MODE_RADIUS = 3`` (in 2-D that disc holds ``1 - exp(-4.5) = 98.9%`` of a component's mass). A mode is
*covered* if at least ``COVERED_SHARE = 1/4`` of its expected count ``w_k N`` (and at least one sample) is in
it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fewstep.data.spec import DatasetSpec, Modes
from fewstep.errors import DataError

IN_MODE_RADIUS = 3.0
COVERED_SHARE = 0.25
SWD_DIRECTIONS, SWD_DIRECTIONS_SEED = 128, 0
MMD_BANDWIDTHS = (0.05, 0.2, 1.0)  # in units of sigma_data * sqrt(d), the data's typical pair distance


def _flat(x: Tensor) -> Tensor:
    return x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)


def _subsample(x: Tensor, n: int, generator: torch.Generator) -> Tensor:
    return x if x.shape[0] <= n else x[torch.randperm(x.shape[0], generator=generator)[:n]]


def nll_metrics(x: Tensor, log_prob) -> dict[str, float]:
    """``nll``: mean ``-log p`` over the samples where ``p > 0``; ``off_support``: the fraction where ``p = 0``
    (or ``nll = inf`` if all are off support)."""
    log_p = log_prob(x).to(torch.float64)
    on_support = torch.isfinite(log_p)
    nll = float(-log_p[on_support].mean()) if on_support.any() else math.inf
    return {"nll": nll, "off_support": float(1.0 - on_support.double().mean())}


def assign_modes(x: Tensor, modes: Modes) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample ``(N, d)``: nearest mode in standardised distance, whether it is in that mode, and the
    squared Euclidean distance to that mode's mean."""
    means = modes.means.reshape(modes.means.shape[0], -1).to(torch.float64)
    sq_dist = ((x[:, None, :] - means[None]) ** 2).sum(-1)
    standardised = sq_dist.sqrt() / modes.stds.to(torch.float64)
    mode = standardised.argmin(1)
    in_mode = standardised.gather(1, mode[:, None]).squeeze(1) < IN_MODE_RADIUS
    return mode, in_mode, sq_dist.gather(1, mode[:, None]).squeeze(1)


def _per_mode_rms(x: Tensor, modes: Modes) -> tuple[Tensor, Tensor, Tensor]:
    """In-mode counts ``(K,)``, RMS distance of in-mode samples to their mode mean ``(K,)`` (nan where a
    mode has none), and the in-mode mask ``(N,)``."""
    k = modes.means.shape[0]
    mode, in_mode, sq_dist = assign_modes(x, modes)
    counts = torch.bincount(mode[in_mode], minlength=k).to(torch.float64)
    sq_sum = torch.zeros(k, dtype=torch.float64).index_add_(0, mode[in_mode], sq_dist[in_mode])
    return counts, (sq_sum / counts).sqrt(), in_mode


def mode_metrics(x: Tensor, ref: Tensor, modes: Modes) -> dict[str, float | int]:
    """``modes_covered``, ``modes_total``, ``in_mode_fraction``, ``spread_ratio``, ``mode_balance``,
    ``mode_weight_worst`` and ``mode_weight_worst_relative``.

    ``spread_ratio`` is the mean over covered modes of the samples' in-mode RMS distance to the mode mean
    divided by the same for ``ref`` (both truncated at the same radius; nan if no mode is covered). With
    ``p_k`` the share of in-mode samples assigned to mode ``k`` and ``w_k`` its weight: ``mode_balance`` is the
    total variation ``(1/2) sum_k |p_k - w_k|``, ``mode_weight_worst`` is ``max_k |p_k - w_k|`` and
    ``mode_weight_worst_relative`` is ``max_k |p_k / w_k - 1|`` (0 is perfect; 1, 1 and inf if no sample is in
    any mode)."""
    weights = modes.weights.to(torch.float64) / modes.weights.sum()
    counts, rms, in_mode = _per_mode_rms(x, modes)
    _, ref_rms, _ = _per_mode_rms(ref, modes)
    covered = counts >= (COVERED_SHARE * weights * x.shape[0]).clamp_min(1.0)
    comparable = covered & (ref_rms > 0)
    spread = float((rms[comparable] / ref_rms[comparable]).mean()) if comparable.any() else math.nan
    if counts.sum() > 0:
        error = counts / counts.sum() - weights
        balance, worst = float(0.5 * error.abs().sum()), float(error.abs().max())
        worst_relative = float((error / weights).abs().max())
    else:
        balance, worst, worst_relative = 1.0, 1.0, math.inf
    return {"modes_covered": int(covered.sum()), "modes_total": int(weights.shape[0]),
            "in_mode_fraction": float(in_mode.double().mean()), "spread_ratio": spread, "mode_balance": balance,
            "mode_weight_worst": worst, "mode_weight_worst_relative": worst_relative}


def sliced_wasserstein(x: Tensor, y: Tensor, max_points: int, generator: torch.Generator) -> float:
    """Sliced Wasserstein-2 distance: RMS over ``SWD_DIRECTIONS`` fixed random directions of the 1-D W2
    between projections, on equal-size random subsets of at most ``max_points``."""
    directions = torch.randn(x.shape[1], SWD_DIRECTIONS, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(SWD_DIRECTIONS_SEED))
    directions = directions / directions.norm(dim=0, keepdim=True)
    n = min(x.shape[0], y.shape[0], max_points)
    x_proj = (_subsample(x, n, generator) @ directions).sort(0).values
    y_proj = (_subsample(y, n, generator) @ directions).sort(0).values
    return float(((x_proj - y_proj) ** 2).mean().sqrt())


def _rbf_kernel(a: Tensor, b: Tensor, bandwidths: tuple[float, ...]) -> Tensor:
    sq_dist = ((a**2).sum(1)[:, None] + (b**2).sum(1)[None] - 2 * a @ b.T).clamp_min(0.0)
    return sum(torch.exp(-sq_dist / (2 * h**2)) for h in bandwidths)


def mmd_rbf(x: Tensor, y: Tensor, bandwidths: tuple[float, ...], max_points: int,
            generator: torch.Generator) -> float:
    """Unbiased MMD^2 with a sum of RBF kernels ``exp(-|a - b|^2 / (2 h^2))`` on random subsets of at most
    ``max_points`` (can be slightly negative when the two distributions agree)."""
    x, y = _subsample(x, max_points, generator), _subsample(y, max_points, generator)
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy = _rbf_kernel(x, x, bandwidths), _rbf_kernel(y, y, bandwidths)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * _rbf_kernel(x, y, bandwidths).mean())


def toy_metrics(samples: Tensor, dataset: DatasetSpec, max_points: int = 2000, seed: int = 0) -> dict:
    """All metrics that apply to ``dataset`` for ``samples`` ``(N, *data_shape)``; plain Python numbers.

    Always: ``nonfinite`` (fraction of NaN/Inf samples, which are then dropped), ``swd``, ``mmd``. With an
    exact density: ``nll``, ``off_support``. With modes: see :func:`mode_metrics`. ``seed`` fixes the
    subsets used by ``swd`` and ``mmd``."""
    x = _flat(samples)
    ref = _flat(dataset.ref_x)
    if x.shape[1] != ref.shape[1]:
        raise DataError(f"samples have {x.shape[1]} values each but dataset {dataset.name!r} has {ref.shape[1]}")
    finite = torch.isfinite(x).all(1)
    x = x[finite]
    if x.shape[0] < 2:
        raise DataError(f"need at least 2 finite samples to measure, got {x.shape[0]}")
    metrics: dict[str, float | int] = {"nonfinite": float(1.0 - finite.double().mean())}
    if dataset.log_prob is not None:
        metrics.update(nll_metrics(x, dataset.log_prob))
    if dataset.modes is not None:
        metrics.update(mode_metrics(x, ref, dataset.modes))
    generator = torch.Generator().manual_seed(seed)
    metrics["swd"] = sliced_wasserstein(x, ref, max_points, generator)
    scale = dataset.sigma_data * math.sqrt(x.shape[1])
    metrics["mmd"] = mmd_rbf(x, ref, tuple(b * scale for b in MMD_BANDWIDTHS), max_points, generator)
    return metrics


def reference_nll(dataset: DatasetSpec) -> float:
    """NLL of the held-out reference set: what exact samples score, the baseline for a student's ``nll``."""
    if dataset.log_prob is None:
        raise DataError(f"dataset {dataset.name!r} has no exact density, so it has no NLL")
    return nll_metrics(_flat(dataset.ref_x), dataset.log_prob)["nll"]


def flow_map_error(samples: Tensor, exact_endpoints: Tensor) -> float:
    """Mean Euclidean distance between each sample and the exact ODE endpoint of the same noise."""
    if samples.shape != exact_endpoints.shape:
        raise DataError(f"samples {tuple(samples.shape)} and endpoints {tuple(exact_endpoints.shape)} must have "
                        f"the same shape")
    return float((_flat(samples) - _flat(exact_endpoints)).norm(dim=1).mean())


def noise_floor_toy(dataset: DatasetSpec, n: int, seed: int = 0, max_points: int = 2000) -> dict:
    """:func:`toy_metrics` of ``n`` real samples that are not ``ref_x``: a fresh exact sample if the dataset
    is analytic, else a random part of ``train_x``. A student cannot beat these values at sample size ``n``."""
    generator = torch.Generator().manual_seed(seed)
    if dataset.analytic is not None:
        real = dataset.analytic.sample(n, generator=generator).float()
    elif n <= dataset.train_x.shape[0]:
        real = dataset.train_x[torch.randperm(dataset.train_x.shape[0], generator=generator)[:n]]
    else:
        raise DataError(f"noise floor of {n} samples needs at most {dataset.train_x.shape[0]} (the training set)")
    return toy_metrics(real, dataset, max_points=max_points, seed=seed)
