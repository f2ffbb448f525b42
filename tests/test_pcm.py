"""Phased consistency models: unit tests of the math (phase-edge boundary condition, the one-phase reduction
to CD, grid and edges), and exact-teacher tests on the 8-mode ring with a broken control that must fail."""

import pytest
import torch

from exact_ring import (
    NOISE,
    RING,
    best_training_free_excess_nll,
    distil_on_ring,
    draw,
    flow_map_error,
    passes_issue_bar,
    small_mlp,
)
from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.methods import METHODS
from fewstep.methods.consistency.consistency_distillation import CDConfig, ConsistencyDistillation
from fewstep.methods.consistency.phased_consistency import PCMConfig, PhasedConsistency
from fewstep.models.analytic import ring_mixture
from fewstep.models.denoiser import Denoiser, EDMDenoiser
from fewstep.solvers import karras_sigmas, sample, solver_sigmas


def pcm(**config) -> PhasedConsistency:
    return PhasedConsistency(ring_mixture(), EDMDenoiser(small_mlp(), 1.4), PCMConfig(**config))


# ----------------------------------------------------------------------------------------------- math


def test_pcm_is_registered():
    assert METHODS["pcm"] is PhasedConsistency


def test_phase_edges_are_nested_karras_levels_and_every_grid_pair_maps_to_its_phases_lower_edge():
    method = pcm(phases=4, steps_per_phase=3)
    assert torch.allclose(method.edges, karras_sigmas(5, dtype=torch.float32))
    assert torch.allclose(karras_sigmas(3, dtype=torch.float32), method.edges[::2])  # the 2-NFE edges
    for i in range(12):
        assert method.lower_edge[i] == method.edges[i // 3 + 1]
        assert method.grid[i + 1] >= method.lower_edge[i]


def test_phase_map_satisfies_the_boundary_condition_at_each_phase_edge():
    method = pcm(phases=4, steps_per_phase=3)
    x = torch.randn(64, 2) * 3
    for edge in method.edges[1:]:
        s = torch.full((64,), float(edge))
        assert torch.allclose(method.phase_map(method.student, x, s, s, None), x, atol=1e-6)
        higher = torch.full((64,), float(edge) + 1.0)
        assert not torch.allclose(method.phase_map(method.student, x, higher, s, None), x, atol=1e-3)


def test_target_at_a_phase_edge_is_the_teachers_step_itself():
    """When the teacher step lands on the lower edge, the target is the teacher's state there (no network)."""
    method = pcm(phases=2, steps_per_phase=1, distance="l2")
    x0 = torch.randn(128, 2)
    loss = method.losses("student", Batch(x0=x0), 0, torch.Generator().manual_seed(0))["loss"]
    index = torch.randint(0, 2, (128,), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    torch.randint(0, 2, (128,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    s_hi, s_lo = method.grid[index], method.grid[index + 1]
    x_hi = x0 + s_hi[:, None] * eps
    target = method.teacher_step(x_hi, s_hi, s_lo, None)
    prediction = method.phase_map(method.student, x_hi, s_hi, s_lo, None)
    assert torch.allclose(loss, (prediction - target).pow(2).mean(), rtol=1e-5)


def test_one_phase_is_cds_loss_with_the_ddim_consistency_function():
    """With M = 1 the only edge is sigma_min: the loss is CD's, draw for draw, for the consistency function
    f(x, s) = D(x, s) + (sigma_min / s)(x - D(x, s)) (with CD's Heun teacher step)."""
    method = pcm(phases=1, steps_per_phase=17, teacher_solver="heun")

    class PhaseMap(Denoiser):
        data_shape = (2,)

        def __init__(self, network):
            super().__init__()
            self.network = network

        def forward(self, x, s, label=None):
            return PhasedConsistency.phase_map(self.network, x, s, torch.full_like(s, 0.002), label)

    cd = ConsistencyDistillation(ring_mixture(), PhaseMap(method.student), CDConfig(num_scales=18))
    x0 = torch.randn(256, 2)
    pcm_loss = method.losses("student", Batch(x0=x0), 0, torch.Generator().manual_seed(4))["loss"]
    cd_loss = cd.losses("student", Batch(x0=x0), 0, torch.Generator().manual_seed(4))["loss"]
    assert torch.allclose(pcm_loss, cd_loss, rtol=1e-5), (pcm_loss, cd_loss)
    four_phases = pcm(phases=4, steps_per_phase=4, teacher_solver="heun")
    four_loss = four_phases.losses("student", Batch(x0=x0), 0, torch.Generator().manual_seed(4))["loss"]
    assert not torch.allclose(four_loss, cd_loss, rtol=1e-3)


def test_sampling_jumps_deterministically_through_the_phase_edges():
    method = pcm(phases=4, steps_per_phase=2)
    spec = method.sampling(4)
    assert spec.sampler == "euler" and torch.allclose(torch.tensor(spec.sigmas, dtype=torch.float32), method.edges)
    assert len(method.sampling(2).sigmas) == 3 and len(method.sampling(8).sigmas) == 9


def test_teacher_evaluations_are_counted():
    method = pcm(teacher_solver="heun")
    method.losses("student", Batch(x0=torch.randn(32, 2)), 0, torch.Generator().manual_seed(0))
    assert method.teacher_evals == 64


@pytest.mark.parametrize("bad, key", [({"phases": 0}, "phases"), ({"steps_per_phase": 0}, "steps_per_phase"),
                                      ({"teacher_solver": "rk4"}, "teacher_solver"),
                                      ({"distance": "lpips"}, "distance")])
def test_bad_config_names_the_key(bad, key):
    with pytest.raises(ConfigError, match=key):
        pcm(**bad)


# ------------------------------------------------------------------------------------ exact teacher


class PCMWithFlippedStep(PhasedConsistency):
    """A broken PCM: the teacher step goes the wrong way (sign flipped in the target)."""

    def teacher_step(self, x, s, s_next, cond):
        return 2 * x - super().teacher_step(x, s, s_next, cond)


@pytest.fixture(scope="module")
def pcm_student():
    return distil_on_ring(PhasedConsistency, PCMConfig(phases=4), steps=1500)


def test_pcm_on_the_exact_ring_beats_every_training_free_solver_at_two_steps(pcm_student):
    ok, m = passes_issue_bar(draw(*pcm_student, 2))
    assert ok, (m, best_training_free_excess_nll(2))


def test_pcm_at_four_steps_one_jump_per_phase_beats_ddim_and_its_own_two_steps(pcm_student):
    """One jump per phase: closer to the exact ODE endpoints than the teacher's DDIM at the same 4 NFE (the
    solver PCM distils), and a better fit than the student's own 2-NFE samples (nested edges)."""
    four = draw(*pcm_student, 4)
    ddim = sample(RING.analytic, NOISE, "euler", solver_sigmas("euler", 4))
    assert flow_map_error(four) < 0.75 * flow_map_error(ddim), (flow_map_error(four), flow_map_error(ddim))
    assert passes_issue_bar(four)[1]["excess_nll"] < passes_issue_bar(draw(*pcm_student, 2))[1]["excess_nll"]


@pytest.mark.slow
def test_a_two_phase_pcm_passes_the_bar_at_two_steps_with_room_on_the_spread():
    """The 4-phase student's 2-step sample jumps two phases at a time and sits at the spread bar's edge (1.28);
    trained for 2 phases, one jump per phase, it passed with spread 1.19 (recipe run, 5000 samples)."""
    ok, m = passes_issue_bar(draw(*distil_on_ring(PhasedConsistency, PCMConfig(phases=2), steps=1500), 2))
    assert ok and m["spread_ratio"] <= 1.25, m


def test_metrics_catch_a_pcm_with_a_flipped_target():
    ok, m = passes_issue_bar(draw(*distil_on_ring(PCMWithFlippedStep, PCMConfig(phases=4), steps=1500), 2))
    assert not ok, m
