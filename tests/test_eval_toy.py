import math

import pytest
import torch

from fewstep.data import load_dataset
from fewstep.errors import DataError
from fewstep.eval.toy import flow_map_error, noise_floor_toy, reference_nll, toy_metrics

N, MAX_POINTS = 1000, 1000


@pytest.fixture(scope="module")
def ring():
    return load_dataset("ring8")


def exact(dataset, n=N, seed=1):
    return dataset.analytic.sample(n, generator=torch.Generator().manual_seed(seed)).float()


def metrics(samples, dataset):
    return toy_metrics(samples, dataset, max_points=MAX_POINTS)


@pytest.fixture(scope="module")
def exact_metrics(ring):
    return metrics(exact(ring), ring)


def test_exact_samples_score_like_data(ring, exact_metrics):
    m = exact_metrics
    assert m["modes_covered"] == m["modes_total"] == 8
    assert 0.9 <= m["spread_ratio"] <= 1.1
    assert m["mode_balance"] < 0.08
    assert m["in_mode_fraction"] > 0.97
    assert m["nll"] == pytest.approx(reference_nll(ring), abs=0.1)
    assert m["off_support"] == 0.0 and m["nonfinite"] == 0.0
    assert all(isinstance(v, float | int) for v in m.values())


def test_collapsed_samples_have_lower_nll_but_no_spread(ring, exact_metrics):
    at_means = ring.modes.means[torch.arange(N) % 8].float()
    m = metrics(at_means, ring)
    assert m["nll"] < exact_metrics["nll"] - 0.5  # the likelihood rewards collapse...
    assert m["spread_ratio"] < 0.2  # ...the spread does not
    assert m["modes_covered"] == 8


def test_half_spread_samples_are_seen(ring):
    x, component = ring.analytic.sample(N, generator=torch.Generator().manual_seed(2), return_components=True)
    means = ring.modes.means[component]
    assert metrics((means + 0.5 * (x - means)).float(), ring)["spread_ratio"] == pytest.approx(0.5, abs=0.05)


def test_samples_from_four_modes_cover_four(ring):
    x, component = ring.analytic.sample(2 * N, generator=torch.Generator().manual_seed(3), return_components=True)
    m = metrics(x[component < 4].float(), ring)
    assert m["modes_covered"] == 4
    assert m["mode_balance"] == pytest.approx(0.5, abs=0.05)
    assert 0.9 <= m["spread_ratio"] <= 1.1


def test_blob_between_modes_is_off_the_data(ring, exact_metrics):
    blob = 0.5 * torch.randn(N, 2, generator=torch.Generator().manual_seed(4))
    m = metrics(blob, ring)
    assert m["in_mode_fraction"] < 0.01
    assert m["modes_covered"] == 0 and math.isnan(m["spread_ratio"])
    assert m["nll"] > exact_metrics["nll"] + 5


def test_imbalance_is_measured():
    imbalanced = load_dataset("grid25_imbalanced")
    balanced_samples = load_dataset("grid25").analytic.sample(2000, generator=torch.Generator().manual_seed(5))
    assert metrics(exact(imbalanced, 2000), imbalanced)["mode_balance"] < 0.1
    m = metrics(balanced_samples.float(), imbalanced)
    assert m["mode_balance"] > 0.25 and m["modes_covered"] == 25


def test_swd_and_mmd_separate_exact_from_shifted(ring, exact_metrics):
    shifted = metrics(exact(ring, seed=6) + 0.3, ring)
    assert exact_metrics["swd"] < 0.2 and abs(exact_metrics["mmd"]) < 0.005
    assert shifted["swd"] > 2 * exact_metrics["swd"] and shifted["mmd"] > 0.05


def test_metrics_are_deterministic(ring, exact_metrics):
    assert metrics(exact(ring), ring) == exact_metrics


def test_checkerboard_reports_off_support():
    board = load_dataset("checkerboard")
    on = metrics(board.ref_x[:N], board)
    assert on["off_support"] == 0.0 and on["nll"] == pytest.approx(math.log(8))
    spread_out = metrics(4 * torch.rand(N, 2, generator=torch.Generator().manual_seed(7)) - 2, board)
    assert spread_out["off_support"] == pytest.approx(0.5, abs=0.06)
    assert spread_out["nll"] == pytest.approx(math.log(8))  # measured on the samples on the support
    assert "modes_covered" not in on


def test_datasets_without_density_or_modes_get_distances_only():
    moons = load_dataset("moons")
    assert set(metrics(moons.train_x[:N], moons)) == {"nonfinite", "swd", "mmd"}
    with pytest.raises(DataError, match="no exact density"):
        reference_nll(moons)


def test_nonfinite_samples_are_counted_and_dropped(ring, exact_metrics):
    x = exact(ring)
    x[:100] = math.nan
    m = metrics(x, ring)
    assert m["nonfinite"] == pytest.approx(0.1)
    assert m["modes_covered"] == 8 and 0.9 <= m["spread_ratio"] <= 1.1


def test_bad_inputs(ring):
    with pytest.raises(DataError, match="values each"):
        toy_metrics(torch.zeros(10, 3), ring)
    with pytest.raises(DataError, match="finite samples"):
        toy_metrics(torch.full((10, 2), math.inf), ring)


def test_reference_nll_matches_the_analytic_value(ring):
    # per-mode Gaussian in 2-D: E[-log p] = log(K 2 pi s^2) + 1 (modes far apart)
    assert reference_nll(ring) == pytest.approx(math.log(8 * 2 * math.pi * 0.01) + 1, abs=0.05)


def test_flow_map_error():
    samples = torch.zeros(2, 1, 2)
    endpoints = torch.tensor([[[3.0, 4.0]], [[0.0, 1.0]]])
    assert flow_map_error(samples, endpoints) == pytest.approx(3.0)
    with pytest.raises(DataError, match="same shape"):
        flow_map_error(samples, endpoints[:1])


def test_noise_floor(ring, exact_metrics):
    floor = noise_floor_toy(ring, N, seed=0, max_points=MAX_POINTS)
    assert set(floor) == set(exact_metrics)
    assert floor == noise_floor_toy(ring, N, seed=0, max_points=MAX_POINTS)
    assert floor["swd"] < 0.2 and floor["modes_covered"] == 8
    moons = load_dataset("moons")
    assert noise_floor_toy(moons, 500, max_points=500)["swd"] < 0.15
    with pytest.raises(DataError, match="training set"):
        noise_floor_toy(load_dataset("digits"), 5000)
