"""Per-mode weight errors of :func:`fewstep.eval.toy.mode_metrics` on the imbalanced 25-mode grid (weights 1:20),
against answers known in advance: exact samples, samples with chosen wrong weights, and one-mode collapse."""

import math

import pytest
import torch

from fewstep.data import load_dataset
from fewstep.eval.toy import IN_MODE_RADIUS, mode_metrics

GRID = load_dataset("grid25_imbalanced")
WEIGHTS = GRID.modes.weights.double() / GRID.modes.weights.sum()


def placed(counts: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``counts[k]`` points around mode ``k``, each within the in-mode radius: offsets of ``std / 2`` per
    coordinate put a point outside radius 3 stds with probability ``exp(-18) ~ 1.5e-8``, so the in-mode
    histogram is ``counts`` itself."""
    generator = torch.Generator().manual_seed(seed)
    mode = torch.repeat_interleave(torch.arange(len(counts)), counts)
    offsets = 0.5 * GRID.modes.stds[mode, None] * torch.randn(len(mode), 2, generator=generator, dtype=torch.float64)
    return GRID.modes.means[mode].double() + offsets


def metrics(x: torch.Tensor) -> dict:
    return mode_metrics(x, GRID.ref_x.double(), GRID.modes)


def test_exact_samples_are_within_the_multinomial_error():
    """Among the n_in in-mode samples of an exact draw, mode k's share has standard error
    SE_k = sqrt(w_k (1 - w_k) / n_in) (every component keeps the same 1 - exp(-4.5) of its mass in mode, so the
    in-mode histogram is multinomial with the true weights). If every |p_k - w_k| <= 4.5 SE_k, which fails
    with probability below 25 * 7e-6, then worst <= 4.5 max SE_k, worst_relative <= 4.5 max SE_k / w_k and
    TV <= 2.25 sum SE_k."""
    x = GRID.analytic.sample(20_000, generator=torch.Generator().manual_seed(1))
    m = metrics(x)
    n_in = m["in_mode_fraction"] * len(x)
    assert n_in == pytest.approx(len(x) * (1 - math.exp(-IN_MODE_RADIUS**2 / 2)), rel=0.01)
    se = (WEIGHTS * (1 - WEIGHTS) / n_in).sqrt()
    assert 0 < m["mode_weight_worst"] <= 4.5 * float(se.max()) < 0.011
    assert 0 < m["mode_weight_worst_relative"] <= 4.5 * float((se / WEIGHTS).max()) < 0.42
    assert 0 < m["mode_balance"] <= 2.25 * float(se.sum()) < 0.075
    assert m["modes_covered"] == 25


def test_uniform_weights_give_the_expected_errors():
    """2000 points in every mode: p_k = 1/25 exactly, so worst = max_k |1/25 - w_k| (the heaviest mode),
    worst_relative = 1 / (25 w_min) - 1 (the lightest) and TV = sum_k |1/25 - w_k| / 2."""
    m = metrics(placed(torch.full((25,), 2000)))
    uniform = 1 / 25
    assert m["mode_weight_worst"] == pytest.approx(float(WEIGHTS.max()) - uniform, abs=1e-12)
    assert m["mode_weight_worst"] == pytest.approx(0.0828, abs=1e-4)
    assert m["mode_weight_worst_relative"] == pytest.approx(uniform / float(WEIGHTS.min()) - 1, rel=1e-12)
    assert m["mode_weight_worst_relative"] == pytest.approx(5.517, abs=1e-3)
    assert m["mode_balance"] == pytest.approx(float(0.5 * (uniform - WEIGHTS).abs().sum()), abs=1e-12)
    assert m["mode_balance"] == pytest.approx(0.346, abs=1e-3)


def test_the_relative_error_sees_a_light_mode_at_half_its_weight():
    """The lightest mode at half its weight, the rest scaled up to sum to 1: the absolute errors are at most
    w_0 / 2 = 0.003, but the relative error is 1/2."""
    target = WEIGHTS.clone()
    target[0] /= 2
    target[1:] *= (1 - target[0]) / target[1:].sum()
    counts = (200_000 * target).round().long()
    m = metrics(placed(counts))
    # counts round N q_k to an integer: every share is within 1 / N of q_k
    assert m["mode_weight_worst"] == pytest.approx(float(WEIGHTS[0]) / 2, abs=2e-5)
    assert m["mode_weight_worst"] < 0.0035
    assert m["mode_weight_worst_relative"] == pytest.approx(0.5, abs=2e-3)


@pytest.mark.parametrize("mode", [int(WEIGHTS.argmin()), int(WEIGHTS.argmax())])
def test_all_samples_in_one_mode(mode: int):
    """p = e_k: TV = (1 - w_k + sum_{j != k} w_j) / 2 = 1 - w_k; worst = max(1 - w_k, max_{j != k} w_j) = 1 - w_k;
    worst_relative = max(1 / w_k - 1, 1)."""
    counts = torch.zeros(25, dtype=torch.long)
    counts[mode] = 500
    m = metrics(placed(counts))
    w = float(WEIGHTS[mode])
    assert m["modes_covered"] == 1
    assert m["mode_balance"] == pytest.approx(1 - w, abs=1e-12)
    assert m["mode_weight_worst"] == pytest.approx(1 - w, abs=1e-12)
    assert m["mode_weight_worst_relative"] == pytest.approx(max(1 / w - 1, 1.0), rel=1e-12)


def test_no_sample_in_any_mode_scores_the_worst_values():
    m = metrics(torch.full((100, 2), 0.5, dtype=torch.float64))  # halfway between four modes, 10 stds from each
    assert m["in_mode_fraction"] == 0
    assert (m["mode_balance"], m["mode_weight_worst"], m["mode_weight_worst_relative"]) == (1.0, 1.0, math.inf)
