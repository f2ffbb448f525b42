"""Training-signal sources: what a method consumes each step, one class per kind of :data:`NEEDS`, and a
composite for methods that need several kinds.

Each source has a ``kind``, ``batch(batch_size, generator)`` and ``teacher_evals`` (the teacher evaluations its
signal cost to make: non-zero only for teacher pairs). Sources return CPU tensors; the trainer moves them.

* :class:`RealData` (``"data"``): minibatches of training samples, each example once per epoch;
* :class:`TeacherPairs` (``"teacher_pairs"``): (noise, endpoint) pairs of any denoiser's ODE solved with a named
  solver, generated once and cached in a safetensors file keyed by the denoiser and the solver;
* :class:`NoiseOnly` (``"noise"``): standard-normal noise (and random labels for a conditional model);
* :class:`LabelsOnly` (``"labels"``): random class labels (and noise), for data-free conditional methods;
* :class:`CompositeSource`: one source per kind, drawn together into a :class:`~fewstep.data.batch.CompositeBatch`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from fewstep.conditions import Condition, TextCondition
from fewstep.data.batch import NEEDS, Batch, CompositeBatch
from fewstep.data.spec import DatasetSpec
from fewstep.errors import ConfigError, DataError
from fewstep.models.denoiser import CountingDenoiser, Denoiser, fingerprint, start_level
from fewstep.solvers import SIGMA_MAX, TEACHER_SOLVERS, solve
from fewstep.threads import share_cpu


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
    teacher_evals = 0

    def __init__(self, x: Tensor, y: Condition | None = None):
        if x.shape[0] == 0:
            raise DataError("this method trains on real samples and the dataset has none; give it data (for a "
                            "text-to-image job: captioned images) or use a data-free method")
        if isinstance(y, TextCondition) and len(y) != x.shape[0]:
            raise DataError(f"{len(y)} text conditions for {x.shape[0]} samples: give one per sample")
        if isinstance(y, Tensor) and tuple(y.shape) != (x.shape[0],):
            raise DataError(f"labels must have shape ({x.shape[0]},) to match the samples, got {tuple(y.shape)}")
        self.x, self.y = x, y
        self.order = EpochOrder(x.shape[0])

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        _check_batch_size(batch_size)
        index = self.order.next(batch_size, generator)
        return Batch(x0=self.x[index], cond=None if self.y is None else self.y[index])

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


class TeacherPairs:
    """``num_pairs`` (noise, endpoint) pairs: ``endpoint`` is ``denoiser``'s ODE solved from standard-normal ``noise``
    by ``solver`` at ``nfe`` evaluations (:func:`fewstep.solvers.solve`), conditioned on ``labels`` when given.

    The pairs are generated once (``chunk`` at a time, with a progress bar) and cached in ``cache_dir`` in a file
    named by a hash of everything that decides them: the denoiser's :func:`~fewstep.models.denoiser.fingerprint`
    (weights and configuration, guidance included), the solver and its NFE, the number of pairs, the seed, the
    sample shape and the labels. So a cache is reused only for exactly these pairs, and pairs of another solver or
    another denoiser go to another file. ``teacher_evals`` is what generating them cost (recorded with the cache,
    so a reused cache charges the same). Noise is float32 from ``torch.Generator().manual_seed(seed)``; endpoints
    are stored float32."""

    kind = "teacher_pairs"

    def __init__(self, denoiser: Denoiser, num_pairs: int, cache_dir: str | Path, solver: str = "heun",
                 nfe: int = 35, labels: Tensor | None = None, seed: int = 0, chunk: int = 1024,
                 progress: bool = True):
        if num_pairs < 1:
            raise ConfigError(f"num_pairs must be at least 1, got {num_pairs}")
        if chunk < 1:
            raise ConfigError(f"chunk must be at least 1, got {chunk}")
        if solver not in TEACHER_SOLVERS or nfe < 1:
            raise ConfigError(f"teacher pairs need a solver of {TEACHER_SOLVERS} and nfe >= 1, got {solver!r} at "
                              f"{nfe}")
        if labels is not None and tuple(labels.shape) != (num_pairs,):
            raise DataError(f"labels must have shape ({num_pairs},), got {tuple(labels.shape)}")
        data_shape = tuple(denoiser.data_shape)
        self.metadata = {"denoiser": fingerprint(denoiser), "solver": solver, "nfe": str(nfe),
                         "num_pairs": str(num_pairs), "seed": str(seed), "data_shape": json.dumps(list(data_shape)),
                         "labels": "none" if labels is None else hashlib.sha256(
                             labels.long().contiguous().numpy().tobytes()).hexdigest()}
        if start_level(denoiser) != SIGMA_MAX:  # a VP teacher's solves start at its last level (older caches: at 80)
            self.metadata["start_level"] = f"{start_level(denoiser):.6g}"
        key = hashlib.sha256(json.dumps(self.metadata, sort_keys=True).encode()).hexdigest()[:16]
        self.cache_path = Path(cache_dir) / f"pairs-{key}.safetensors"
        cached = self._load()
        if cached is None:
            cached = self._generate(denoiser, solver, nfe, data_shape, num_pairs, labels, seed, chunk, progress)
            self._save(cached)
        self.teacher_evals = int(cached["teacher_evals"])
        self.noise, self.endpoint = cached["noise"], cached["endpoint"]
        self.label = cached.get("label")
        self.order = EpochOrder(num_pairs)

    def _load(self) -> dict | None:
        """The cached pairs (and their recorded cost) if the file exists, reads, and was made by this request."""
        if not self.cache_path.is_file():
            return None
        try:
            with safe_open(str(self.cache_path), framework="pt") as f:
                metadata = f.metadata() or {}
                if {k: metadata.get(k) for k in self.metadata} != self.metadata:
                    return None
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
        except SafetensorError:
            return None
        return {**tensors, "teacher_evals": int(metadata.get("teacher_evals", 0))}

    def _generate(self, denoiser: Denoiser, solver: str, nfe: int, data_shape: tuple[int, ...], num_pairs: int,
                  labels: Tensor | None, seed: int, chunk: int, progress: bool) -> dict:
        counted = CountingDenoiser(denoiser)
        device = denoiser.device
        noise = torch.randn(num_pairs, *data_shape, generator=torch.Generator().manual_seed(seed))
        endpoints = []
        with tqdm(total=num_pairs, desc=f"teacher pairs ({solver}@{nfe})", unit="pair", disable=not progress) as bar:
            for start in range(0, num_pairs, chunk):
                share_cpu()
                noise_chunk = noise[start:start + chunk].to(device)
                cond = None if labels is None else labels[start:start + chunk].to(device)
                with torch.no_grad():
                    endpoint = solve(lambda x, s, cond=cond: counted(x, s, cond), noise_chunk, solver, nfe,
                                     sigma_max=start_level(denoiser))
                endpoints.append(endpoint.detach().to("cpu", torch.float32))
                bar.update(noise_chunk.shape[0])
        pairs = {"noise": noise, "endpoint": torch.cat(endpoints), "teacher_evals": counted.evals}
        if labels is not None:
            pairs["label"] = labels.detach().to("cpu", torch.long)
        return pairs

    def _save(self, pairs: dict) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_name(f".{self.cache_path.name}.{os.getpid()}.tmp")
        tensors = {k: v.contiguous() for k, v in pairs.items() if isinstance(v, Tensor)}
        try:
            save_file(tensors, str(tmp), metadata={**self.metadata, "teacher_evals": str(pairs["teacher_evals"])})
            os.replace(tmp, self.cache_path)
        finally:
            tmp.unlink(missing_ok=True)

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        _check_batch_size(batch_size)
        index = self.order.next(batch_size, generator)
        return Batch(noise=self.noise[index], endpoint=self.endpoint[index],
                     cond=None if self.label is None else self.label[index])

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


def _random_labels(num_classes: int, batch_size: int, generator: torch.Generator) -> Tensor:
    return torch.randint(num_classes, (batch_size,), generator=generator)


class NoiseOnly:
    """Standard-normal noise of ``data_shape``; uniformly random labels too when ``num_classes > 0``, or rows drawn
    uniformly from ``conditions`` (encoded prompts) when given."""

    kind = "noise"
    teacher_evals = 0

    def __init__(self, data_shape: tuple[int, ...], num_classes: int = 0, conditions: TextCondition | None = None):
        self.data_shape, self.num_classes, self.conditions = tuple(data_shape), num_classes, conditions

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        _check_batch_size(batch_size)
        noise = torch.randn(batch_size, *self.data_shape, generator=generator)
        if self.conditions is not None:
            return Batch(noise=noise, cond=self.conditions[torch.randint(len(self.conditions), (batch_size,),
                                                                         generator=generator)])
        label = _random_labels(self.num_classes, batch_size, generator) if self.num_classes > 0 else None
        return Batch(noise=noise, cond=label)


class LabelsOnly:
    """Uniformly random class labels in ``[0, num_classes)`` with standard-normal noise of ``data_shape``."""

    kind = "labels"
    teacher_evals = 0

    def __init__(self, num_classes: int, data_shape: tuple[int, ...]):
        if num_classes < 1:
            raise ConfigError(f"a labels-only source needs a conditional dataset (num_classes >= 1), "
                              f"got num_classes={num_classes}")
        self.num_classes, self.data_shape = num_classes, tuple(data_shape)

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        _check_batch_size(batch_size)
        label = _random_labels(self.num_classes, batch_size, generator)
        return Batch(noise=torch.randn(batch_size, *self.data_shape, generator=generator), cond=label)


class CompositeSource:
    """One source per kind of training signal, drawn together: each step takes ``batch_size`` samples from every
    source, in a fixed order of kinds, into a :class:`~fewstep.data.batch.CompositeBatch`."""

    kind = "composite"

    def __init__(self, sources: dict[str, object]):
        if len(sources) < 2:
            raise ConfigError(f"a composite source joins at least two kinds, got {sorted(sources)}")
        self.sources = dict(sorted(sources.items()))

    @property
    def teacher_evals(self) -> int:
        return sum(source.teacher_evals for source in self.sources.values())

    def batch(self, batch_size: int, generator: torch.Generator) -> CompositeBatch:
        return CompositeBatch({kind: source.batch(batch_size, generator) for kind, source in self.sources.items()})

    def state_dict(self) -> dict:
        return {f"{kind}.{key}": value for kind, source in self.sources.items() if hasattr(source, "state_dict")
                for key, value in source.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        for kind, source in self.sources.items():
            if hasattr(source, "load_state_dict"):
                source.load_state_dict({key.removeprefix(f"{kind}."): value for key, value in state.items()
                                        if key.startswith(f"{kind}.")})


Source = RealData | TeacherPairs | NoiseOnly | LabelsOnly | CompositeSource


def pair_labels(dataset: DatasetSpec, num_pairs: int) -> Tensor | None:
    """Labels of a conditional dataset's teacher pairs, cycling through the classes so every class gets the same
    number of pairs; None for an unconditional one."""
    return torch.arange(num_pairs) % dataset.num_classes if dataset.num_classes > 0 else None


def make_source(needs: Iterable[str], dataset: DatasetSpec, pairs: TeacherPairs | None = None) -> Source:
    """The source for a method's ``needs`` (kinds of :data:`NEEDS`) on ``dataset``: one source for one kind, a
    :class:`CompositeSource` for several. ``teacher_pairs`` comes ready-made in ``pairs`` (it needs a denoiser
    and a solver, which the caller chooses); labels are used when the dataset has classes."""
    kinds = sorted(set(needs))
    unknown = [kind for kind in kinds if kind not in NEEDS]
    if not kinds or unknown:
        raise ConfigError(f"unknown training-signal kind {unknown[0] if unknown else None!r}; choose from "
                          f"{sorted(NEEDS)}")
    sources = {kind: _single_source(kind, dataset, pairs) for kind in kinds}
    return sources[kinds[0]] if len(kinds) == 1 else CompositeSource(sources)


def _single_source(kind: str, dataset: DatasetSpec, pairs: TeacherPairs | None) -> Source:
    if kind == "data":
        text = isinstance(dataset.train_y, TextCondition)
        return RealData(dataset.train_x, dataset.train_y if dataset.num_classes > 0 or text else None)
    if kind == "noise":
        return NoiseOnly(dataset.data_shape, dataset.num_classes, dataset.conditions)
    if kind == "labels":
        if dataset.num_classes < 1:
            raise ConfigError(f"a labels-only method needs a class-conditional dataset; {dataset.name!r} has no "
                              f"classes")
        return LabelsOnly(dataset.num_classes, dataset.data_shape)
    if pairs is None:
        raise ConfigError("a teacher_pairs source must be made first (fewstep.data.sources.TeacherPairs) and passed "
                          "as pairs=")
    return pairs
