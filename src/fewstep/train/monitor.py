"""Sample quality while a student trains: :class:`SampleMonitor`, a :class:`~fewstep.train.trainer.Monitor`.

Every ``every`` steps the trainer calls the monitor on the student (in eval mode, without gradients); it draws
``n_samples`` with the student's sampler from the *same* noise each time (and the same labels ``0, 1, ..., C-1,
0, 1, ...`` for a dataset with ``C`` classes), so the numbers it returns move only because the student does.
The trainer logs them in ``log.csv`` as phase ``monitor``. What it returns depends on the dataset:

* with modes (the Gaussian mixtures): ``modes_covered``, ``mode_balance``, ``mode_weight_worst`` and
  ``mode_weight_worst_relative`` (:func:`fewstep.eval.toy.mode_metrics`) and ``recall``;
* digits (``metric == "fd"``): ``fd``, ``precision`` and ``recall`` in the features of the cached digits
  classifier, against all of ``ref_x`` (:func:`fewstep.eval.digits.digits_metrics`);
* other 2-D sets: ``swd``, ``precision`` and ``recall``.

Precision and recall on points are :func:`~fewstep.eval.digits.precision_recall_coverage` (k-NN balls, k = 5) on
the raw coordinates, against a fixed random subset of at most ``n_samples`` of ``ref_x`` (recall: the share of
reference points within some sample's ball; mode dropping lowers it). Every result also has ``nonfinite``, the
share of samples with NaN or Inf, which are dropped first; with fewer than ``MIN_FINITE`` left the other numbers
are nan, so a monitor never stops a run.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fewstep.data.spec import DatasetSpec
from fewstep.errors import ConfigError
from fewstep.eval.digits import DigitsClassifier, digits_metrics, feature_extractor, precision_recall_coverage
from fewstep.eval.toy import mode_metrics, sliced_wasserstein
from fewstep.models.denoiser import Denoiser
from fewstep.solvers import SAMPLERS, Sampling, sample

MIN_SAMPLES = 10
MIN_FINITE = 10
NEIGHBOURS = 5
DIGITS_KEYS = ("fd", "precision", "recall")
MODE_KEYS = ("modes_covered", "mode_balance", "mode_weight_worst", "mode_weight_worst_relative")
POINTS_KEYS = ("swd", "precision", "recall")


class SampleMonitor:
    """Sample-quality numbers of a student from fixed noise; see the module docstring for what it returns.

    Args:
        dataset: what the student learns; decides the metrics and holds the reference set.
        sampling: the student's sampler and levels at the NFE to watch (e.g. ``method.sampling(2)``).
        every: run every this many training steps.
        n_samples: samples drawn each time (at least ``MIN_SAMPLES``).
        seed: seeds the noise, the reference subset and a stochastic sampler's fresh noise.
    """

    def __init__(self, dataset: DatasetSpec, sampling: Sampling, every: int, n_samples: int = 500, seed: int = 0):
        if not isinstance(every, int) or every < 1:
            raise ConfigError(f"SampleMonitor: every must be an integer >= 1, got {every!r}")
        if not isinstance(n_samples, int) or n_samples < MIN_SAMPLES:
            raise ConfigError(f"SampleMonitor: n_samples must be an integer >= {MIN_SAMPLES}, got {n_samples!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"SampleMonitor: seed must be a non-negative integer, got {seed!r}")
        sigmas = torch.as_tensor(sampling.sigmas, dtype=torch.float64)
        if (sampling.sampler not in SAMPLERS or sigmas.ndim != 1 or len(sigmas) == 0 or not sigmas[0] > 0
                or not (sigmas[1:] < sigmas[:-1]).all()):
            raise ConfigError(f"SampleMonitor: sampling must name one of {sorted(SAMPLERS)} and list decreasing "
                              f"levels starting above 0, got {sampling!r}")
        self.dataset, self.sampler, self.sigmas = dataset, sampling.sampler, sigmas
        self.every, self.seed = every, seed
        generator = torch.Generator().manual_seed(seed)
        self.noise = torch.randn((n_samples, *dataset.data_shape), generator=generator)
        self.labels = torch.arange(n_samples) % dataset.num_classes if dataset.num_classes else None
        if dataset.metric == "fd":
            self.keys = DIGITS_KEYS
        else:
            self.keys = (*MODE_KEYS, "recall") if dataset.modes is not None else POINTS_KEYS
            subset = torch.randperm(len(dataset.ref_x), generator=generator)[:n_samples]
            self.ref = dataset.ref_x[subset].reshape(len(subset), -1).to(torch.float64)
        self._classifier: DigitsClassifier | None = None

    def draw(self, student: Denoiser) -> Tensor:
        """The student's samples ``(n_samples, *data_shape)`` from the fixed noise (and labels), on the CPU."""
        device = student.device
        cond = None if self.labels is None else self.labels.to(device)
        generator = torch.Generator(device).manual_seed(self.seed + 1)
        samples = sample(lambda x, s, *target: student(x, s, cond, *target), self.noise.to(device), self.sampler,
                         self.sigmas, generator)  # every sampler runs without gradients
        return samples.cpu()

    def __call__(self, step: int, student: Denoiser) -> dict[str, float]:
        """The numbers of the module docstring for ``student`` (``step`` is not used: the noise is fixed)."""
        samples = self.draw(student)
        finite = torch.isfinite(samples.reshape(len(samples), -1)).all(1)
        numbers = {"nonfinite": float(1.0 - finite.double().mean())}
        if finite.sum() < MIN_FINITE:
            return numbers | dict.fromkeys(self.keys, math.nan)
        samples = samples[finite]
        if self.dataset.metric == "fd":
            if self._classifier is None:
                self._classifier = feature_extractor(self.dataset)
            digits = digits_metrics(samples, self.dataset, classifier=self._classifier, k=NEIGHBOURS)
            return numbers | {key: digits[key] for key in DIGITS_KEYS}
        x = samples.reshape(len(samples), -1).to(torch.float64)
        knn = precision_recall_coverage(self.ref, x, NEIGHBOURS)
        if self.dataset.modes is not None:
            modes = mode_metrics(x, self.ref, self.dataset.modes)
            return numbers | {key: float(modes[key]) for key in MODE_KEYS} | {"recall": knn["recall"]}
        swd = sliced_wasserstein(x, self.ref, len(self.ref), torch.Generator().manual_seed(self.seed))
        return numbers | {"swd": swd, "precision": knn["precision"], "recall": knn["recall"]}
