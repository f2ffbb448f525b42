"""The :class:`Student`: a distilled few-step generator, its denoiser and, per NFE, how it samples."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from fewstep.conditions import Condition
from fewstep.data.spec import DatasetSpec
from fewstep.errors import CheckpointError, ConfigError
from fewstep.models.denoiser import Denoiser
from fewstep.models.io import load_model, save_model
from fewstep.solvers import SAMPLERS, Sampling, sample
from fewstep.teachers import check_dataset, dataset_of, model_role, on_device, one_condition
from fewstep.train.trainer import TrainResult


class Student:
    """A distilled few-step generator: its denoiser and, per NFE, how it samples (a
    :class:`~fewstep.solvers.Sampling`: sampler and levels)."""

    def __init__(self, denoiser: Denoiser, method: str, sampling: dict[int, Sampling], dataset: DatasetSpec,
                 metadata: dict | None = None, train_result: TrainResult | None = None):
        self.denoiser, self.method, self.sampling = denoiser.eval(), method, sampling
        self.dataset, self.metadata, self.train_result = dataset, metadata or {}, train_result

    @property
    def name(self) -> str:
        return f"student/{self.method}"

    @torch.no_grad()
    def sample(self, n: int, nfe: int = 1, label: Tensor | None = None, seed: int = 0,
               noise: Tensor | None = None, generator: torch.Generator | None = None,
               cond: Condition | None = None) -> Tensor:
        """``n`` samples at ``nfe`` evaluations, on the student's device (``noise`` and the condition are moved
        there; a stochastic sampler draws from ``generator``, by default one on that device seeded ``seed + 1``).
        ``label`` is a shorthand for ``cond`` when the condition is class labels."""
        if nfe not in self.sampling:
            raise ConfigError(f"this {self.method} student has no sampling schedule for nfe={nfe}; "
                              f"available: {sorted(self.sampling)}")
        if noise is None:
            noise = torch.randn((n, *self.dataset.data_shape), generator=torch.Generator().manual_seed(seed))
        device = self.denoiser.device
        generator = generator if generator is not None else torch.Generator(device).manual_seed(seed + 1)
        return self.sample_with(self.sampling[nfe], noise, one_condition(label, cond), generator)

    @torch.no_grad()
    def sample_with(self, spec: Sampling, noise: Tensor, cond: Condition | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
        """Samples from ``noise`` with the sampler and levels of ``spec`` (e.g. levels under trial), on the
        student's device."""
        noise, cond = on_device(self.denoiser.device, noise, cond)
        sigmas = torch.tensor(spec.sigmas, dtype=noise.dtype)
        return sample(lambda x, s, *target: self.denoiser(x, s, cond, *target), noise, spec.sampler, sigmas,
                      generator)

    def save(self, folder: str | Path) -> None:
        save_model(folder, self.denoiser, {
            "role": "student", "method": self.method, "dataset": self.dataset.name,
            "dataset_kind": self.dataset.kind, "data_shape": list(self.dataset.data_shape),
            "normalisation": self.dataset.normalisation,
            "sampling": {str(nfe): asdict(spec) for nfe, spec in sorted(self.sampling.items())},
            **self.metadata})

    @classmethod
    def load(cls, folder: str | Path, dataset: DatasetSpec | None = None) -> Student:
        """A student saved by :meth:`save`; with ``dataset``, one distilled on it (else refused)."""
        if model_role(folder) != "student":
            raise CheckpointError(f"{folder} holds a fewstep teacher, not a student: use fewstep.Teacher.load")
        denoiser, meta = load_model(folder)
        sampling = _sampling_of(meta, folder)
        if dataset is not None:
            check_dataset(meta, dataset, folder)
        extra = {k: v for k, v in meta.items() if k in ("teacher", "guidance", "method_args")}
        return cls(denoiser, meta.get("method", "?"), sampling, dataset or dataset_of(meta, denoiser), extra)


def _sampling_of(meta: dict, folder: str | Path) -> dict[int, Sampling]:
    """The saved sampling schedules, checked: ``{"<nfe>": {"sampler": <name>, "sigmas": [decreasing levels]}}``."""
    entries = meta.get("sampling")
    if not isinstance(entries, dict) or not entries:
        raise CheckpointError(f"{folder}/fewstep.json has no sampling schedules (a 'sampling' mapping of NFE to "
                              "sampler and levels)")
    sampling = {}
    for nfe, spec in entries.items():
        where = f"{folder}/fewstep.json: sampling[{nfe!r}]"
        if not str(nfe).isdigit() or int(nfe) < 1 or not isinstance(spec, dict):
            raise CheckpointError(f"{where} must map a positive NFE to {{'sampler': ..., 'sigmas': [...]}}")
        sigmas = spec.get("sigmas")
        if spec.get("sampler") not in SAMPLERS or set(spec) != {"sampler", "sigmas"}:
            raise CheckpointError(f"{where}: sampler must be one of {sorted(SAMPLERS)}, with sigmas and nothing else")
        if not isinstance(sigmas, list) or not sigmas or not all(
                isinstance(s, int | float) and math.isfinite(s) and s >= 0 for s in sigmas):
            raise CheckpointError(f"{where}: sigmas must be a list of finite noise levels >= 0")
        sampling[int(nfe)] = Sampling(spec["sampler"], [float(s) for s in sigmas])
    return sampling
