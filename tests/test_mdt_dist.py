"""MDT-dist: velocity matching's target on a Gaussian whose transport map is known in closed form (zero loss at the
exact map, not for another teacher's), the discrete derivative against the JVP, velocity distillation's gradient,
and an exact-teacher test on the 8-mode ring that fails when the teacher's velocity is perturbed."""

import pytest
import torch

from exact_ring import best_training_free_excess_nll, distil_on_ring, draw, low_frequency_mlp, passes_issue_bar
from fewstep.errors import ConfigError
from fewstep.methods import METHODS
from fewstep.methods.flow.mdt_dist import MDTDist, MDTDistConfig
from fewstep.models.analytic import GaussianMixture, ring_mixture
from fewstep.models.denoiser import Denoiser, EDMDenoiser
from fewstep.nets import MLP
from fewstep.solvers import count_nfe

DT = torch.float64
V = 0.5


def gaussian_teacher(variance: float) -> GaussianMixture:
    return GaussianMixture(torch.ones(1, dtype=DT), torch.zeros(1, 2, dtype=DT), torch.full((1,), variance, dtype=DT))


class ExactGaussianMap(Denoiser):
    """The teacher ODE's map to time 0 for data N(0, V I): ``x sqrt(V) / sqrt(V + s^2)``."""

    data_shape = (2,)

    def forward(self, x, s, cond=None):
        return x * (V**0.5 / torch.sqrt(V + s**2))[:, None]


def mdt(teacher, student=None, **config) -> MDTDist:
    student = student if student is not None else EDMDenoiser(MLP((2,), width=32, depth=2), 1.0).double()
    return MDTDist(teacher, student, MDTDistConfig(**config))


def gaussian_data(n: int = 512) -> torch.Tensor:
    return torch.randn(n, 2, dtype=DT, generator=torch.Generator().manual_seed(0)) * V**0.5


# ----------------------------------------------------------------------------------------------- math


def test_velocity_matching_vanishes_at_the_exact_map_and_not_for_another_teachers():
    losses = {}
    for derivative in ("jvp", "discrete"):
        for variance in (V, 2 * V):
            method = mdt(gaussian_teacher(variance), derivative=derivative, vd_weight=0.0)
            method.student = ExactGaussianMap()
            loss = method.vm_loss(gaussian_data(), None, torch.Generator().manual_seed(1))
            losses[derivative, variance] = float(loss)
    assert losses["jvp", V] < 1e-20  # exact: u = v - t du/dt holds along the ODE
    assert losses["discrete", V] < 1e-4  # the backward difference's O(h) error
    assert losses["jvp", 2 * V] > 0.01 and losses["discrete", 2 * V] > 0.01, losses


def test_the_derivative_normalisation_moves_the_target_off_the_exact_map():
    method = mdt(gaussian_teacher(V), derivative="jvp", vd_weight=0.0, derivative_norm=0.1)
    method.student = ExactGaussianMap()
    assert float(method.vm_loss(gaussian_data(), None, torch.Generator().manual_seed(1))) > 1e-3


def test_the_discrete_derivative_converges_to_the_jvp():
    x_t, t = torch.randn(64, 2, dtype=DT), torch.rand(64, dtype=DT) * 0.8 + 0.1
    v = torch.randn(64, 2, dtype=DT)
    method = mdt(ring_mixture().double(), derivative="jvp")
    with torch.no_grad():
        exact = method.time_derivative(x_t, t, v, None)
        errors = []
        for h in (1e-3, 1e-4):  # a backward difference: first order in h
            method.config.derivative, method.config.h = "discrete", h
            errors.append(float((method.time_derivative(x_t, t, v, None) - exact).abs().max()))
    assert errors[1] < errors[0] / 5 and errors[1] < 1e-2 * float(exact.abs().max()), errors


def test_the_average_velocity_reads_the_student_as_the_map_to_zero():
    method = mdt(ring_mixture().double())
    x_t, t = torch.randn(32, 2, dtype=DT), torch.full((32,), 0.6, dtype=DT)
    s = t / (1 - t)
    x0 = method.student(x_t / 0.4, s)
    assert torch.allclose(x_t - t[:, None] * method.average_velocity(x_t, t, None), x0, atol=1e-12)


def test_velocity_distillation_moves_the_one_step_sample_along_the_residual():
    """The gradient of L_VD in the one-step sample is -2 r / D, r = u_theta - u_tgt at its re-noised copy: the
    gradient of the paper's || v_pred - v_tgt + v_fake - sg v_fake ||^2 with x_g = z - v_fake."""
    method = mdt(ring_mixture().double(), vm_weight=0.0)
    captured = {}
    original = method.student.forward

    def spy(x, s, cond=None, extra=None):
        out = original(x, s, cond, extra)
        if out.requires_grad and "x_g" not in captured:
            out.retain_grad()
            captured["x_g"] = out
        return out

    method.student.forward = spy
    loss = method.vd_loss(torch.zeros(16, 2, dtype=DT), None, torch.Generator().manual_seed(3))
    loss.backward()
    x_g = captured["x_g"]
    generator = torch.Generator().manual_seed(3)  # replay the draws: z, then t, then the re-noising
    torch.randn(16, 2, generator=generator, dtype=DT)
    t = method.draw_times(16, generator, x_g)
    x_t = method.noised(x_g.detach(), t, generator)
    with torch.no_grad():
        residual = method.average_velocity(x_t, t, None) - method.velocity_target(x_t, t, None)
    assert torch.allclose(x_g.grad, -2 * residual / (16 * 2), atol=1e-10)
    assert torch.allclose(loss, residual.pow(2).mean(), atol=1e-10)


def test_teacher_evaluations_per_sample_and_sampling():
    method = mdt(ring_mixture().double())
    method.losses("student", type("B", (), {"x0": gaussian_data(32), "cond": None})(), 0,
                  torch.Generator().manual_seed(0))
    assert method.teacher_evals == 2 * 32  # one for velocity matching, one for velocity distillation
    for nfe in (1, 2, 4):
        spec = method.sampling(nfe)
        assert spec.sampler == "consistency" and spec.sigmas[0] == 80.0
        assert count_nfe(spec.sampler, torch.tensor(spec.sigmas)) == nfe
    assert METHODS["mdt_dist"] is MDTDist and MDTDist.needs == {"data"}


def test_bad_configs_are_refused():
    for bad in ({"derivative": "spline"}, {"h": 0.0}, {"derivative_norm": -1.0}, {"vm_weight": -1.0},
                {"p_std": 0.0}, {"sigma_min": 0.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            mdt(ring_mixture(), **bad)
    with pytest.raises(ConfigError, match="not both"):
        mdt(ring_mixture(), vm_weight=0.0, vd_weight=0.0)


# ------------------------------------------------------------------------------------ exact teacher

class MDTWithFlippedVelocity(MDTDist):
    """A broken MDT-dist: the teacher's velocity points the wrong way in every target."""

    def teacher_velocity(self, x_t, t, cond):
        return -super().teacher_velocity(x_t, t, cond)


RING_STEPS = 3000
RING_CONFIG = {"derivative": "jvp", "p_mean": -0.5, "p_std": 1.6, "vd_weight": 0.3}  # the ring recipe's


def two_steps_on_ring(cls) -> tuple[bool, dict]:
    """The ring recipe's run (low-frequency time features, cosine rate); the issue's bar at 2 NFE."""
    method, student = distil_on_ring(cls, MDTDistConfig(**RING_CONFIG), RING_STEPS, backbone=low_frequency_mlp,
                                     lr_schedule="cosine")
    return passes_issue_bar(draw(method, student, 2))


@pytest.mark.slow
def test_mdt_dist_on_the_exact_ring_beats_every_training_free_solver_at_two_steps():
    ok, m = two_steps_on_ring(MDTDist)
    assert ok, (m, best_training_free_excess_nll(2))


@pytest.mark.slow
def test_metrics_catch_an_mdt_dist_with_a_flipped_teacher_velocity():
    ok, m = two_steps_on_ring(MDTWithFlippedVelocity)
    assert not ok, m
