"""Distribution matching (DMD, DMD2) and its shared math (:mod:`fewstep.methods.scores`): the generator's update
on Gaussians, where every denoiser is known in closed form, the phases and idle warm-up, the GAN head, and an
exact-teacher test on the 8-mode ring that fails with the real and fake scores swapped."""

import copy
import itertools

import pytest
import torch

from exact_ring import RING, ShiftGenerator, gaussian, generator_on_ring, with_scores_swapped
from fewstep.data.batch import Batch, CompositeBatch
from fewstep.data.sources import make_source
from fewstep.errors import ConfigError
from fewstep.methods import METHODS
from fewstep.methods.distribution.dmd import DMD, DMDConfig
from fewstep.methods.distribution.dmd2 import DMD2, DMD2Config
from fewstep.methods.scores import (
    dmd_direction,
    generate,
    index_levels,
    karras_grid,
    karras_index_sigma,
    pseudo_target_loss,
)
from fewstep.models.denoiser import EDMDenoiser
from fewstep.nets import MLP
from fewstep.solvers import SIGMA_MAX

DT = torch.float64


def gaussian_denoiser(mean: torch.Tensor, std: torch.Tensor | float):
    """Exact ``E[x0 | x]`` for ``x0 ~ N(mean, diag(std^2))`` and ``x = x0 + sigma eps``."""
    return lambda x, sigma: mean + (std**2 / (std**2 + sigma[:, None] ** 2)) * (x - mean)


def generator_gradient(student_mean: torch.Tensor, student_std: float, teacher_mean: torch.Tensor,
                       teacher_std: float, swap: bool = False) -> torch.Tensor:
    """The gradient of the DMD loss in the mean of a Gaussian generator ``x_G = mu + std z``, with the exact
    denoisers of the teacher's Gaussian (real) and of the generator's own (fake)."""
    g = torch.Generator().manual_seed(0)
    mu = student_mean.clone().requires_grad_(True)
    x_generated = mu + student_std * torch.randn(4096, 2, generator=g, dtype=DT)
    sigma = karras_index_sigma(4096, g, x_generated, 0.02, 0.98)
    x = x_generated.detach() + sigma[:, None] * torch.randn(4096, 2, generator=g, dtype=DT)
    real = gaussian_denoiser(teacher_mean, teacher_std)(x, sigma)
    fake = gaussian_denoiser(student_mean, student_std)(x, sigma)
    direction = dmd_direction(x_generated.detach(), fake, real) if swap else dmd_direction(x_generated.detach(),
                                                                                            real, fake)
    pseudo_target_loss(x_generated, direction).backward()
    return mu.grad


def test_the_generators_update_points_from_its_distribution_to_the_teachers():
    teacher_mean, student_mean = torch.tensor([1.0, -2.0], dtype=DT), torch.tensor([0.0, 1.0], dtype=DT)
    step = -generator_gradient(student_mean, 0.3, teacher_mean, 0.3)  # what gradient descent does to mu
    cosine = torch.nn.functional.cosine_similarity(step, teacher_mean - student_mean, dim=0)
    assert cosine > 0.999
    swapped = -generator_gradient(student_mean, 0.3, teacher_mean, 0.3, swap=True)
    assert torch.nn.functional.cosine_similarity(swapped, teacher_mean - student_mean, dim=0) < -0.999


def test_the_update_is_zero_when_the_generator_matches_the_teacher():
    mean = torch.tensor([0.5, 0.5], dtype=DT)
    assert generator_gradient(mean, 0.3, mean, 0.3).abs().max() == 0


def test_a_too_narrow_generator_is_widened():
    """Same mean, half the teacher's spread: the update moves samples away from the mean (reverse KL's
    gradient also matches spread, not just location)."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4096, 2, generator=g, dtype=DT)
    x_generated = 0.15 * z
    sigma = karras_index_sigma(4096, g, x_generated, 0.02, 0.98)
    x = x_generated + sigma[:, None] * torch.randn(4096, 2, generator=g, dtype=DT)
    zero = torch.zeros(2, dtype=DT)
    step = -dmd_direction(x_generated, gaussian_denoiser(zero, 0.3)(x, sigma), gaussian_denoiser(zero, 0.15)(x, sigma))
    assert float((step * z).sum(1).mean()) > 0  # outward, along each sample's own noise


def test_pseudo_target_loss_gradient_is_the_direction_over_the_dimension():
    x = torch.randn(8, 3, 4, dtype=DT, requires_grad=True)
    direction = torch.randn(8, 3, 4, dtype=DT)
    pseudo_target_loss(x, direction).backward()
    torch.testing.assert_close(x.grad, direction / (12 * 8))


def test_levels_and_the_grid():
    grid = karras_grid()
    assert grid.shape == (1000,)
    assert float(grid[0]) == pytest.approx(SIGMA_MAX) and float(grid[-1]) == pytest.approx(2e-3)
    four, two = index_levels(4), index_levels(2)
    assert four[0] == pytest.approx(SIGMA_MAX) and two == [four[0], four[2]]  # nested schedules
    assert all(a > b for a, b in itertools.pairwise(four))
    sigma = karras_index_sigma(10000, torch.Generator().manual_seed(0), torch.zeros(1, dtype=DT), 0.02, 0.98)
    assert float(sigma.max()) <= float(grid[20]) and float(sigma.min()) >= float(grid[979])


def test_generate_trains_only_the_last_call():
    torch.manual_seed(0)
    student = EDMDenoiser(MLP((2,), width=16, depth=1).double(), RING.sigma_data)
    calls = []
    student.register_forward_hook(lambda module, args, output: calls.append(torch.is_grad_enabled()))
    out = generate(student, torch.randn(5, 2, dtype=DT), index_levels(4)[:3], None, torch.Generator().manual_seed(1))
    assert calls == [False, False, True] and out.requires_grad


def small_pair(cls, config):
    torch.manual_seed(0)
    student = cls.build_student(RING.analytic, config, lambda: MLP((2,), width=32, depth=2), RING.sigma_data)
    return cls(RING.analytic, student, config)


def test_phases_warm_up_and_bad_arguments():
    dmd2 = small_pair(DMD2, DMD2Config(fake_warmup=3))
    phases = {phase.name: phase for phase in dmd2.phases()}
    assert phases["fake_score"].updates == 5 and phases["student"].updates == 1
    head = {id(p) for p in dmd2.head.parameters()}
    assert head <= {id(p) for p in phases["fake_score"].parameters}  # the head trains with the critic
    batch = make_source(DMD2.needs, RING).batch(16, torch.Generator().manual_seed(0))
    assert not dmd2.losses("student", batch, 2, torch.Generator())["loss"].requires_grad  # idle in the warm-up
    losses = dmd2.losses("student", batch, 3, torch.Generator())
    assert losses["loss"].requires_grad and {"dmd", "gan_generator"} <= set(losses)
    critic = dmd2.losses("fake_score", batch, 3, torch.Generator())
    critic["loss"].backward()
    assert all(p.grad is not None for p in dmd2.head.parameters())
    assert all(p.grad is None for p in dmd2.student.parameters())  # the critic's loss never reaches the generator
    for cls, bad in ((DMD, {"fake_updates": 0}), (DMD, {"reg_weight": -1.0}), (DMD, {"generation_steps": 0}),
                     (DMD2, {"gan_critic_weight": -1.0}), (DMD2, {"min_level": 0.9, "max_level": 0.5})):
        with pytest.raises(ConfigError):
            small_pair(cls, cls.Config(**bad))


def test_dmds_regression_pulls_the_generator_onto_the_teacher_pairs():
    """With the fake score equal to the teacher, DMD's gradient is zero and what is left is the regression."""
    dmd = small_pair(DMD, DMDConfig(reg_weight=1.0))
    dmd.fake_score = copy.deepcopy(dmd.student)
    noise = torch.randn(16, 2)
    endpoint = generate(dmd.student, noise, index_levels(1), None, torch.Generator()).detach() + 1.0
    batch = CompositeBatch({"noise": Batch(noise=noise), "teacher_pairs": Batch(noise=noise, endpoint=endpoint)})
    losses = dmd.losses("student", batch, 0, torch.Generator().manual_seed(0))
    assert float(losses["regression"]) == pytest.approx(1.0, rel=1e-5)


GENERATOR_ONLY = {"dmd": {"reg_weight": 0.0}, "dmd2": {"gan_generator_weight": 0.0}, "diff_instruct": {},
                  "swiftbrush": {}, "sid": {}, "sid_fewstep": {"generation_steps": 1}, "sim": {}}


@pytest.mark.parametrize("name", sorted(GENERATOR_ONLY))
def test_each_methods_generator_update_moves_it_to_the_teacher_and_stops_there(name):
    """Every method of the family through its own ``losses``: a Gaussian generator, the teacher's exact Gaussian
    denoiser as the real score and the generator's own as the fake score. The update of ``mu`` points from the
    generator's mean to the teacher's, and is zero when the two distributions are equal."""
    cls = METHODS[name]
    teacher_mean, student_mean, std = torch.tensor([1.0, -2.0], dtype=DT), torch.tensor([0.0, 1.0], dtype=DT), 0.3
    for target, expect in ((teacher_mean, "towards"), (student_mean, "zero")):
        student = ShiftGenerator(student_mean, std)
        method = cls(gaussian(target, std), student, cls.Config(**GENERATOR_ONLY[name]))
        method.fake_score = gaussian(student_mean, std)
        batch = Batch(noise=torch.randn(4096, 2, generator=torch.Generator().manual_seed(0), dtype=DT))
        if cls.needs != {"noise"}:
            batch = CompositeBatch({"noise": batch, "data": Batch(x0=batch.noise), "teacher_pairs": batch})
        method.losses("student", batch, 0, torch.Generator().manual_seed(1))["loss"].backward()
        step = -student.mu.grad
        if expect == "zero":
            assert step.abs().max() < 1e-12
        else:
            assert torch.nn.functional.cosine_similarity(step, teacher_mean - student_mean, dim=0) > 0.999


RING_RUNS = {"dmd2": ({"fake_warmup": 30, "fake_updates": 2}, 200),
             "dmd": ({"fake_warmup": 30, "num_pairs": 2000}, 300),
             "diff_instruct": ({"fake_warmup": 30}, 300)}


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("name", sorted(RING_RUNS))
def test_on_the_exact_ring(name, swap):
    """Short run on the exact 8-mode ring: the one-step generator spreads its samples over every mode with a bounded
    excess NLL; with the scores swapped it does neither. (SwiftBrush reaches no mode in a run this short: its checks
    are the Gaussian tests; docs/distribution.md has its ring readings.)"""
    cls = METHODS[name]
    args, steps = RING_RUNS[name]
    metrics, excess = generator_on_ring(with_scores_swapped(cls) if swap else cls, cls.Config(**args), steps)
    ok = metrics["modes_covered"] == 8 and excess < 20
    assert ok == (not swap), (metrics, excess)


def test_both_are_registered_in_their_family():
    assert METHODS["dmd"] is DMD and METHODS["dmd2"] is DMD2
    assert DMD.family == DMD2.family == "distribution"
    assert DMD.needs == {"noise", "teacher_pairs"} and DMD2.needs == {"noise", "data"}


def test_swiftbrushs_lora_teacher_starts_as_the_teacher_and_trains_only_its_adapter():
    torch.manual_seed(0)
    teacher = EDMDenoiser(MLP((2,), width=32, depth=2).double(), RING.sigma_data)
    cls = METHODS["swiftbrush"]
    config = cls.Config(lora_rank=4, lora_alpha=8.0)
    student = cls.build_student(teacher, config, lambda: None, RING.sigma_data)
    method = cls(teacher, student, config)
    x, sigma = torch.randn(8, 2, dtype=DT), torch.full((8,), 0.7, dtype=DT)
    torch.testing.assert_close(method.fake_score(x, sigma), teacher(x, sigma))  # LoRA B starts at zero
    fake_phase = method.phases()[0]
    names = {id(p): n for n, p in method.fake_score.named_parameters()}
    assert fake_phase.parameters and all("lora_" in names[id(p)] for p in fake_phase.parameters)
    assert method.needs == {"noise"}  # image-free: never real samples
    before = [p.clone() for p in teacher.parameters()]
    batch = Batch(noise=torch.randn(16, 2, dtype=DT))
    method.losses("fake_score", batch, 0, torch.Generator().manual_seed(0))["loss"].backward()
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    with pytest.raises(ConfigError):
        cls(teacher, student, cls.Config(lora_rank=0))
