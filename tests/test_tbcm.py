"""Trajectory-Backward Consistency Model: its teacher rollouts, trajectory pool and loss, and exact-teacher
tests on the analytic 8-mode ring (from noise alone) that fail when the trajectories are wrong."""

import math

import pytest
import torch

from exact_ring import RING, best_training_free_excess_nll, distil_on_ring, draw, passes_issue_bar, small_mlp
from fewstep.data.batch import Batch
from fewstep.data.sources import NoiseOnly
from fewstep.errors import ConfigError
from fewstep.methods import METHODS
from fewstep.methods.consistency.trajectory_backward_consistency import TBCMConfig, TrajectoryBackwardConsistency
from fewstep.methods.losses import pseudo_huber
from fewstep.models.analytic import GaussianMixture, ring_mixture
from fewstep.models.denoiser import ConsistencyDenoiser, Denoiser
from fewstep.solvers import sample

DT = torch.float64


def tbcm(config: TBCMConfig | None = None, teacher: Denoiser | None = None, student: Denoiser | None = None):
    student = student if student is not None else ConsistencyDenoiser(small_mlp(), 1.4)
    return TrajectoryBackwardConsistency(teacher or ring_mixture(), student, config or TBCMConfig())


# ----------------------------------------------------------------------------------------------- math


def test_rollouts_are_the_teachers_heun_trajectories_on_the_grid():
    method = tbcm(TBCMConfig(num_scales=10)).double()
    noise = torch.randn(64, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    states = method.rollout(noise, None)
    assert states.shape == (64, 10, 2) and torch.equal(states[:, 0], noise * method.grid[0])
    for m in (1, 4, 9):
        expected = sample(ring_mixture(), noise, "heun", method.grid[:m + 1])
        assert torch.allclose(states[:, m], expected, atol=1e-10)
    assert method.teacher_evals == 64 * 2 * 9


def test_the_pool_keeps_the_newest_rollouts_first_in_first_out():
    method = tbcm(TBCMConfig(num_scales=4, pool_size=5, rollouts_per_step=3))
    first, second = torch.randn(3, 2), torch.randn(3, 2)
    method.add_rollouts(first, None)
    assert int(method.pool_filled) == 3 and int(method.pool_next) == 3
    method.add_rollouts(second, None)
    assert int(method.pool_filled) == 5 and int(method.pool_next) == 1
    assert torch.equal(method.pool[:, 0], torch.cat([second[2:], first[1:], second[:2]]) * method.grid[0])
    fresh = tbcm(TBCMConfig(num_scales=4, pool_size=5, rollouts_per_step=3))
    fresh.load_state_dict(method.state_dict())  # the pool is checkpointed with the method
    assert torch.equal(fresh.pool, method.pool) and int(fresh.pool_next) == 1


def test_each_step_rolls_out_and_trains_on_consecutive_trajectory_states():
    """One step adds rollouts_per_step trajectories and the loss is CD's between recorded neighbours."""
    method = tbcm(TBCMConfig(num_scales=6, pool_size=8, rollouts_per_step=8))
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    loss = method.losses("student", Batch(noise=noise), 0, torch.Generator().manual_seed(2))["loss"]
    assert method.teacher_evals == 8 * 2 * 5
    gen = torch.Generator().manual_seed(2)  # replay the method's draws
    which = (torch.rand(8, generator=gen) * 8).long()
    index = torch.randint(0, 5, (8,), generator=gen)
    states = method.rollout(noise, None)
    x_hi, x_lo = states[which, index], states[which, index + 1]
    expected = pseudo_huber(method.student(x_hi, method.grid[index]),
                            method.target(x_lo, method.grid[index + 1]), method.huber_c).mean()
    assert torch.allclose(loss, expected)


def test_the_loss_vanishes_for_the_exact_consistency_function_on_a_single_gaussian():
    """For data N(0, v) the ODE keeps x_s / sqrt(v + s^2) constant, so f(x, s) = x sqrt(v + smin^2)/sqrt(v + s^2)
    is the exact consistency function; on the teacher's own trajectories its loss is ~0, and far from 0
    when the trajectories come from another teacher."""
    v = 0.5

    class ExactConsistency(Denoiser):
        data_shape = (2,)

        def forward(self, x, s, label=None):
            return x * math.sqrt(v + 0.002**2) / torch.sqrt(v + s**2)[:, None]

    losses = []
    for variance in (v, 2 * v):
        teacher = GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.full((1,), variance))
        method = tbcm(TBCMConfig(num_scales=40, distance="l2", pool_size=512, rollouts_per_step=512), teacher,
                      ExactConsistency())
        noise = torch.randn(512, 2, generator=torch.Generator().manual_seed(1))
        losses.append(float(method.losses("student", Batch(noise=noise), 0, torch.Generator().manual_seed(2))["loss"]))
    assert losses[0] < 1e-6  # only the Heun steps' discretisation error remains
    assert losses[0] < losses[1] / 100, losses


def test_tbcm_needs_noise_only_and_refuses_bad_settings():
    assert METHODS["tbcm"] is TrajectoryBackwardConsistency and TrajectoryBackwardConsistency.needs == {"noise"}
    with pytest.raises(ValueError, match="noise"):
        tbcm().losses("student", Batch(x0=RING.train_x[:8]), 0, torch.Generator())
    for bad in ({"pool_size": 0}, {"rollouts_per_step": 0}, {"pool_size": 4, "rollouts_per_step": 8}):
        with pytest.raises(ConfigError, match="pool_size" if "pool_size" in bad and len(bad) == 1 else "rollouts"):
            tbcm(TBCMConfig(**bad))


def test_conditional_rollouts_keep_their_labels():
    from fewstep.nets import MLP

    torch.manual_seed(0)
    student = ConsistencyDenoiser(MLP((2,), width=32, depth=1, num_classes=3), 1.4)
    teacher = ConsistencyDenoiser(MLP((2,), width=32, depth=1, num_classes=3), 1.4)
    method = tbcm(TBCMConfig(num_scales=4, pool_size=6, rollouts_per_step=6), teacher, student)
    label = torch.tensor([0, 1, 2, 0, 1, 2])
    noise = torch.randn(6, 2)
    method.losses("student", Batch(noise=noise, cond=label), 0, torch.Generator().manual_seed(0))
    assert torch.equal(method.pool_label, label)
    assert not torch.allclose(method.rollout(noise, label), method.rollout(noise, torch.tensor([1, 2, 0] * 2)))


# ------------------------------------------------------------------------------------ exact teacher

class TBCMWithFlippedStep(TrajectoryBackwardConsistency):
    """A broken TBCM: its rollouts step the wrong way (sign flipped), so the trajectories are not the ODE's."""

    def teacher_step(self, x, s, s_next, cond):
        return 2 * x - super().teacher_step(x, s, s_next, cond)


RING_STEPS = 1500


def distil_from_noise(method_cls):
    return distil_on_ring(method_cls, TBCMConfig(), steps=RING_STEPS, source=NoiseOnly((2,)))


def test_tbcm_on_the_exact_ring_from_noise_alone_beats_every_training_free_solver_at_two_steps():
    method, student = distil_from_noise(TrajectoryBackwardConsistency)
    ok, m = passes_issue_bar(draw(method, student, 2))
    assert ok, (m, best_training_free_excess_nll(2))
    assert method.teacher_evals == RING_STEPS * 32 * 2 * 17


def test_metrics_catch_a_tbcm_with_flipped_trajectories():
    method, student = distil_from_noise(TBCMWithFlippedStep)
    ok, m = passes_issue_bar(draw(method, student, 2))
    assert not ok, m

