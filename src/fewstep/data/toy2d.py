"""2-D toy datasets: exact Gaussian mixtures (ring, grid), a checkerboard with an exact density, and two
shapes without one (moons, spirals).

Every dataset draws ``TRAIN_SIZE`` training and ``REF_SIZE`` reference points from two independent random
streams derived from one seed, so the reference set is a fresh sample, never a part of the training set.
``sigma_data`` is the overall standard deviation (root mean per-coordinate variance): exact for the
mixtures, measured on ``train_x`` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from fewstep.data.spec import DatasetSpec, Modes
from fewstep.models.analytic import GaussianMixture, grid_mixture, ring_mixture

TRAIN_SIZE, REF_SIZE = 20_000, 5_000
TRAIN_STREAM, REF_STREAM = 0, 1

CHECKER_CELLS, CHECKER_HALF_WIDTH = 4, 2.0
MOONS_NOISE, MOONS_CENTRE, MOONS_SCALE = 0.05, (0.5, 0.25), 0.7
SPIRALS_NOISE, SPIRALS_TURNS = 0.05, 1.5

Sampler = Callable[[int, torch.Generator], Tensor]

DESCRIPTIONS = {
    "ring8": "8 Gaussians (std 0.1) on a circle of radius 2; exact analytic teacher",
    "grid25": "5x5 grid of Gaussians (spacing 1, std 0.05); exact analytic teacher",
    "grid25_imbalanced": "5x5 grid of Gaussians with weights spanning 1:20; exact analytic teacher",
    "checkerboard": "uniform on the 8 black cells of a 4x4 checkerboard on [-2, 2]^2; exact density, no modes",
    "moons": "two interleaved half circles (make_moons, noise 0.05); no exact density",
    "spirals": "two interleaved spirals (1.5 turns, noise 0.05); no exact density",
}


def stream_generator(seed: int, stream: int) -> torch.Generator:
    """An independent random stream ``stream`` of ``seed`` (numpy's SeedSequence spreads the two)."""
    state = np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _draw(sampler: Sampler, seed: int) -> tuple[Tensor, Tensor]:
    """Training and reference sets from independent streams, as float32."""
    train_x = sampler(TRAIN_SIZE, stream_generator(seed, TRAIN_STREAM))
    ref_x = sampler(REF_SIZE, stream_generator(seed, REF_STREAM))
    return train_x.float(), ref_x.float()


def _overall_std(x: Tensor) -> float:
    return float(((x - x.mean(0)) ** 2).mean().sqrt())


def mixture_dataset(name: str, mixture: GaussianMixture, seed: int) -> DatasetSpec:
    """A dataset that is exactly ``mixture``: analytic teacher, exact density and modes all set."""
    train_x, ref_x = _draw(lambda n, g: mixture.sample(n, generator=g), seed)
    modes = Modes(means=mixture.means.clone(), stds=mixture.component_std(), weights=mixture.log_weights.exp())
    return DatasetSpec(name=name, data_shape=mixture.data_shape, train_x=train_x, ref_x=ref_x, analytic=mixture,
                       log_prob=mixture.log_prob, modes=modes, sigma_data=mixture.data_std(),
                       description=DESCRIPTIONS[name])


def ring8(seed: int = 0) -> DatasetSpec:
    return mixture_dataset("ring8", ring_mixture(), seed)


def grid25(seed: int = 0) -> DatasetSpec:
    return mixture_dataset("grid25", grid_mixture(), seed)


def grid25_imbalanced(seed: int = 0) -> DatasetSpec:
    return mixture_dataset("grid25_imbalanced", grid_mixture(imbalanced=True), seed)


def _black_cells() -> Tensor:
    """Lower-left corners ``(8, 2)`` of the black cells (column + row even) of the checkerboard."""
    idx = torch.arange(CHECKER_CELLS)
    cells = torch.cartesian_prod(idx, idx)
    black = cells[(cells.sum(1) % 2) == 0]
    return black.to(torch.float64) - CHECKER_HALF_WIDTH


def checkerboard_log_prob(x: Tensor) -> Tensor:
    """Exact log-density ``(B,)`` float64: ``-log(area)`` on the black cells, ``-inf`` everywhere else."""
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    inside = ((flat >= -CHECKER_HALF_WIDTH) & (flat < CHECKER_HALF_WIDTH)).all(1)
    cell = torch.floor(flat + CHECKER_HALF_WIDTH)
    black = inside & ((cell.sum(1) % 2) == 0)
    log_prob = torch.full(black.shape, -math.inf, dtype=torch.float64, device=flat.device)
    log_prob[black] = -math.log(_black_cells().shape[0])  # each cell has area 1
    return log_prob


def sample_checkerboard(n: int, generator: torch.Generator) -> Tensor:
    corners = _black_cells()
    which = torch.randint(corners.shape[0], (n,), generator=generator)
    return corners[which] + torch.rand(n, 2, generator=generator, dtype=torch.float64)


def checkerboard(seed: int = 0) -> DatasetSpec:
    train_x, ref_x = _draw(sample_checkerboard, seed)
    return DatasetSpec(name="checkerboard", data_shape=(2,), train_x=train_x, ref_x=ref_x,
                       log_prob=checkerboard_log_prob, sigma_data=_overall_std(train_x),
                       description=DESCRIPTIONS["checkerboard"])


def sample_moons(n: int, generator: torch.Generator) -> Tensor:
    """scikit-learn's ``make_moons`` shape (noise 0.05 before scaling) with uniformly random angles instead
    of evenly spaced ones, so that train and reference are independent draws; centred, overall std ~1."""
    angle = torch.rand(n, generator=generator, dtype=torch.float64) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, torch.cos(angle), 1.0 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x, y], 1) + MOONS_NOISE * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return (points - torch.tensor(MOONS_CENTRE, dtype=torch.float64)) / MOONS_SCALE


def moons(seed: int = 0) -> DatasetSpec:
    train_x, ref_x = _draw(sample_moons, seed)
    return DatasetSpec(name="moons", data_shape=(2,), train_x=train_x, ref_x=ref_x,
                       sigma_data=_overall_std(train_x),
                       description=DESCRIPTIONS["moons"])


def sample_spirals(n: int, generator: torch.Generator) -> Tensor:
    """Two interleaved arms ``r = theta`` of ``SPIRALS_TURNS`` turns, the second the first rotated by pi.

    ``theta = theta_max sqrt(u)`` spreads points about evenly along each arm; dividing by ``theta_max / 2``
    makes the overall std exactly 1 before the Gaussian noise (std 0.05) is added."""
    theta_max = 2 * math.pi * SPIRALS_TURNS
    theta = theta_max * torch.sqrt(torch.rand(n, generator=generator, dtype=torch.float64))
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, 1.0, -1.0).to(torch.float64)
    arm = (sign * theta)[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], 1) / (theta_max / 2)
    return arm + SPIRALS_NOISE * torch.randn(n, 2, generator=generator, dtype=torch.float64)


def spirals(seed: int = 0) -> DatasetSpec:
    train_x, ref_x = _draw(sample_spirals, seed)
    return DatasetSpec(name="spirals", data_shape=(2,), train_x=train_x, ref_x=ref_x,
                       sigma_data=_overall_std(train_x),
                       description=DESCRIPTIONS["spirals"])
