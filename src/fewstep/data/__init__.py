"""Datasets (:func:`load_dataset`) and the training-signal sources that feed methods (:mod:`.sources`)."""

from __future__ import annotations

from collections.abc import Callable

from fewstep.data import digits, toy2d
from fewstep.data.spec import DatasetSpec, Modes
from fewstep.errors import ConfigError

_BUILDERS: dict[str, Callable[[int], DatasetSpec]] = {
    "ring8": toy2d.ring8,
    "grid25": toy2d.grid25,
    "grid25_imbalanced": toy2d.grid25_imbalanced,
    "checkerboard": toy2d.checkerboard,
    "moons": toy2d.moons,
    "spirals": toy2d.spirals,
    "digits": digits.digits,
}

DATASETS: dict[str, str] = {**toy2d.DESCRIPTIONS, **digits.DESCRIPTIONS}


def load_dataset(name: str, seed: int = 0) -> DatasetSpec:
    """The dataset ``name`` (see :data:`DATASETS`) with its split drawn from ``seed``; same seed, same tensors."""
    if name not in _BUILDERS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {sorted(_BUILDERS)}")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"dataset seed must be a non-negative integer, got {seed!r}")
    return _BUILDERS[name](seed)


__all__ = ["DATASETS", "DatasetSpec", "Modes", "load_dataset"]
