"""BOOT: the signal-space flow map's boundary, the bootstrapping loss's fixed point (the teacher's DDIM trajectory
on the grid), restarts, its data-free source, and an exact-teacher test on the 8-mode ring that fails when the
teacher's step is flipped."""

import pytest
import torch

from exact_ring import RING, best_training_free_excess_nll, distil_on_ring, draw, passes_issue_bar
from fewstep.data.batch import Batch
from fewstep.data.sources import NoiseOnly, make_source
from fewstep.errors import ConfigError
from fewstep.methods import METHODS
from fewstep.methods.flow.boot import BOOT, BOOTConfig
from fewstep.models.analytic import GaussianMixture, ring_mixture
from fewstep.models.denoiser import Denoiser, EDMDenoiser, TwoTimeDenoiser
from fewstep.nets import MLP, add_extra_conditions
from fewstep.solvers import count_nfe, sample_euler

DT = torch.float64


def gaussian_teacher(variance: float) -> GaussianMixture:
    return GaussianMixture(torch.ones(1, dtype=DT), torch.zeros(1, 2, dtype=DT), torch.full((1,), variance, dtype=DT))


class GridDDIMFlowMap(Denoiser):
    """The ``g`` whose flow map ``G(x, a, s)`` is the teacher's DDIM (Euler) solve from ``a`` to ``s`` along the
    levels of ``grid`` (both on it): the fixed point of BOOT's bootstrapping on that grid."""

    data_shape = (2,)

    def __init__(self, teacher: Denoiser, grid: torch.Tensor):
        super().__init__()
        self.teacher, self.grid = teacher, grid

    def forward(self, x, a, cond=None, s=None):
        s = torch.zeros_like(a) if s is None else s
        rows = []
        for row in range(x.shape[0]):
            levels = self.grid[(self.grid <= a[row]) & (self.grid >= s[row])]
            rows.append(sample_euler(self.teacher, x[row:row + 1], levels))
        jumped, ratio = torch.cat(rows), (s / a)[:, None]
        return (jumped - ratio * x) / (1 - ratio)


def random_student(seed: int = 0) -> TwoTimeDenoiser:
    torch.manual_seed(seed)
    student = TwoTimeDenoiser(add_extra_conditions(MLP((2,), width=32, depth=2), 1), sigma_data=1.4)
    with torch.no_grad():
        for p in student.backbone.extra_embeddings.parameters():
            p.normal_(0, 0.3)
    return student


# ----------------------------------------------------------------------------------------------- math


def test_the_state_at_the_top_is_pure_noise_and_the_jump_to_zero_is_the_sample():
    """G(T eps, T, T) = T eps exactly (BOOT's boundary y_T = 0); G(T eps, T, 0) = g(T eps, T, 0), one call."""
    student, noise = random_student(), torch.randn(64, 2)
    top = torch.full((64,), 80.0)
    assert torch.equal(BOOT.jump(student, 80.0 * noise, top, top, None), 80.0 * noise)
    assert torch.equal(BOOT.jump(student, 80.0 * noise, top, torch.zeros(64), None), student(80.0 * noise, top))
    s = torch.full((64,), 3.0)  # between: s eps plus the signal (1 - s/T) g
    expected = 3.0 * noise + (1 - 3.0 / 80.0) * student(80.0 * noise, top, None, s)
    assert torch.allclose(BOOT.jump(student, 80.0 * noise, top, s, None), expected, atol=1e-5)


@pytest.mark.parametrize("restart_fraction", [0.0, 0.5])
def test_the_loss_vanishes_on_the_teachers_ddim_trajectory_and_not_on_another_teachers(restart_fraction):
    config = BOOTConfig(num_scales=8, restart_fraction=restart_fraction)
    noise = torch.randn(48, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    losses = []
    for variance in (0.5, 2.0):  # the flow map of teacher N(0, 0.5) against teacher N(0, 0.5), then N(0, 2)
        boot = BOOT(gaussian_teacher(variance), random_student().double(), config)
        boot.grid = boot.grid.double()
        boot.student = GridDDIMFlowMap(gaussian_teacher(0.5), boot.grid)
        j, i = boot.draw_indices(48, torch.Generator().manual_seed(1))
        losses.append(float(boot.boot_losses(noise, None, j, i)["loss"]))
    assert losses[0] < 1e-20 and losses[1] > 1e-3, losses


def test_the_target_is_one_ddim_step_of_the_teacher_from_the_students_own_state():
    boot = BOOT(ring_mixture().double(), random_student().double(), BOOTConfig(num_scales=6))
    boot.grid = boot.grid.double()
    noise = torch.randn(4, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    j, i = torch.tensor([0, 0, 2, 1]), torch.tensor([0, 3, 2, 5])
    a, t, s = boot.grid[j], boot.grid[i], boot.grid[i + 1]
    top = torch.full((4,), 80.0, dtype=DT)
    x_a = BOOT.jump(boot.student, 80.0 * noise, top, a, None)
    x_t = BOOT.jump(boot.student, x_a, a, t, None)
    x0 = ring_mixture().double()(x_t, t)
    x_s = x0 + (s / t)[:, None] * (x_t - x0)
    ratio = (s / a)[:, None]
    expected = ((boot.student(x_a, a, None, s) - (x_s - ratio * x_a) / (1 - ratio)) ** 2).mean()
    loss = boot.boot_losses(noise, None, j, i)["loss"]
    assert torch.allclose(loss, expected, rtol=1e-10)
    assert boot.teacher_evals == 4  # one teacher evaluation per sample


def test_restarts_start_below_the_top_and_steps_stay_below_the_start():
    boot = BOOT(ring_mixture(), random_student(), BOOTConfig(restart_fraction=0.3))
    j, i = boot.draw_indices(20000, torch.Generator().manual_seed(0))
    n = boot.config.num_scales
    assert bool((j <= i).all() and (i <= n - 1).all() and (j < n).all())
    assert abs(float((j > 0).float().mean()) - 0.3) < 0.02
    assert bool((i == n - 1).any())  # the step onto 0 is trained
    j0, _ = BOOT(ring_mixture(), random_student(), BOOTConfig(restart_fraction=0.0)).draw_indices(
        1000, torch.Generator().manual_seed(0))
    assert bool((j0 == 0).all())  # the paper's BOOT: every sample starts at pure noise


def test_boot_is_data_free():
    """Its source is noise (no data kind), and a batch whose data are poison leaves the loss untouched."""
    assert BOOT.needs == {"noise"} and METHODS["boot"] is BOOT
    source = make_source(BOOT.needs, RING)
    assert isinstance(source, NoiseOnly)
    batch = source.batch(32, torch.Generator().manual_seed(0))
    assert batch.x0 is None
    boot = BOOT(ring_mixture(), random_student(), BOOTConfig())
    poisoned = Batch(x0=torch.full((32, 2), float("nan")), noise=batch.noise)
    clean = boot.losses("student", batch, 0, torch.Generator().manual_seed(1))["loss"]
    assert torch.equal(boot.losses("student", poisoned, 0, torch.Generator().manual_seed(1))["loss"], clean)


def test_a_student_built_on_a_teacher_network_starts_as_its_ddim_jump_and_samples_with_nfe_calls():
    teacher = EDMDenoiser(MLP((2,), width=32, depth=2), sigma_data=1.4)
    student = BOOT.build_student(teacher, BOOTConfig(), None, 1.4)
    x, level = torch.randn(16, 2), torch.full((16,), 80.0)
    assert torch.allclose(student(x, level, None, torch.full((16,), 2.0)), teacher(x, level), atol=1e-6)
    boot = BOOT(teacher, student, BOOTConfig())
    for nfe in (1, 2, 4):
        spec = boot.sampling(nfe)
        assert spec.sampler == "flow_map" and spec.sigmas[0] == 80.0 and spec.sigmas[-1] == 0.0
        assert count_nfe(spec.sampler, torch.tensor(spec.sigmas)) == nfe


def test_bad_configs_are_refused():
    for bad in ({"num_scales": 1}, {"restart_fraction": 1.5}, {"sigma_min": 0.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            BOOT(ring_mixture(), random_student(), BOOTConfig(**bad))


# ------------------------------------------------------------------------------------ exact teacher

class BOOTWithFlippedStep(BOOT):
    """A broken BOOT: the teacher's step goes the wrong way (its target perturbed)."""

    def teacher_step(self, x, t, s, cond):
        return 2 * x - super().teacher_step(x, t, s, cond)


RING_STEPS = 1200


def test_boot_on_the_exact_ring_beats_every_training_free_solver_at_two_steps_without_data():
    method, student = distil_on_ring(BOOT, BOOTConfig(), RING_STEPS, source=make_source(BOOT.needs, RING))
    ok, m = passes_issue_bar(draw(method, student, 2))
    assert ok, (m, best_training_free_excess_nll(2))
    assert method.teacher_evals == 256 * RING_STEPS


def test_metrics_catch_a_boot_with_a_flipped_teacher_step():
    method, student = distil_on_ring(BOOTWithFlippedStep, BOOTConfig(), RING_STEPS,
                                     source=make_source(BOOT.needs, RING))
    ok, m = passes_issue_bar(draw(method, student, 2))
    assert not ok, m
