"""Sample quality on digits, measured in the feature space of a small classifier trained here.

FD-digits is the Fréchet distance (the formula of FID) between Gaussian fits to the 64-d penultimate features
of that classifier. It is *not* FID: Inception features mean nothing on 8x8 images, and values are only
comparable between runs that use the same classifier (same recipe, same train split). Precision and recall
follow Kynkäänniemi et al. 2019 (k-NN balls around real / generated features), density and coverage follow
Naeem et al. 2020 (k-NN balls around real features only).

The classifier trains once, deterministically (fixed seed, one CPU thread, deterministic algorithms), on the
dataset's train split only, and is cached in ``cache_dir()/digits_classifier/`` under a hash of its recipe and
its training data, so a changed recipe or split trains a new one instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fewstep.cache import atomic_write, cache_dir
from fewstep.data.spec import DatasetSpec
from fewstep.errors import DataError

DIGITS_SHAPE = (1, 8, 8)
FEATURE_DIM = 64

# Everything that decides the trained weights; its hash (with the training data's) names the cached file.
RECIPE = {
    "arch": "conv32-conv64-maxpool-fc64-silu",
    "epochs": 20,
    "batch_size": 64,
    "optimizer": "adam",
    "lr": 2e-3,
    "lr_schedule": "cosine",
    "augment_max_shift": 1,
    "augment_noise_std": 0.05,
    "seed": 0,
    "version": 1,
}


class DigitsClassifier(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool, a 64-d feature layer and a linear head over 8x8 digits in [-1, 1].

    Attributes set by :func:`feature_extractor`: ``from_cache`` (weights were loaded, not trained now),
    ``ref_accuracy`` (accuracy on the reference split at training time, or None) and ``recipe_hash``.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.feature_layer = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)
        self.from_cache = False
        self.ref_accuracy: float | None = None
        self.recipe_hash = ""

    def _features(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.silu(self.feature_layer(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)``, with gradients (used for training)."""
        return self.head(self._features(x))

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``(N, 64)`` (float32, on the classifier's device) of images ``(N, 1, 8, 8)``."""
        self.eval()
        return self._features(self._check_images(x))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Predicted class ``(N,)`` of images ``(N, 1, 8, 8)``."""
        self.eval()
        return self.head(self._features(self._check_images(x))).argmax(dim=1)

    def _check_images(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != DIGITS_SHAPE:
            raise DataError(f"digits images must have shape (N, 1, 8, 8), got {tuple(x.shape)}")
        return x.to(device=self.head.weight.device, dtype=torch.float32)


def feature_extractor(dataset: DatasetSpec | None = None) -> DigitsClassifier:
    """The digits classifier, loaded from the cache or trained on ``dataset.train_x`` and cached.

    ``dataset`` defaults to ``fewstep.data.load_dataset("digits")``. Training takes about 5-15 s on one CPU thread.
    """
    if dataset is None:
        from fewstep.data import load_dataset

        dataset = load_dataset("digits")
    _check_digits_dataset(dataset)
    recipe_hash = _recipe_hash(dataset)
    folder = cache_dir() / "digits_classifier"
    weights_path = folder / f"{recipe_hash[:16]}.safetensors"
    info_path = folder / f"{recipe_hash[:16]}.json"
    classifier = _load_cached(weights_path, info_path, recipe_hash, dataset.num_classes)
    if classifier is not None:
        return classifier
    start = time.perf_counter()
    classifier = train_classifier(dataset.train_x, dataset.train_y, dataset.num_classes)
    seconds = time.perf_counter() - start
    if dataset.ref_y is not None:
        classifier.ref_accuracy = float((classifier.predict(dataset.ref_x) == dataset.ref_y).float().mean())
    classifier.recipe_hash = recipe_hash
    atomic_write(weights_path, lambda tmp: save_file(classifier.state_dict(), tmp))
    info = {
        "recipe": RECIPE,
        "recipe_hash": recipe_hash,
        "num_classes": dataset.num_classes,
        "train_size": len(dataset.train_x),
        "ref_accuracy": classifier.ref_accuracy,
        "train_seconds": round(seconds, 2),
        "torch_version": torch.__version__,
    }
    atomic_write(info_path, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    return classifier


def train_classifier(train_x: Tensor, train_y: Tensor, num_classes: int) -> DigitsClassifier:
    """Train a :class:`DigitsClassifier` by :data:`RECIPE`, reproducibly: seeded, one thread, deterministic
    algorithms, random shifts by up to one pixel and small Gaussian noise as augmentation."""
    train_x = train_x.detach().to("cpu", torch.float32)
    train_y = train_y.detach().to("cpu", torch.long)
    batch_size, shift, noise_std = RECIPE["batch_size"], RECIPE["augment_max_shift"], RECIPE["augment_noise_std"]
    with _deterministic_cpu():
        torch.manual_seed(RECIPE["seed"])  # parameter init; the global RNG is restored on exit
        classifier = DigitsClassifier(num_classes)
        generator = torch.Generator().manual_seed(RECIPE["seed"])
        optimizer = torch.optim.Adam(classifier.parameters(), lr=RECIPE["lr"])
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, RECIPE["epochs"])
        classifier.train()
        for _ in range(RECIPE["epochs"]):
            order = torch.randperm(len(train_x), generator=generator)
            for start in range(0, len(train_x), batch_size):
                index = order[start:start + batch_size]
                dy, dx = torch.randint(-shift, shift + 1, (2,), generator=generator).tolist()
                x = _shift(train_x[index], dy, dx)
                x = x + noise_std * torch.randn(x.shape, generator=generator)
                loss = F.cross_entropy(classifier(x), train_y[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            schedule.step()
    classifier.eval()
    return classifier


def frechet_distance(feat_a: Tensor | np.ndarray, feat_b: Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussian fits to two feature sets ``(N, d)`` and ``(M, d)``, in float64:
    ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))``.

    ``tr (C_a C_b)^(1/2)`` is computed as the sum of square roots of the eigenvalues of the symmetric matrix
    ``C_a^(1/2) C_b C_a^(1/2)`` (same spectrum as ``C_a C_b``), so no complex parts arise; eigenvalues that
    rounding makes slightly negative are set to zero, and so is a slightly negative result."""
    a, b = _as_float64(feat_a, "feat_a"), _as_float64(feat_b, "feat_b")
    if a.shape[1] != b.shape[1]:
        raise DataError(f"feature sets must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    sqrt_a = _psd_sqrt(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    eigvals = scipy.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigvals, 0.0, None)).sum()
    distance = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))


def precision_recall_coverage(real_feats: Tensor, fake_feats: Tensor, k: int = 5) -> dict[str, float]:
    """k-NN manifold estimates between real and generated features.

    Each point's ball has the radius of its k-th nearest neighbour within its own set.
    precision: fraction of fake points inside some real ball; recall: fraction of real points inside some
    fake ball (Kynkäänniemi et al. 2019). density: mean number of real balls holding a fake point, over k;
    coverage: fraction of real balls holding at least one fake point (Naeem et al. 2020).
    """
    real = torch.as_tensor(_as_float64(real_feats, "real_feats"))
    fake = torch.as_tensor(_as_float64(fake_feats, "fake_feats"))
    if real.shape[1] != fake.shape[1]:
        raise DataError(f"feature sets must have the same dimension, got {real.shape[1]} and {fake.shape[1]}")
    if k < 1 or min(len(real), len(fake)) <= k:
        raise DataError(f"k={k} needs k >= 1 and more than k real and fake points, "
                        f"got {len(real)} real and {len(fake)} fake")
    real_radius = _kth_neighbour_distance(real, k)
    fake_radius = _kth_neighbour_distance(fake, k)
    fake_to_real = _distances(fake, real)  # (M, N)
    inside_real_ball = fake_to_real <= real_radius[None, :]
    inside_fake_ball = fake_to_real <= fake_radius[:, None]
    return {
        "precision": float(inside_real_ball.any(dim=1).double().mean()),
        "recall": float(inside_fake_ball.any(dim=0).double().mean()),
        "density": float(inside_real_ball.double().sum() / (k * len(fake))),
        "coverage": float(inside_real_ball.any(dim=0).double().mean()),
    }


def digits_metrics(samples: Tensor, dataset: DatasetSpec, labels: Tensor | None = None,
                   classifier: DigitsClassifier | None = None, k: int = 5) -> dict[str, float]:
    """FD-digits, precision, recall, density and coverage of ``samples`` ``(N, 1, 8, 8)`` against
    ``dataset.ref_x``; plus ``class_accuracy`` (fraction classified as the requested class) when the
    conditioning ``labels`` ``(N,)`` are given.

    Samples are clamped to [-1, 1], the data range, before their features are taken. Samples with NaN or
    Inf are dropped and their share reported as ``nonfinite`` (as in :func:`fewstep.eval.toy.toy_metrics`)."""
    if samples.ndim != 4 or tuple(samples.shape[1:]) != DIGITS_SHAPE:
        raise DataError(f"digits samples must have shape (N, 1, 8, 8), got {tuple(samples.shape)}")
    samples = samples.detach().to("cpu", torch.float32)
    if labels is not None:
        labels = labels.detach().to("cpu", torch.long)
        if labels.shape != (len(samples),) or labels.min() < 0 or labels.max() >= dataset.num_classes:
            raise DataError(f"labels must be {len(samples)} class indices in [0, {dataset.num_classes}), "
                            f"got shape {tuple(labels.shape)}")
    finite = torch.isfinite(samples).flatten(1).all(dim=1)
    if finite.sum() < 2:
        raise DataError(f"need at least 2 finite samples to measure, got {int(finite.sum())}")
    samples = samples[finite].clamp(-1.0, 1.0)
    classifier = classifier if classifier is not None else feature_extractor(dataset)
    real_feats = classifier.features(dataset.ref_x).cpu()
    fake_feats = classifier.features(samples).cpu()
    metrics = {"nonfinite": float(1.0 - finite.double().mean()), "fd": frechet_distance(real_feats, fake_feats),
               **precision_recall_coverage(real_feats, fake_feats, k)}
    if labels is not None:
        metrics["class_accuracy"] = float((classifier.predict(samples).cpu() == labels[finite]).double().mean())
    return metrics


def noise_floor_digits(dataset: DatasetSpec, n: int | None = None, seed: int = 0,
                       classifier: DigitsClassifier | None = None, k: int = 5) -> dict[str, float]:
    """The digits metrics between two disjoint real sets: a random size-``n`` subset of ``train_x`` (the
    "samples") and ``ref_x``. A generator cannot be told apart from real data below these values.
    ``n`` defaults to ``len(ref_x)``. ``class_accuracy`` here is the classifier's accuracy on the held-out
    ``ref_x`` (what real, unseen digits score), present when ``ref_y`` exists."""
    n = len(dataset.ref_x) if n is None else n
    if not 0 < n <= len(dataset.train_x):
        raise DataError(f"noise floor size n must be in [1, {len(dataset.train_x)}] (the train split), got {n}")
    classifier = classifier if classifier is not None else feature_extractor(dataset)
    index = torch.randperm(len(dataset.train_x), generator=torch.Generator().manual_seed(seed))[:n]
    metrics = digits_metrics(dataset.train_x[index], dataset, classifier=classifier, k=k)
    if dataset.ref_y is not None:
        metrics["class_accuracy"] = float((classifier.predict(dataset.ref_x).cpu() == dataset.ref_y).double().mean())
    return metrics


def _check_digits_dataset(dataset: DatasetSpec) -> None:
    if tuple(dataset.data_shape) != DIGITS_SHAPE or dataset.train_y is None or dataset.num_classes < 2:
        raise DataError(f"dataset {dataset.name!r} is not a labelled 1x8x8 digits dataset "
                        f"(data_shape {tuple(dataset.data_shape)}, num_classes {dataset.num_classes})")


def _recipe_hash(dataset: DatasetSpec) -> str:
    digest = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    digest.update(dataset.train_x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    digest.update(dataset.train_y.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    digest.update(str(dataset.num_classes).encode())
    return digest.hexdigest()


def _load_cached(weights_path: Path, info_path: Path, recipe_hash: str, num_classes: int) -> DigitsClassifier | None:
    """The cached classifier, or None when it is missing, unreadable or made by another recipe."""
    try:
        info = json.loads(info_path.read_text())
        if info.get("recipe_hash") != recipe_hash:
            return None
        classifier = DigitsClassifier(num_classes)
        classifier.load_state_dict(load_file(weights_path))
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError):  # missing or corrupt cache: train afresh
        return None
    classifier.eval()
    classifier.from_cache = True
    classifier.ref_accuracy = info.get("ref_accuracy")
    classifier.recipe_hash = recipe_hash
    return classifier


@contextmanager
def _deterministic_cpu() -> Iterator[None]:
    """One thread, deterministic algorithms and a forked global RNG; all restored on exit."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


def _shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """Shift images down by ``dy`` and right by ``dx`` whole pixels, filling with the background value -1."""
    pad = max(abs(dy), abs(dx))
    padded = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    height, width = x.shape[-2:]
    return padded[..., pad - dy:pad - dy + height, pad - dx:pad - dx + width]


def _kth_neighbour_distance(points: Tensor, k: int) -> Tensor:
    """Distance from each point to its k-th nearest other point (the point itself is neighbour 0)."""
    return _distances(points, points).kthvalue(k + 1, dim=1).values


def _distances(a: Tensor, b: Tensor) -> Tensor:
    """Exact pairwise Euclidean distances (the matmul shortcut would make equal points slightly apart)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigvals, eigvecs = scipy.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def _as_float64(features: Tensor | np.ndarray, name: str) -> np.ndarray:
    array = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    array = array.astype(np.float64)
    if array.ndim != 2 or len(array) < 2:
        raise DataError(f"{name} must be a (N, d) feature array with N >= 2, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise DataError(f"{name} contains NaN or Inf")
    return array
