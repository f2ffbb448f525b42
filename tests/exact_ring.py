"""Shared exact-teacher harness for method tests: distil against the closed-form 8-mode ring and apply the
bar every method must meet at 2 NFE (8/8 modes, >= 3x lower excess NLL than the best training-free solver,
within-mode spread in [0.7, 1.3] of the data's)."""

from functools import cache

import torch

from fewstep.api import Student
from fewstep.data import load_dataset
from fewstep.data.sources import RealData
from fewstep.eval.levels import tune_levels
from fewstep.eval.toy import reference_nll, toy_metrics
from fewstep.models.analytic import GaussianMixture
from fewstep.nets import MLP
from fewstep.solvers import ode_endpoint, sample, solve
from fewstep.train.trainer import TrainConfig, train

RING = load_dataset("ring8")
NOISE = torch.randn(4000, 2, generator=torch.Generator().manual_seed(11))


def small_mlp(seed: int = 0, time_frequencies: tuple[float, float] = (1e-3, 1e2)) -> MLP:
    torch.manual_seed(seed)
    return MLP((2,), width=128, depth=3, time_frequencies=time_frequencies)


def low_frequency_mlp(seed: int = 0) -> MLP:
    """The ring recipes' continuous-time student (sCT, sCD, rCM): time features at most 20 radians per unit of
    ``c_noise``."""
    return small_mlp(seed, time_frequencies=(0.1, 20.0))


def distil_on_ring(method_cls, config, steps: int, source=None, lr: float = 1e-3, backbone=small_mlp,
                   seed: int = 0, lr_schedule: str = "constant"):
    """Train ``method_cls`` against the exact ring teacher; return (method, EMA student). ``source`` defaults
    to the ring's training data; ``seed`` seeds both the student's initialisation (``backbone(seed)``) and the
    training run."""
    student = method_cls.build_student(RING.analytic, config, lambda: backbone(seed), RING.sigma_data)
    method = method_cls(RING.analytic, student, config)
    source = source if source is not None else RealData(RING.train_x)
    train_config = TrainConfig(steps=steps, lr=lr, lr_schedule=lr_schedule, seed=seed)
    result = train(method, source, train_config, progress=False)
    return method, result.ema_student


def draw(method, student, nfe: int) -> torch.Tensor:
    spec = method.sampling(nfe)
    denoise = lambda x, s, *target: student(x, s, None, *target)  # noqa: E731  (flow-map samplers pass a target)
    return sample(denoise, NOISE, spec.sampler, torch.tensor(spec.sigmas), torch.Generator().manual_seed(12))


def draw_with_chosen_levels(method, student, nfe: int) -> torch.Tensor:
    """As :func:`draw`, with the levels after the first chosen on the ring's training split
    (:func:`fewstep.tune_levels`), as a recipe with ``eval.tune_levels: true`` does."""
    chosen = Student(student, method.name, {nfe: method.sampling(nfe)}, RING)
    tune_levels(chosen, (nfe,), progress=False)
    spec = chosen.sampling[nfe]
    return sample(student, NOISE, spec.sampler, torch.tensor(spec.sigmas), torch.Generator().manual_seed(12))


@cache
def best_training_free_excess_nll(nfe: int) -> float:
    ref = reference_nll(RING)
    return min(toy_metrics(solve(RING.analytic, NOISE, solver, nfe), RING)["nll"] - ref
               for solver in ("euler", "heun", "dpmpp_2m"))


def passes_issue_bar(samples: torch.Tensor, baseline_excess: float | None = None) -> tuple[bool, dict]:
    """8/8 modes, >= 3x lower excess NLL than the best training-free solver at 2 NFE, spread in [0.7, 1.3]."""
    baseline_excess = best_training_free_excess_nll(2) if baseline_excess is None else baseline_excess
    m = toy_metrics(samples, RING)
    m["excess_nll"] = m["nll"] - reference_nll(RING)
    ok = (m["modes_covered"] == 8 and m["excess_nll"] * 3 <= baseline_excess
          and 0.7 <= m["spread_ratio"] <= 1.3)
    return ok, m


@cache
def exact_endpoints() -> torch.Tensor:
    """The exact teacher ODE's endpoints of :data:`NOISE` (float64 integration)."""
    return ode_endpoint(RING.analytic, NOISE.double()).float()


def flow_map_error(samples: torch.Tensor) -> float:
    """Mean distance of one-step samples from the exact ODE endpoints of the same noise."""
    return float((samples - exact_endpoints()).norm(dim=1).mean())


def with_scores_swapped(cls):
    """A distribution-matching method ``cls`` with the real and fake scores swapped in its generator loss: it
    climbs the divergence instead of descending it (the control an exact-teacher test must fail)."""

    class Swapped(cls):
        name = f"{cls.name}_swapped"

        def dmd_loss(self, x_generated, cond, generator):
            teacher, fake = self.teacher, self.fake_score
            self.teacher, self.fake_score = fake, teacher
            try:
                return super().dmd_loss(x_generated, cond, generator)
            finally:
                self.teacher, self.fake_score = teacher, fake

    return Swapped


def generator_on_ring(cls, config, steps: int, nfe: int = 1) -> tuple[dict, float]:
    """Train the generator of ``cls`` (from its own source: teacher pairs as its config asks, cached) on the ring;
    its metrics at ``nfe`` and excess NLL."""
    from fewstep.cache import cache_dir
    from fewstep.data.sources import TeacherPairs, make_source

    pairs = None
    if "teacher_pairs" in cls.needs:
        pairs = TeacherPairs(RING.analytic, config.num_pairs, cache_dir() / "pairs", config.pair_solver,
                             config.pair_nfe, progress=False)
    method, student = distil_on_ring(cls, config, steps, source=make_source(cls.needs, RING, pairs))
    metrics = toy_metrics(draw(method, student, nfe), RING)
    return metrics, metrics["nll"] - reference_nll(RING)


class ShiftGenerator(torch.nn.Module):
    """A Gaussian generator ``x_G = mu + std z`` in a denoiser's clothes: fed ``level * z`` at ``level``, it returns
    ``mu + std z``. Its ``backbone`` (unused) gives the methods a network to copy."""

    def __init__(self, mu: torch.Tensor, std: float):
        super().__init__()
        self.mu, self.std = torch.nn.Parameter(mu.clone()), std
        self.backbone = MLP((2,), width=16, depth=1).double()
        self.data_shape, self.sigma_data = (2,), 0.5

    def forward(self, x, sigma, cond=None):
        return self.mu + self.std * x / sigma[:, None]


def gaussian(mean: torch.Tensor, std: float) -> GaussianMixture:
    return GaussianMixture(torch.ones(1), mean[None], torch.full((1,), std**2, dtype=torch.float64))
