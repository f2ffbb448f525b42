"""Uni-Instruct and TDM: the expanded-divergence loss against its closed-form gradient on Gaussians, the generator's
update on Gaussians through each method's own ``losses`` (every denoiser and density ratio exact), TDM's trajectory,
segments and sampling, bad arguments, and exact-teacher runs on the 8-mode ring that fail with the real and fake
scores swapped."""

import math

import pytest
import torch
from torch.nn.functional import cosine_similarity

from exact_ring import RING, ShiftGenerator, gaussian, generator_on_ring, with_scores_swapped
from fewstep.data.batch import Batch, CompositeBatch
from fewstep.errors import ConfigError
from fewstep.methods import METHODS
from fewstep.methods.distribution.tdm import TDM, TDMConfig, segment_bounds
from fewstep.methods.distribution.uni_instruct import (
    SQUARED_TERM,
    UniInstruct,
    UniInstructConfig,
    expanded_divergence_loss,
)
from fewstep.methods.scores import WEIGHTINGS, index_levels, karras_grid
from fewstep.nets import MLP

DT = torch.float64


def log_normal(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``log N(x; mean, var I)`` per sample (``var`` a scalar tensor)."""
    return (-0.5 * (x - mean) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).sum(1)


def closed_form_divergence(m, a, mu, b, sigma, divergence: str) -> torch.Tensor:
    """``sigma^4 E_q[h(r) || s_p - s_q ||^2]`` at level ``sigma`` for ``q = N(m, a^2 I)``, ``p = N(mu, b^2 I)``:
    the score difference is affine, ``alpha x + beta``; reverse KL averages it over ``q``, forward KL
    (``h = r``) over ``p`` (``E_q[r g] = E_p[g]``)."""
    var_q, var_p = a**2 + sigma**2, b**2 + sigma**2
    alpha, beta = 1 / var_q - 1 / var_p, mu / var_p - m / var_q
    var, mean = (var_q, m) if divergence == "reverse_kl" else (var_p, mu)
    return sigma**4 * (alpha**2 * var + (alpha * mean + beta) ** 2).sum()


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_the_expanded_divergence_loss_has_the_closed_form_gradient(divergence):
    """Gaussian generator ``x_G = m + a z`` against a Gaussian teacher at one level; the fake score, the teacher and
    the density ratio exact, frozen, differentiated through the noised sample as the method does. The Monte Carlo
    gradient of the loss in ``m`` and ``a`` equals the closed-form gradient of the expanded divergence."""
    sigma, mu, b = torch.tensor(0.7, dtype=DT), torch.tensor([1.0, -0.5], dtype=DT), torch.tensor(0.4, dtype=DT)
    m0, a0 = torch.tensor([0.2, 0.3], dtype=DT), torch.tensor(0.6, dtype=DT)
    m, a = m0.clone().requires_grad_(True), a0.clone().requires_grad_(True)
    closed_form_divergence(m, a, mu, b, sigma, divergence).backward()
    expected = torch.cat([m.grad, a.grad[None]])

    g = torch.Generator().manual_seed(0)
    m, a = m0.clone().requires_grad_(True), a0.clone().requires_grad_(True)
    z, eps = torch.randn(400_000, 2, generator=g, dtype=DT), torch.randn(400_000, 2, generator=g, dtype=DT)
    x_generated = m + a * z
    x = x_generated + sigma * eps
    real = mu + b**2 / (b**2 + sigma**2) * (x - mu)
    fake = m0 + a0**2 / (a0**2 + sigma**2) * (x - m0)  # the generator's own denoiser, as a fixed function
    ratio = torch.exp(log_normal(x, mu, b**2 + sigma**2) - log_normal(x, m0, a0**2 + sigma**2))
    expanded_divergence_loss(x_generated, real, fake, ratio, divergence).mean().backward()
    torch.testing.assert_close(torch.cat([m.grad, a.grad[None]]), expected, rtol=0.02, atol=2e-3)
    # without the density ratio's own gradient in x (r stopped) forward KL's gradient is wrong: that path matters
    if divergence == "forward_kl":
        m, a = m0.clone().requires_grad_(True), a0.clone().requires_grad_(True)
        x_generated = m + a * z
        x = x_generated + sigma * eps
        real = mu + b**2 / (b**2 + sigma**2) * (x - mu)
        fake = m0 + a0**2 / (a0**2 + sigma**2) * (x - m0)
        expanded_divergence_loss(x_generated, real, fake, ratio.detach(), divergence).mean().backward()
        assert not torch.allclose(torch.cat([m.grad, a.grad[None]]), expected, rtol=0.1)


@pytest.mark.parametrize("divergence", sorted(WEIGHTINGS))
def test_the_squared_terms_coefficient_is_r_h_prime_minus_h(divergence):
    r = torch.tensor([0.1, 0.5, 1.0, 3.0, 20.0], dtype=DT, requires_grad=True)
    h = WEIGHTINGS[divergence](r)
    (h_prime,) = torch.autograd.grad(h.sum() + 0 * r.sum(), r)  # reverse KL's h is a constant
    torch.testing.assert_close(SQUARED_TERM[divergence](r.detach()), (r * h_prime - h).detach())


def test_reverse_kl_is_twice_sids_loss_at_alpha_one_half():
    x_generated, real, fake = (torch.randn(16, 3, generator=torch.Generator().manual_seed(i), dtype=DT)
                               for i in range(3))
    loss = expanded_divergence_loss(x_generated, real, fake, torch.ones(16, dtype=DT), "reverse_kl")
    sid = ((real - fake) * ((real - x_generated) - 0.5 * (real - fake))).sum(1)
    torch.testing.assert_close(loss, 2 * sid)


class ExactRatio(UniInstruct):
    """Uni-Instruct with the exact density ratio of two isotropic Gaussians in place of the discriminator's."""

    name = "uni_instruct_exact_ratio"
    means: tuple[torch.Tensor, torch.Tensor]
    std = 0.3

    def scores(self, x, sigma, cond):
        var = self.std**2 + sigma[:, None] ** 2
        log_ratio = (-0.5 * ((x - self.means[0]) ** 2 - (x - self.means[1]) ** 2) / var).sum(1)
        return self.teacher(x, sigma, cond), self.fake_score(x, sigma, cond), torch.exp(log_ratio)


@pytest.mark.parametrize(("cls", "args"), [(UniInstruct, {"divergence": "reverse_kl"}),
                                           (ExactRatio, {"divergence": "forward_kl"}),
                                           (ExactRatio, {"divergence": "js"}),
                                           (TDM, {"generation_steps": 1})])
def test_the_generators_update_moves_it_to_the_teacher_and_stops_there(cls, args):
    """Through the method's own ``losses``: a Gaussian generator, the teacher's exact denoiser as the real score,
    the generator's own as the fake score (and the exact ratio). The update of ``mu`` points from the generator's
    mean to the teacher's, and is zero when the two distributions are equal."""
    teacher_mean, student_mean, std = torch.tensor([1.0, -2.0], dtype=DT), torch.tensor([0.0, 1.0], dtype=DT), 0.3
    for target, expect in ((teacher_mean, "towards"), (student_mean, "zero")):
        student = ShiftGenerator(student_mean, std)
        config = cls.Config(gan_generator_weight=0.0, **args) if issubclass(cls, UniInstruct) else cls.Config(**args)
        method = cls(gaussian(target, std), student, config)
        method.fake_score = gaussian(student_mean, std)
        method.means = (target, student_mean)
        noise = Batch(noise=torch.randn(4096, 2, generator=torch.Generator().manual_seed(0), dtype=DT))
        batch = CompositeBatch({"noise": noise, "data": Batch(x0=noise.noise)}) if "data" in cls.needs else noise
        method.losses("student", batch, 0, torch.Generator().manual_seed(1))["loss"].backward()
        step = -student.mu.grad
        if expect == "zero":
            assert step.abs().max() < 1e-12
        else:
            assert cosine_similarity(step, teacher_mean - student_mean, dim=0) > 0.99


def small_pair(cls, config):
    torch.manual_seed(0)
    student = cls.build_student(RING.analytic, config, lambda: MLP((2,), width=32, depth=2), RING.sigma_data)
    return cls(RING.analytic, student, config)


def test_tdm_runs_its_students_own_deterministic_trajectory_to_each_drawn_step():
    tdm = small_pair(TDM, TDMConfig())
    levels = tdm.generator_levels(4)
    assert levels == index_levels(4) and tdm.sampling(4).sampler == "euler"
    assert tdm.sampling(4).sigmas == [*levels, 0.0] and tdm.sampling(2).sigmas == [levels[0], levels[2], 0.0]
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0 = tdm.generated(noise, None, torch.Generator().manual_seed(1))
        x, expected = levels[0] * noise, torch.empty_like(x0)
        for k, level in enumerate(levels):  # the same trajectory by hand, one step for all samples
            prediction = tdm.student(x, torch.full((64,), level), None)
            expected[tdm.segment == k] = prediction[tdm.segment == k]
            x = prediction + ((levels[k + 1] if k + 1 < 4 else 0.0) / level) * (x - prediction)
    assert set(tdm.segment.tolist()) == {0, 1, 2, 3}
    torch.testing.assert_close(x0, expected)
    sigma = tdm.loss_levels(x0, torch.Generator().manual_seed(2))
    grid = karras_grid()
    for k, (start, stop) in enumerate(segment_bounds(4, 0.02, 0.98)):
        inside = sigma[tdm.segment == k].double()
        assert float(inside.max()) <= float(grid[start]) + 1e-6 and float(inside.min()) >= float(grid[stop - 1]) - 1e-6
        assert float(grid[start]) <= levels[k] + 1e-9  # a step's levels lie below its own input level
    assert segment_bounds(4, 0.0, 1.0) == [(0, 250), (250, 500), (500, 750), (750, 1000)]


def test_phases_and_names():
    tdm, ui = small_pair(TDM, TDMConfig()), small_pair(UniInstruct, UniInstructConfig())
    assert [p.betas for p in tdm.phases()] == [(0.0, 0.95), (0.0, 0.95)]
    assert TDM.needs == {"noise"} and UniInstruct.needs == {"noise", "data"}
    assert METHODS["tdm"] is TDM and METHODS["uni_instruct"] is UniInstruct
    assert TDM.family == UniInstruct.family == "distribution" and ui.config.divergence == "forward_kl"


@pytest.mark.parametrize(("cls", "bad"), [
    (UniInstruct, {"divergence": "kl"}), (UniInstruct, {"gan_critic_weight": 0.0}), (UniInstruct, {"fake_updates": 0}),
    (TDM, {"generation_steps": 0}), (TDM, {"betas": (1.0, 0.9)}), (TDM, {"generation_steps": 200}),
    (TDM, {"min_level": 0.9, "max_level": 0.5}),
])
def test_bad_configs_are_refused(cls, bad):
    with pytest.raises(ConfigError):
        small_pair(cls, cls.Config(**bad))


class SwappedUniInstruct(UniInstruct):
    """Uni-Instruct with the real and fake scores swapped (the discriminator still reads the fake network)."""

    name = "uni_instruct_swapped"

    def scores(self, x, sigma, cond):
        real, fake, ratio = super().scores(x, sigma, cond)
        return fake, real, ratio


@pytest.mark.parametrize("swap", [False, True])
def test_uni_instruct_on_the_exact_ring(swap):
    """Short run on the exact 8-mode ring with the default forward KL: one-step samples reach most modes with a
    bounded excess NLL; with the scores swapped they do neither."""
    cls = SwappedUniInstruct if swap else UniInstruct
    metrics, excess = generator_on_ring(cls, UniInstructConfig(fake_warmup=30, fake_updates=2), 200)
    ok = metrics["modes_covered"] >= 4 and excess < 16
    assert ok == (not swap), (metrics, excess)


@pytest.mark.parametrize("swap", [False, True])
def test_tdm_on_the_exact_ring_at_its_own_steps(swap):
    """Short run on the exact 8-mode ring, sampled at its 4 trained steps: most modes with a bounded excess NLL;
    with the scores swapped neither."""
    metrics, excess = generator_on_ring(with_scores_swapped(TDM) if swap else TDM, TDMConfig(fake_warmup=30), 200,
                                        nfe=4)
    ok = metrics["modes_covered"] >= 4 and excess < 16
    assert ok == (not swap), (metrics, excess)
