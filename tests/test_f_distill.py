"""f-distill: the weights h(r) per divergence, reverse KL reducing to DMD2 exactly, the weighted update on Gaussians
with an exact density ratio, bad arguments, and an exact-teacher test on the 8-mode ring that fails with the real
and fake scores swapped."""

import math

import pytest
import torch
from torch.nn.functional import cosine_similarity

from exact_ring import RING, generator_on_ring
from fewstep.data.sources import make_source
from fewstep.errors import ConfigError
from fewstep.methods.distribution.dmd2 import DMD2, DMD2Config
from fewstep.methods.distribution.f_distill import FDistill, FDistillConfig, divergence_weight
from fewstep.methods.scores import WEIGHTINGS, density_ratio, dmd_direction, karras_index_sigma, pseudo_target_loss
from fewstep.nets import MLP

DT = torch.float64
H = {"reverse_kl": lambda r: 1.0, "forward_kl": lambda r: r, "js": lambda r: r / (1 + r),
     "squared_hellinger": math.sqrt, "jeffreys": lambda r: 1 + r, "sf": lambda r: 1 / (1 + r),
     "neyman": lambda r: 1 / r}


@pytest.mark.parametrize("divergence", sorted(H))
def test_each_divergence_weights_by_its_h_normalised_by_the_batch_mean(divergence):
    logit = torch.tensor([-30.0, -1.0, 0.0, 0.5, 2.0, 30.0], dtype=DT)
    r = [0.1, math.exp(-1), 1.0, math.exp(0.5), math.exp(2), 20.0]  # clamped to [0.1, 20]
    torch.testing.assert_close(density_ratio(logit), torch.tensor(r, dtype=DT))
    h = torch.tensor([H[divergence](value) for value in r], dtype=DT)
    torch.testing.assert_close(divergence_weight(divergence, logit), h / h.mean())


def test_the_divergences_are_the_papers_seven():
    assert set(WEIGHTINGS) == set(H) and FDistillConfig().divergence == "js"
    assert FDistill.name == "f_distill" and FDistill.family == "distribution" and FDistill.needs == DMD2.needs


def small_pair(cls, config):
    torch.manual_seed(0)
    student = cls.build_student(RING.analytic, config, lambda: MLP((2,), width=32, depth=2), RING.sigma_data)
    return cls(RING.analytic, student, config)


def generator_step(cls, config, batch):
    """The generator's losses and parameter gradients on ``batch`` (fixed seeds)."""
    method = small_pair(cls, config)
    losses = method.losses("student", batch, 0, torch.Generator().manual_seed(3))
    losses["loss"].backward()
    return losses, [p.grad.clone() for p in method.student.parameters()]


def test_reverse_kl_is_dmd2_exactly_and_other_divergences_are_not():
    batch = make_source(DMD2.needs, RING).batch(64, torch.Generator().manual_seed(0))
    dmd2_losses, dmd2_grads = generator_step(DMD2, DMD2Config(), batch)
    losses, grads = generator_step(FDistill, FDistillConfig(divergence="reverse_kl"), batch)
    assert set(losses) == set(dmd2_losses)
    assert all(torch.equal(losses[key], dmd2_losses[key]) for key in losses)
    assert all(torch.equal(a, b) for a, b in zip(grads, dmd2_grads, strict=True))
    forward_losses, forward_grads = generator_step(FDistill, FDistillConfig(divergence="forward_kl"), batch)
    assert torch.equal(forward_losses["gan_generator"], dmd2_losses["gan_generator"])
    assert not torch.equal(forward_losses["dmd"], dmd2_losses["dmd"])
    assert not all(torch.equal(a, b) for a, b in zip(forward_grads, dmd2_grads, strict=True))


def log_normal(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((x - mean) ** 2 / var[:, None] + torch.log(2 * math.pi * var[:, None])).sum(1)


def weighted_gradient(divergence: str, student_mean, student_std: float, teacher_mean, teacher_std: float):
    """The gradient in the mean of a Gaussian generator ``x_G = mu + std z`` of f-distill's generator loss, with
    the exact denoisers of both Gaussians and the exact log density ratio as the discriminator's logit."""
    g = torch.Generator().manual_seed(0)
    mu = student_mean.clone().requires_grad_(True)
    x_generated = mu + student_std * torch.randn(8192, 2, generator=g, dtype=DT)
    sigma = karras_index_sigma(8192, g, x_generated, 0.02, 0.98)
    x = x_generated.detach() + sigma[:, None] * torch.randn(8192, 2, generator=g, dtype=DT)

    def denoiser(mean, std):
        return mean + (std**2 / (std**2 + sigma[:, None] ** 2)) * (x - mean)

    log_ratio = (log_normal(x, teacher_mean, teacher_std**2 + sigma**2)
                 - log_normal(x, student_mean, student_std**2 + sigma**2))
    direction = dmd_direction(x_generated.detach(), denoiser(teacher_mean, teacher_std),
                              denoiser(student_mean, student_std))
    weight = divergence_weight(divergence, log_ratio)
    pseudo_target_loss(x_generated, direction * weight[:, None]).backward()
    return mu.grad


@pytest.mark.parametrize("divergence", sorted(H))
@pytest.mark.parametrize("teacher_std", [0.3, 0.5])
def test_the_weighted_update_points_from_the_students_distribution_to_the_teachers(divergence, teacher_std):
    teacher_mean, student_mean = torch.tensor([1.0, -2.0], dtype=DT), torch.tensor([0.0, 1.0], dtype=DT)
    step = -weighted_gradient(divergence, student_mean, 0.3, teacher_mean, teacher_std)  # what descent does to mu
    assert cosine_similarity(step, teacher_mean - student_mean, dim=0) > 0.99


@pytest.mark.parametrize("divergence", sorted(H))
def test_the_weighted_update_is_zero_when_the_student_matches_the_teacher(divergence):
    mean = torch.tensor([0.5, 0.5], dtype=DT)
    assert weighted_gradient(divergence, mean, 0.3, mean, 0.3).abs().max() == 0


@pytest.mark.parametrize("bad", [{"divergence": "kl"}, {"divergence": "JS"}, {"gan_critic_weight": 0.0},
                                 {"fake_updates": 0}, {"gan_generator_weight": -1.0}])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(ConfigError):
        small_pair(FDistill, FDistillConfig(**bad))


def test_reverse_kl_needs_no_discriminator():
    assert small_pair(FDistill, FDistillConfig(divergence="reverse_kl", gan_critic_weight=0.0)).head is not None


class SwappedFDistill(FDistill):
    """f-distill with the real and fake scores swapped: it climbs the divergence instead of descending it."""

    name = "f_distill_swapped"

    def scores(self, x, sigma, cond):
        real, fake, logit = super().scores(x, sigma, cond)
        return fake, real, logit


@pytest.mark.parametrize("cls", [FDistill, SwappedFDistill])
def test_f_distill_on_the_exact_ring(cls):
    """Short run on the exact 8-mode ring with the default JS weighting: one-step samples over every mode, most of
    them inside one; with the scores swapped neither."""
    metrics, excess = generator_on_ring(cls, FDistillConfig(fake_warmup=30, fake_updates=2), 300)
    ok = metrics["modes_covered"] == 8 and excess < 20
    assert ok == (cls is FDistill), (metrics, excess)
