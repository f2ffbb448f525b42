"""SLAM: the sub-path linear ODE, its reduction to consistency distillation, and the exact-teacher bar on the
8-mode ring."""

import pytest
import torch

from exact_ring import best_training_free_excess_nll, distil_on_ring, draw, passes_issue_bar, small_mlp
from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.methods import METHODS
from fewstep.methods.consistency.consistency_distillation import CDConfig, ConsistencyDistillation
from fewstep.methods.consistency.slam import SLAMConfig, SubpathLinearApproximation, sub_path_point
from fewstep.models.analytic import ring_mixture
from fewstep.models.denoiser import Denoiser, FixedExtraDenoiser
from fewstep.solvers import sample_heun

DT = torch.float64


def slam(teacher=None, **config) -> SubpathLinearApproximation:
    config = SLAMConfig(**config)
    student = SubpathLinearApproximation.build_student(ring_mixture(), config, small_mlp, 1.4)
    return SubpathLinearApproximation(teacher or ring_mixture(), student, config)


class PointMass(Denoiser):
    """The exact denoiser of data concentrated at ``c``: every ODE trajectory ``c + s eps`` is straight in ``s``."""

    data_shape = (2,)

    def forward(self, x, s, label=None, extra=None):
        return torch.tensor([0.3, -0.7], dtype=x.dtype).expand_as(x)


def test_sl_ode_point_runs_from_the_lower_to_the_upper_endpoint():
    g = torch.Generator().manual_seed(0)
    x_lo, x_hi = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    s_lo, s_hi = torch.full((8,), 0.5), torch.full((8,), 2.0)
    assert all(torch.equal(a, b) for a, b in zip(sub_path_point(x_lo, x_hi, s_lo, s_hi, torch.zeros(8)),
                                                 (x_lo, s_lo), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(sub_path_point(x_lo, x_hi, s_lo, s_hi, torch.ones(8)),
                                                 (x_hi, s_hi), strict=True))
    gamma = torch.rand(8, generator=g)
    x, s = sub_path_point(x_lo, x_hi, s_lo, s_hi, gamma)
    # constant velocity dx/dgamma = x_hi - x_lo, and the level moves with it
    assert torch.allclose(x, x_lo + gamma[:, None] * (x_hi - x_lo)) and torch.allclose(s, 0.5 + 1.5 * gamma)


def test_sl_ode_lies_on_the_trajectory_when_the_trajectory_is_straight():
    """For a point mass the teacher ODE is exactly linear in s, so every chord point is the trajectory's point at
    the interpolated level, and the exact consistency function (the constant c) has zero SLAM loss."""
    method = slam(PointMass(), subpath_steps=3, distance="l2").double()
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(64, 2, generator=g, dtype=DT)
    index = torch.randint(0, method.config.num_scales - 3, (64,), generator=g)
    s_hi, s_lo = method.grid[index].to(DT), method.grid[index + 3].to(DT)
    c = torch.tensor([0.3, -0.7], dtype=DT)
    x_hi = c + s_hi[:, None] * eps
    x_lo = method.solve_sub_path(x_hi, index, None)
    assert torch.allclose(x_lo, c + s_lo[:, None] * eps, atol=1e-12)
    gamma = torch.rand(64, generator=g, dtype=DT)
    x, s = sub_path_point(x_lo, x_hi, s_lo, s_hi, gamma)
    assert torch.allclose(x, c + s[:, None] * eps, atol=1e-12)
    method.student = method.target = PointMass()
    assert float(method.sub_path_loss(x_hi, x_lo, s_hi, s_lo, gamma, None).max()) < 1e-24


def test_the_teacher_solves_the_sub_path_with_k_heun_steps_on_the_grid():
    mixture = ring_mixture()
    method = slam(mixture, subpath_steps=3).double()
    x = torch.randn(32, 2, dtype=DT, generator=torch.Generator().manual_seed(2)) * float(method.grid[5])
    solved = method.solve_sub_path(x, torch.full((32,), 5), None)
    assert torch.allclose(solved, sample_heun(mixture, x, method.grid[5:9].to(DT)), atol=1e-12)
    assert method.teacher_evals == 2 * 3 * 32


class SLAMAtTheUpperEndpoint(SubpathLinearApproximation):
    """SLAM with gamma forced to 1: the chord point is the sub-path's upper endpoint."""

    def sub_path_loss(self, x_hi, x_lo, s_hi, s_lo, gamma, label):
        return super().sub_path_loss(x_hi, x_lo, s_hi, s_lo, torch.ones_like(gamma), label)


def test_slam_reduces_to_cd_at_the_upper_endpoint_of_a_one_step_sub_path():
    """With k = 1 and gamma = 1 the SLAM loss is CD's loss (for CD's student = SLAM's at gamma = 1), draw for
    draw; gamma must move the student once its gamma embedding is trained."""
    torch.manual_seed(0)
    student = SubpathLinearApproximation.build_student(ring_mixture(), SLAMConfig(), small_mlp, 1.4)
    with torch.no_grad():
        for p in student.backbone.extra_embeddings.parameters():
            p.normal_(0, 0.3)
    x0 = ring_mixture().sample(128, torch.Generator().manual_seed(3))
    cd = ConsistencyDistillation(ring_mixture(), FixedExtraDenoiser(student, [1.0]), CDConfig())
    upper = SLAMAtTheUpperEndpoint(ring_mixture(), student, SLAMConfig(subpath_steps=1))
    anywhere = SubpathLinearApproximation(ring_mixture(), student, SLAMConfig(subpath_steps=1))
    cd_loss = cd.losses("student", Batch(x0=x0), 0, torch.Generator().manual_seed(4))["loss"]
    upper_loss = upper.losses("student", Batch(x0=x0), 0, torch.Generator().manual_seed(4))["loss"]
    slam_loss = anywhere.losses("student", Batch(x0=x0), 0, torch.Generator().manual_seed(4))["loss"]
    assert torch.allclose(upper_loss, cd_loss, rtol=1e-6)
    assert not torch.allclose(slam_loss, cd_loss, rtol=1e-2)


def test_the_error_estimate_is_zero_at_the_lower_endpoint_and_grows_along_the_sub_path():
    method = slam()
    g = torch.Generator().manual_seed(5)
    x0 = ring_mixture().sample(256, g)
    index = torch.full((256,), 3)
    s_hi, s_lo = method.grid[3].expand(256), method.grid[4].expand(256)
    x_hi = x0 + s_hi[:, None] * torch.randn(256, 2, generator=g)
    with torch.no_grad():
        x_lo = method.solve_sub_path(x_hi, index, None)
        losses = [float(method.sub_path_loss(x_hi, x_lo, s_hi, s_lo, torch.full((256,), gamma), None).mean())
                  for gamma in (0.0, 0.25, 0.5, 1.0)]
    assert losses[0] < 1e-6 and losses[0] < losses[1] < losses[2] < losses[3], losses


def test_the_sampling_student_is_the_network_on_the_trajectory():
    method = slam()
    with torch.no_grad():
        for p in method.student.backbone.extra_embeddings.parameters():
            p.normal_(0, 0.3)
    x, s = torch.randn(16, 2), torch.full((16,), 2.0)
    with torch.no_grad():
        on_trajectory = method.student_denoiser()(x, s)
        assert torch.equal(on_trajectory, method.student(x, s, None, torch.ones(16, 1)))
        assert not torch.allclose(on_trajectory, method.student(x, s, None, torch.zeros(16, 1)))
    assert set(dict(method.student_denoiser().named_parameters()).values()) == set(method.student.parameters())


def test_registry_and_bad_config():
    assert METHODS["slam"] is SubpathLinearApproximation
    with pytest.raises(ConfigError, match="subpath_steps"):
        slam(subpath_steps=0)
    with pytest.raises(ConfigError, match="subpath_steps"):
        slam(num_scales=5, subpath_steps=5)


# ------------------------------------------------------------------------------------ exact teacher


class SLAMWithFlippedStep(SubpathLinearApproximation):
    """A broken SLAM: the teacher step goes the wrong way (sign flipped in the target)."""

    def teacher_step(self, x, s, s_next, cond):
        return 2 * x - super().teacher_step(x, s, s_next, cond)


def test_slam_on_the_exact_ring_beats_every_training_free_solver_at_two_steps():
    method, student = distil_on_ring(SubpathLinearApproximation, SLAMConfig(), steps=2000)
    ok, m = passes_issue_bar(draw(method, student, 2))
    assert ok, (m, best_training_free_excess_nll(2))


def test_metrics_catch_a_slam_with_a_flipped_target():
    method, student = distil_on_ring(SLAMWithFlippedStep, SLAMConfig(), steps=2000)
    ok, m = passes_issue_bar(draw(method, student, 2))
    assert not ok, m
