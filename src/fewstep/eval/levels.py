"""Choosing a consistency student's intermediate noise levels on the training split.

Multistep consistency sampling (``x0 = f(x, s_0)``, re-noise to ``x0 + s_1 z``, ``x0 = f(x, s_1)``, ...) fixes
only the first level, ``s_0 = sigma_max``; the later ones are free, and which are best depends on the student.
Song et al. (2023) chose them by a greedy search on FID. :func:`search_levels` is that search: one level at a
time over a grid in ``log s`` between its neighbours, repeated for a few rounds. :func:`tune_levels` scores
each candidate by a distance between its samples and the **training** split (FD-digits, or the sliced
Wasserstein distance of a 2-D set; not the exact NLL, which samples crowding the modes' centres would win),
on its own noise seed, so the held-out split that reports measure on plays no part in the choice. Every
candidate is drawn from the same noise and re-noising draws (common random numbers), so two candidates
differ by their levels alone."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from fewstep.errors import ConfigError, DataError
from fewstep.eval import digits, toy
from fewstep.solvers import SIGMA_MIN, Sampling

if TYPE_CHECKING:
    from fewstep.student import Student

TUNABLE_SAMPLERS = ("consistency",)


def check_tunable(spec: Sampling, method: str, nfe: int, key: str = "levels") -> None:
    """Refuse, naming ``key``, a schedule whose levels cannot be chosen: only the ``consistency`` sampler's
    later levels are free (other samplers follow the grid their student was trained on)."""
    if spec.sampler not in TUNABLE_SAMPLERS:
        raise ConfigError(f"{key}: {method} samples {nfe} NFE with {spec.sampler!r}; levels can be chosen for "
                          f"{TUNABLE_SAMPLERS}")


def search_levels(score: Callable[[list[float]], float], levels: list[float], sigma_min: float = SIGMA_MIN,
                  grid: int = 12, rounds: int = 2, refinements: int = 1) -> tuple[list[float], float, float]:
    """Minimise ``score(levels)`` over the levels after the first by coordinate search in ``log s``.

    Each of ``rounds`` passes tries every level in turn at ``grid`` points evenly spaced strictly between its
    neighbours (the last level's lower neighbour is ``sigma_min``); a second pass lets a level move into room
    its neighbours made. Each of ``refinements`` further passes tries ``grid`` points within one previous
    spacing either side of the level's current value, so the resolution grows ``(grid + 1) / 2``-fold. A
    level keeps the best value found, its current one included, so the levels stay strictly decreasing and
    the result never scores worse than ``levels``. Returns ``(best levels, best score, score of levels)``."""
    if grid < 1 or rounds < 1 or refinements < 0:
        raise ConfigError(f"need grid >= 1, rounds >= 1 and refinements >= 0, got grid={grid}, rounds={rounds}, "
                          f"refinements={refinements}")
    if any(b >= a for a, b in itertools.pairwise(levels)) or levels[-1] <= sigma_min:
        raise ConfigError(f"levels must decrease strictly and stay above sigma_min={sigma_min}, got {levels}")
    best, best_score = list(levels), score(list(levels))
    start_score = best_score
    spacing = [math.inf] * len(best)  # per level: the log-spacing of its last grid
    for refining in [False] * rounds + [True] * refinements:
        for i in range(1, len(best)):
            log_upper = math.log(best[i - 1])
            log_lower = math.log(best[i + 1] if i + 1 < len(best) else sigma_min)
            low, high = log_lower, log_upper
            if refining:
                low = max(low, math.log(best[i]) - spacing[i])
                high = min(high, math.log(best[i]) + spacing[i])
            spacing[i] = (high - low) / (grid + 1)
            for k in range(1, grid + 1):
                trial = list(best)
                trial[i] = math.exp(low + spacing[i] * k)
                trial_score = score(trial)
                if trial_score < best_score:
                    best, best_score = trial, trial_score
    return best, best_score, start_score


def training_split_score(student: Student, nfe: int, n_samples: int | None = None,
                         seed: int = 101) -> tuple[str, Callable[[list[float]], float]]:
    """``(metric name, score)``: ``score(levels)`` draws ``n_samples`` from ``student`` with those levels and
    measures them against the training split (a random subset of ``n_samples`` of it for FD-digits). Same
    noise, labels and re-noising draws on every call."""
    dataset = student.dataset
    if len(dataset.train_x) < 2:
        raise DataError(f"choosing levels needs the training split of dataset {dataset.name!r}, which this "
                        "student does not carry (it was distilled from an outside teacher)")
    check_tunable(student.sampling[nfe], student.method, nfe)
    is_digits = dataset.metric == "fd"
    n = n_samples if n_samples is not None else min(len(dataset.train_x), 5000)
    if not 2 <= n <= len(dataset.train_x):
        raise ConfigError(f"n_samples must be in [2, {len(dataset.train_x)}] (the training split), got {n}")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *dataset.data_shape), generator=generator)
    labels = torch.randint(0, dataset.num_classes, (n,), generator=generator) if dataset.num_classes else None
    subset = torch.randperm(len(dataset.train_x), generator=generator)[:n]
    train_view = dataclasses.replace(
        dataset, ref_x=dataset.train_x[subset],
        ref_y=dataset.train_y[subset] if dataset.train_y is not None else None)
    device = student.denoiser.device
    noise, labels = noise.to(device), labels.to(device) if labels is not None else None
    classifier = digits.feature_extractor(dataset) if is_digits else None

    def score(levels: list[float]) -> float:
        trial = dataclasses.replace(student.sampling[nfe], sigmas=levels)
        samples = student.sample_with(trial, noise, labels, torch.Generator(device).manual_seed(seed + 1)).cpu()
        if not torch.isfinite(samples).all():
            return math.inf
        if is_digits:
            return digits.digits_metrics(samples, train_view, classifier=classifier)["fd"]
        return toy.sliced_wasserstein(samples.flatten(1).double(), train_view.ref_x.flatten(1).double(), n,
                                      torch.Generator().manual_seed(seed))

    return dataset.metric, score


def tune_levels(student: Student, nfes: Iterable[int] = (2, 4), n_samples: int | None = None, seed: int = 101,
                grid: int = 12, rounds: int = 2, refinements: int = 1, progress: bool = True) -> dict[int, dict]:
    """Replace the levels of ``student.sampling[nfe]`` for each ``nfe >= 2`` by the best of
    :func:`search_levels` under :func:`training_split_score`, in place. Returns, per NFE, the metric, the
    method's default levels and their score, and the chosen levels and theirs (both on the training split)."""
    trace = {}
    for nfe in tqdm(sorted(set(nfes)), desc="choose levels", disable=not progress):
        if nfe < 2:
            continue
        if nfe not in student.sampling:
            raise ConfigError(f"this {student.method} student has no sampling schedule for nfe={nfe}; "
                              f"available: {sorted(student.sampling)}")
        metric, score = training_split_score(student, nfe, n_samples, seed)
        default = [float(s) for s in student.sampling[nfe].sigmas]
        levels, best, default_score = search_levels(score, default, grid=grid, rounds=rounds,
                                                      refinements=refinements)
        student.sampling[nfe] = Sampling(student.sampling[nfe].sampler, levels)
        trace[nfe] = {"metric": metric, "split": "train", "seed": seed, "default_levels": default,
                      "default_score": default_score, "levels": levels, "score": best}
    return trace
