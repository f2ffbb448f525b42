"""Hyper-SD's trajectory segmented consistency distillation: segment maps, the 8 -> 4 -> 2 -> 1 stage schedule,
exactness of the per-segment target, and the exact-teacher bar on the 8-mode ring."""

import math

import pytest
import torch

from exact_ring import best_training_free_excess_nll, distil_on_ring, draw, passes_issue_bar, small_mlp
from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.methods import METHODS
from fewstep.methods.trajectory.hyper_sd import HyperSD, HyperSDConfig, segment_map
from fewstep.models.analytic import GaussianMixture, ring_mixture
from fewstep.models.denoiser import Denoiser, EDMDenoiser
from fewstep.solvers import karras_sigmas


def hyper_sd(**config) -> HyperSD:
    return HyperSD(ring_mixture(), EDMDenoiser(small_mlp(), 1.4), HyperSDConfig(**config))


def test_segment_map_is_the_identity_at_the_segment_edge_and_a_ddim_jump_elsewhere():
    student = EDMDenoiser(small_mlp(), 1.4)
    x = torch.randn(64, 2)
    edge = torch.full((64,), 0.7)
    assert torch.equal(segment_map(student, x, edge, edge), x)
    s = torch.full((64,), 3.0)
    jump = segment_map(student, x, s, edge)
    with torch.no_grad():
        x0 = student(x, s)
    assert torch.allclose(jump, x0 + (0.7 / 3.0) * (x - x0), atol=1e-6)
    assert not torch.allclose(jump, x)


def test_lower_edges_follow_the_stage():
    method = hyper_sd(num_scales=33, start_segments=8, steps_per_stage=1)
    index = torch.arange(32)
    assert torch.equal(method.lower_edge_index(index), (index // 4 + 1) * 4)
    method.after_update("student", 0)  # 4 segments
    assert torch.equal(method.lower_edge_index(index), (index // 8 + 1) * 8)
    method.after_update("student", 1)
    method.after_update("student", 2)  # 1 segment: every point maps to s_min
    assert method.segments == 1 and torch.equal(method.lower_edge_index(index), torch.full((32,), 32))
    assert float(method.grid[32]) == pytest.approx(method.config.sigma_min)


def test_stages_halve_the_segments_reset_optimizer_and_target_and_resume_from_a_state_dict():
    method = hyper_sd(num_scales=17, start_segments=8, steps_per_stage=3)
    segments, resets = [], []
    for step in range(13):
        with torch.no_grad():
            for p in method.student.parameters():
                p.add_(0.01)
        resets.append(method.after_update("student", step))
        segments.append(method.segments)
        if resets[-1]:
            for p_target, p in zip(method.target.parameters(), method.student.parameters(), strict=True):
                assert torch.equal(p_target, p)
    assert resets == [False, False, True] * 3 + [False] * 4
    assert segments == [8, 8, 4, 4, 4, 2, 2, 2, 1, 1, 1, 1, 1]
    fresh = hyper_sd(num_scales=17, start_segments=8, steps_per_stage=3)
    for _ in range(4):  # two updates into the 4-segment stage
        fresh.after_update("student", 0)
    half_way = fresh.state_dict()
    resumed = hyper_sd(num_scales=17, start_segments=8, steps_per_stage=3)
    resumed.load_state_dict(half_way)
    assert resumed.segments == 4 and [resumed.after_update("student", s) for s in range(2)] == [False, True]
    assert resumed.segments == 2


def test_the_segment_target_is_exact_on_a_single_gaussian_at_every_stage():
    """Data N(0, v): the ODE maps x at s to x sqrt(v + e^2) / sqrt(v + s^2) at e. A student whose segment map is
    that exact map (for the current stage's edges) has ~0 loss (Heun error only); a wrong teacher does not."""
    v = 0.5
    gaussian = GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.full((1,), v))
    config = HyperSDConfig(num_scales=33, distance="l2", steps_per_stage=1)
    method = HyperSD(gaussian, EDMDenoiser(small_mlp(), 1.0), config)

    class ExactSegmentMap(Denoiser):
        """The clean-sample estimate g for which segment_map(g, x, s, e) is the exact ODE map to s's edge."""

        data_shape = (2,)

        def forward(self, x, s, label=None):
            index = (method.grid[None, :] - s[:, None]).abs().argmin(1)
            edge = method.grid[method.lower_edge_index(index).clamp(max=config.num_scales - 1)]
            ratio = (edge / s)[:, None]
            exact = x * torch.sqrt(v + edge**2)[:, None] / torch.sqrt(v + s**2)[:, None]
            return torch.where(ratio < 1, (exact - ratio * x) / (1 - ratio).clamp(min=1e-12), x)

    method.student, method.target = ExactSegmentMap(), ExactSegmentMap()
    wrong = HyperSD(GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.full((1,), 2 * v)),
                    EDMDenoiser(small_mlp(), 1.0), config)
    wrong.student, wrong.target = ExactSegmentMap(), ExactSegmentMap()
    x0 = gaussian.sample(512, torch.Generator().manual_seed(1))
    for segments in (8, 4, 2, 1):
        assert method.segments == segments
        exact = float(method.losses("student", Batch(x0=x0), 0, torch.Generator().manual_seed(2))["loss"])
        broken = float(wrong.losses("student", Batch(x0=x0), 0, torch.Generator().manual_seed(2))["loss"])
        assert exact < 1e-5 and exact < broken / 100, (segments, exact, broken)
        method.after_update("student", 0)
        wrong.after_update("student", 0)


def test_sampling_levels_are_the_nested_segment_edges():
    method = hyper_sd(num_scales=33)
    assert method.sampling(1).sigmas == [80.0] and method.sampling(1).sampler == "consistency"
    for nfe in (2, 4, 8):
        edges = method.grid[:: 32 // nfe][:-1]
        assert torch.allclose(torch.tensor(method.sampling(nfe).sigmas, dtype=torch.float32), edges, rtol=1e-5)
    assert len(method.sampling(3).sigmas) == 3
    assert math.isclose(method.sampling(3).sigmas[1], float(karras_sigmas(4)[1]))


def test_teacher_evals_and_registry():
    method = hyper_sd()
    method.losses("student", Batch(x0=torch.randn(16, 2)), 0, torch.Generator().manual_seed(0))
    assert method.teacher_evals == 32
    assert METHODS["hyper_sd"] is HyperSD


@pytest.mark.parametrize(("config", "key"), [({"start_segments": 6}, "start_segments"),
                                             ({"num_scales": 30}, "num_scales"),
                                             ({"steps_per_stage": 0}, "steps_per_stage")])
def test_bad_configs_are_refused_naming_the_key(config, key):
    with pytest.raises(ConfigError, match=key):
        hyper_sd(**config)


# ------------------------------------------------------------------------------------ exact teacher

RING_CONFIG = HyperSDConfig(steps_per_stage=300)
RING_STEPS = 1800


class HyperSDWithFlippedStep(HyperSD):
    """A broken Hyper-SD: the teacher step goes the wrong way (sign flipped in the target)."""

    def teacher_step(self, x, s, s_next, cond):
        return 2 * x - super().teacher_step(x, s, s_next, cond)


def test_hyper_sd_on_the_exact_ring_beats_every_training_free_solver_at_two_steps():
    method, student = distil_on_ring(HyperSD, RING_CONFIG, steps=RING_STEPS)
    assert method.segments == 1
    ok, m = passes_issue_bar(draw(method, student, 2))
    assert ok, (m, best_training_free_excess_nll(2))


def test_metrics_catch_a_hyper_sd_with_a_flipped_target():
    method, student = distil_on_ring(HyperSDWithFlippedStep, RING_CONFIG, steps=RING_STEPS)
    ok, m = passes_issue_bar(draw(method, student, 2))
    assert not ok, m
