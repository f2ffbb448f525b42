"""Training-signal sources: what a method consumes each step, one class per kind of :data:`NEEDS`.

Each source has a ``kind`` (a key of :data:`fewstep.methods.base.NEEDS`) and
``batch(batch_size, generator) -> Batch``. Sources return CPU tensors; the trainer moves them.

* :class:`RealData` (``"data"``): minibatches of training samples, each example once per epoch;
* :class:`TeacherPairs` (``"teacher_pairs"``): (noise, teacher ODE endpoint) pairs, generated once and
  cached in a safetensors file;
* :class:`NoiseOnly` (``"noise"``): standard-normal noise (and random labels for a conditional model);
* :class:`LabelsOnly` (``"labels"``): random class labels (and noise), for data-free conditional methods.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from fewstep.data.spec import DatasetSpec
from fewstep.errors import ConfigError, DataError
from fewstep.methods.base import NEEDS, Batch

TeacherSampleFn = Callable[[Tensor, Tensor | None], Tensor]


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")


class EpochOrder:
    """Indices ``0..n-1`` in a fresh random order every epoch; a draw that crosses an epoch boundary takes
    the rest of the old epoch, then starts the next."""

    def __init__(self, n: int):
        self.n = n
        self.order = torch.empty(0, dtype=torch.long)
        self.position = 0

    def next(self, count: int, generator: torch.Generator) -> Tensor:
        parts = []
        while count > 0:
            if self.position == self.order.shape[0]:
                self.order = torch.randperm(self.n, generator=generator)
                self.position = 0
            take = min(count, self.n - self.position)
            parts.append(self.order[self.position:self.position + take])
            self.position += take
            count -= take
        return torch.cat(parts)

    def state_dict(self) -> dict:
        """The current epoch's order and the position in it, so a resumed run draws the batches it would have."""
        return {"order": self.order.clone(), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if "order" not in state:  # a checkpoint written before orders were saved: start a new epoch
            return
        order, position = state["order"].long(), int(state["position"])
        if order.shape != (self.n,) or not 0 <= position <= self.n:
            raise DataError(f"the saved epoch order covers {order.numel()} samples at position {position}, but this "
                            f"source has {self.n}: resume with the data the run started with")
        self.order, self.position = order, position


class RealData:
    """Minibatches of real samples ``x`` (and labels ``y``), shuffled anew each epoch, without replacement."""

    kind = "data"

    def __init__(self, x: Tensor, y: Tensor | None = None):
        if x.shape[0] == 0:
            raise DataError("RealData needs at least one training sample, got none")
        if y is not None and tuple(y.shape) != (x.shape[0],):
            raise DataError(f"labels must have shape ({x.shape[0]},) to match the samples, got {tuple(y.shape)}")
        self.x, self.y = x, y
        self.order = EpochOrder(x.shape[0])

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        _check_batch_size(batch_size)
        index = self.order.next(batch_size, generator)
        return Batch(x0=self.x[index], label=None if self.y is None else self.y[index])

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


class TeacherPairs:
    """``num_pairs`` (noise, endpoint) pairs with ``endpoint = teacher_sample_fn(noise, label)``, e.g. a Heun
    solve of the teacher's ODE from standard-normal ``noise``.

    The pairs are generated once (``chunk`` at a time, with a progress bar) and cached at ``cache_path``
    (written atomically). A cache is reused only if its ``num_pairs``, ``key`` (a string naming the teacher
    and solver, chosen by the caller), ``seed``, ``data_shape`` and labels all match; otherwise it is
    regenerated. Noise is float32 from ``torch.Generator().manual_seed(seed)``; endpoints are stored float32."""

    kind = "teacher_pairs"

    def __init__(self, teacher_sample_fn: TeacherSampleFn, data_shape: tuple[int, ...], num_pairs: int,
                 cache_path: str | Path, labels: Tensor | None = None, key: str = "", seed: int = 0,
                 chunk: int = 1024, progress: bool = True):
        if num_pairs < 1:
            raise ConfigError(f"num_pairs must be at least 1, got {num_pairs}")
        if chunk < 1:
            raise ConfigError(f"chunk must be at least 1, got {chunk}")
        if labels is not None and tuple(labels.shape) != (num_pairs,):
            raise DataError(f"labels must have shape ({num_pairs},), got {tuple(labels.shape)}")
        self.cache_path = Path(cache_path)
        self.metadata = {"num_pairs": str(num_pairs), "key": key, "seed": str(seed),
                         "data_shape": json.dumps(list(data_shape))}
        cached = self._load(labels)
        if cached is None:
            cached = self._generate(teacher_sample_fn, data_shape, num_pairs, labels, seed, chunk, progress)
            self._save(cached)
        self.noise, self.endpoint = cached["noise"], cached["endpoint"]
        self.label = cached.get("label")
        self.order = EpochOrder(num_pairs)

    def _load(self, labels: Tensor | None) -> dict[str, Tensor] | None:
        """The cached pairs if the file exists, reads, and matches this request; else None."""
        if not self.cache_path.is_file():
            return None
        try:
            with safe_open(str(self.cache_path), framework="pt") as f:
                if f.metadata() != self.metadata:
                    return None
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
        except SafetensorError:
            return None
        cached_labels = tensors.get("label")
        same_labels = (labels is None and cached_labels is None) or (
            labels is not None and cached_labels is not None and torch.equal(labels.long(), cached_labels))
        return tensors if same_labels else None

    def _generate(self, teacher_sample_fn: TeacherSampleFn, data_shape: tuple[int, ...], num_pairs: int,
                  labels: Tensor | None, seed: int, chunk: int, progress: bool) -> dict[str, Tensor]:
        noise = torch.randn(num_pairs, *data_shape, generator=torch.Generator().manual_seed(seed))
        endpoints = []
        with tqdm(total=num_pairs, desc="teacher pairs", unit="pair", disable=not progress) as bar:
            for start in range(0, num_pairs, chunk):
                noise_chunk = noise[start:start + chunk]
                label_chunk = None if labels is None else labels[start:start + chunk]
                endpoint = teacher_sample_fn(noise_chunk, label_chunk)
                if endpoint.shape != noise_chunk.shape:
                    raise DataError(f"teacher_sample_fn must return the noise's shape {tuple(noise_chunk.shape)},"
                                    f" got {tuple(endpoint.shape)}")
                endpoints.append(endpoint.detach().to("cpu", torch.float32))
                bar.update(noise_chunk.shape[0])
        pairs = {"noise": noise, "endpoint": torch.cat(endpoints)}
        if labels is not None:
            pairs["label"] = labels.detach().to("cpu", torch.long)
        return pairs

    def _save(self, pairs: dict[str, Tensor]) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_name(f".{self.cache_path.name}.{os.getpid()}.tmp")
        try:
            save_file({k: v.contiguous() for k, v in pairs.items()}, str(tmp), metadata=self.metadata)
            os.replace(tmp, self.cache_path)
        finally:
            tmp.unlink(missing_ok=True)

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        _check_batch_size(batch_size)
        index = self.order.next(batch_size, generator)
        return Batch(noise=self.noise[index], endpoint=self.endpoint[index],
                     label=None if self.label is None else self.label[index])

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


def _random_labels(num_classes: int, batch_size: int, generator: torch.Generator) -> Tensor:
    return torch.randint(num_classes, (batch_size,), generator=generator)


class NoiseOnly:
    """Standard-normal noise of ``data_shape``; uniformly random labels too when ``num_classes > 0``."""

    kind = "noise"

    def __init__(self, data_shape: tuple[int, ...], num_classes: int = 0):
        self.data_shape, self.num_classes = tuple(data_shape), num_classes

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        _check_batch_size(batch_size)
        noise = torch.randn(batch_size, *self.data_shape, generator=generator)
        label = _random_labels(self.num_classes, batch_size, generator) if self.num_classes > 0 else None
        return Batch(noise=noise, label=label)


class LabelsOnly:
    """Uniformly random class labels in ``[0, num_classes)`` with standard-normal noise of ``data_shape``."""

    kind = "labels"

    def __init__(self, num_classes: int, data_shape: tuple[int, ...]):
        if num_classes < 1:
            raise ConfigError(f"a labels-only source needs a conditional dataset (num_classes >= 1), "
                              f"got num_classes={num_classes}")
        self.num_classes, self.data_shape = num_classes, tuple(data_shape)

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        _check_batch_size(batch_size)
        label = _random_labels(self.num_classes, batch_size, generator)
        return Batch(noise=torch.randn(batch_size, *self.data_shape, generator=generator), label=label)


Source = RealData | TeacherPairs | NoiseOnly | LabelsOnly


def make_source(kind: str, dataset: DatasetSpec, *, teacher_sample_fn: TeacherSampleFn | None = None,
                num_pairs: int | None = None, cache_path: str | Path | None = None, key: str = "",
                seed: int = 0, progress: bool = True) -> Source:
    """The source of ``kind`` (a key of :data:`NEEDS`) for ``dataset``; labels are used when it has classes.

    ``teacher_pairs`` also needs ``teacher_sample_fn``, ``num_pairs`` and ``cache_path``; its labels cycle
    through the classes so every class gets the same number of pairs."""
    if kind not in NEEDS:
        raise ConfigError(f"unknown training-signal kind {kind!r}; choose one of {sorted(NEEDS)}")
    if kind == "data":
        return RealData(dataset.train_x, dataset.train_y if dataset.num_classes > 0 else None)
    if kind == "noise":
        return NoiseOnly(dataset.data_shape, dataset.num_classes)
    if kind == "labels":
        if dataset.num_classes < 1:
            raise ConfigError(f"a labels-only method needs a class-conditional dataset; {dataset.name!r} has no "
                              f"classes")
        return LabelsOnly(dataset.num_classes, dataset.data_shape)
    missing = [name for name, value in (("teacher_sample_fn", teacher_sample_fn), ("num_pairs", num_pairs),
                                        ("cache_path", cache_path)) if value is None]
    if missing:
        raise ConfigError(f"a teacher_pairs source needs {', '.join(missing)}")
    labels = torch.arange(num_pairs) % dataset.num_classes if dataset.num_classes > 0 else None
    return TeacherPairs(teacher_sample_fn, dataset.data_shape, num_pairs, cache_path, labels=labels, key=key,
                        seed=seed, progress=progress)
