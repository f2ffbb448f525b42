"""Flow-map methods (MeanFlow, flow-map distillation in Eulerian and Lagrangian form, and without data): the
flow-map student on the rectified-flow path, its tangents, the losses against exact flow maps, the generalised
two-time student, and exact-teacher tests on the 8-mode ring that fail when the teacher's target is perturbed."""

import math

import pytest
import torch

from exact_ring import RING, distil_on_ring, draw, flow_map_error, low_frequency_mlp, passes_issue_bar, small_mlp
from fewstep.data.batch import Batch
from fewstep.data.sources import NoiseOnly, make_source
from fewstep.errors import ConfigError
from fewstep.methods import METHODS
from fewstep.methods.consistency.consistency_distillation import CDConfig, ConsistencyDistillation
from fewstep.methods.flow.flow_map import FlowMapConfig, FlowMapDistillation
from fewstep.methods.flow.flow_map_free import FlowMapWithoutData, FreeFlowConfig
from fewstep.methods.flow.maps import (
    T_MAX,
    T_MIN,
    average_velocity,
    draw_times,
    eulerian_residual,
    flow_map,
    lagrangian_residual,
    target_time_derivative,
    time_derivative,
    ve_sigma,
    velocity,
)
from fewstep.methods.flow.meanflow import MeanFlow, MeanFlowConfig
from fewstep.models.analytic import GaussianMixture, ring_mixture
from fewstep.models.denoiser import CountingDenoiser, Denoiser, TwoTimeDenoiser, denoiser_from_config
from fewstep.models.io import load_model, save_model
from fewstep.nets import MLP, add_extra_conditions
from fewstep.solvers import count_nfe, sample_flow_map

DT = torch.float64
V = 0.5  # variance of the single-Gaussian data whose flow map is known in closed form


def gaussian_teacher(variance: float = V) -> GaussianMixture:
    return GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.full((1,), variance))


class ExactGaussianMap(Denoiser):
    """The exact two-time output of data N(0, V I): the ODE keeps ``x_s / sqrt(V + s^2)`` constant, so
    ``G(x, t, s) = x sqrt(V + s^2) / sqrt(V + t^2)``, and ``g = (G - (s/t) x) / (1 - s/t)`` (``s < t``)."""

    data_shape = (2,)

    def forward(self, x, t, cond=None, s=None):
        jump = x * (torch.sqrt(V + s**2) / torch.sqrt(V + t**2))[:, None]
        ratio = (s / t)[:, None]
        return (jump - ratio * x) / (1 - ratio)


def random_student(seed: int = 0, further_inputs: int = 0, dtype=torch.float32) -> TwoTimeDenoiser:
    """A flow-time two-time student whose target-time (and further) inputs matter."""
    backbone = add_extra_conditions(small_mlp(seed), 1 + further_inputs)
    student = TwoTimeDenoiser(backbone, sigma_data=1.4, target_time="flow_time")
    with torch.no_grad():
        for p in student.backbone.extra_embeddings.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    return student.to(dtype)


def times(n: int, seed: int = 0, dtype=DT) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = T_MIN + (T_MAX - T_MIN) * torch.rand(n, generator=gen, dtype=dtype)
    return t, T_MIN + (t - T_MIN) * torch.rand(n, generator=gen, dtype=dtype) * 0.9


# ----------------------------------------------------------------------------------------------- math


def test_a_jump_to_the_same_time_is_the_identity():
    student = random_student()
    z = torch.randn(64, 2)
    for level in (T_MAX, 0.5, T_MIN):
        t = torch.full((64,), level)
        assert torch.equal(flow_map(student, z, t, t), z)
    t, r = torch.full((64,), 0.8), torch.full((64,), 0.3)
    assert not torch.allclose(flow_map(student, z, t, r), z)


def test_the_flow_map_is_ctms_jump_read_on_the_rectified_flow_path():
    """X(z, t, r) = (1 - r) G(z / (1 - t), sigma_t, sigma_r): what the flow_map sampler jumps with."""
    student = random_student(dtype=DT)
    z = torch.randn(64, 2, dtype=DT)
    t, r = times(64)
    jumped = sample_flow_map(lambda x, s, s_next: student(x, s, None, s_next), z[:1] / (1 - t[0]),
                             torch.stack([ve_sigma(t[0]), ve_sigma(r[0])]))
    assert torch.allclose(flow_map(student, z[:1], t[:1], r[:1]), (1 - r[0]) * jumped, atol=1e-12)


def test_meanflow_with_r_equal_t_is_flow_matching():
    """At r = t the target is the velocity itself and MeanFlow's loss (adaptive weight off) is flow matching:
    ||u(z, t, t) - (eps - x0)||^2 = ||D(x, sigma_t) - x0||^2 / t^2, D the student's diagonal."""
    method = MeanFlow(ring_mixture(), random_student(), MeanFlowConfig(r_neq_t_share=0.0, adaptive_p=0.0))
    x0 = RING.train_x[:128]
    loss = method.meanflow_losses(x0, None, torch.Generator().manual_seed(3), conditional=True)["loss"]
    gen = torch.Generator().manual_seed(3)
    t, r = draw_times(128, gen, x0, -0.4, 1.0, -0.4, 1.0, 0.0)
    assert torch.equal(t, r)
    eps = torch.randn(x0.shape, generator=gen)
    z = (1 - t)[:, None] * x0 + t[:, None] * eps
    denoised = method.student(z / (1 - t)[:, None], ve_sigma(t), None, ve_sigma(t))
    expected = ((denoised - x0).pow(2).sum(1) / t**2).mean()
    assert torch.allclose(loss, expected, rtol=1e-4)
    v = torch.randn_like(z)
    assert torch.equal(method.meanflow_target(z, t, t, v, None), v)


def test_forward_mode_and_finite_difference_tangents_agree():
    student = random_student(dtype=DT)
    z = torch.randn(64, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    t, r = times(64, seed=2)
    v = torch.randn(64, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    for derivative, args in ((time_derivative, (student, z, r, t, v, None)),
                             (target_time_derivative, (student, z, r, t, None))):
        u_ad, exact = derivative(*args, "forward", 1e-6)
        u_fd, approx = derivative(*args, "finite_difference", 1e-6)
        assert torch.allclose(u_ad, u_fd)
        assert float((exact - approx).norm() / exact.norm()) < 1e-6
        assert float(exact.norm()) > 0


def test_the_flow_time_target_input_has_a_derivative_at_zero_and_the_log_one_does_not():
    """The Lagrangian tangent differentiates the map in its target time: CTM's log encoding is clamped below
    1e-4, so its derivative at s = 0 is zero; the flow-time encoding's is the network's."""
    x, s = torch.randn(32, 2), torch.full((32,), 3.0)
    derivatives = {}
    for encoding in ("log", "flow_time"):
        student = random_student()
        student.target_time = encoding
        _, tangent = torch.func.jvp(lambda target, m=student: m(x, s, None, target), (torch.zeros(32),),
                                    (torch.ones(32),))
        derivatives[encoding] = float(tangent.abs().max())
    assert derivatives["log"] == 0.0 and derivatives["flow_time"] > 1e-3


def test_a_two_time_student_takes_further_inputs_after_the_target_time(tmp_path):
    """Two times plus a guidance scale: a backbone with two extra conditions."""
    student = random_student(further_inputs=1)
    x, s, s_next = torch.randn(16, 2), torch.full((16,), 5.0), torch.full((16,), 0.3)
    scale = torch.full((16, 1), 2.0)
    out = student(x, s, None, s_next, scale)
    assert not torch.allclose(out, student(x, s, None, s_next, 2 * scale))
    with pytest.raises(ValueError, match="further input"):
        student(x, s, None, s_next)
    with pytest.raises(ValueError, match="no further inputs"):
        random_student()(x, s, None, s_next, scale)
    save_model(tmp_path / "m", student, {"role": "student"})
    loaded, meta = load_model(tmp_path / "m")
    assert meta["denoiser"]["target_time"] == "flow_time"
    assert torch.equal(loaded(x, s, None, s_next, scale), out)


def test_a_two_time_config_saved_before_the_target_time_option_loads_as_log():
    backbone = add_extra_conditions(MLP((2,), width=16, depth=1), 1)
    loaded = denoiser_from_config(backbone, {"kind": "two_time", "sigma_data": 0.5, "zero_level": 1e-4})
    assert loaded.target_time == "log"
    with pytest.raises(ValueError, match="target_time"):
        TwoTimeDenoiser(backbone, target_time="linear")


def exact_inputs(n: int = 256):
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(n, 2, dtype=DT, generator=gen) * math.sqrt(V)
    t, r = times(n, seed=6)
    z = (1 - t)[:, None] * x0 + t[:, None] * torch.randn(n, 2, dtype=DT, generator=gen)
    return z, r, t


@pytest.mark.parametrize("residual", [eulerian_residual, lagrangian_residual], ids=["eulerian", "lagrangian"])
def test_residuals_vanish_for_the_exact_flow_map_and_not_for_another_teachers(residual):
    z, r, t = exact_inputs()
    norms = [float(residual(ExactGaussianMap(), gaussian_teacher(variance), z, r, t, None, 1.0, "forward",
                            1e-4).norm(dim=1).mean()) for variance in (V, 2 * V)]
    assert norms[0] < 1e-9 and norms[1] > 1e-2, norms
    assert float(residual(ExactGaussianMap(), gaussian_teacher(), z, r, t, None, 0.5, "forward", 1e-4).norm()) > 1e-2


def test_meanflows_target_is_the_exact_average_velocity_for_the_exact_map():
    z, r, t = exact_inputs()
    method = MeanFlow(gaussian_teacher(), random_student(), MeanFlowConfig(jvp="forward"))
    method.student = ExactGaussianMap()
    for variance, close in ((V, True), (2 * V, False)):
        target = method.meanflow_target(z, r, t, velocity(gaussian_teacher(variance), z, t), None)
        assert torch.allclose(target, average_velocity(method.student, z, r, t), atol=1e-9) is close


# ------------------------------------------------------------------------------------ methods


def test_registry_needs_and_sampling_specs():
    assert METHODS["meanflow"] is MeanFlow and METHODS["flow_map"] is FlowMapDistillation
    assert METHODS["flow_map_free"] is FlowMapWithoutData
    assert MeanFlow.needs == {"data"} and FlowMapDistillation.needs == {"data"}
    assert FlowMapWithoutData.needs == {"noise"}
    for cls in (MeanFlow, FlowMapDistillation, FlowMapWithoutData):
        method = cls(ring_mixture(), random_student(), cls.Config())
        for nfe in (1, 2, 4):
            spec = method.sampling(nfe)
            assert spec.sampler == "flow_map" and count_nfe(spec.sampler, torch.tensor(spec.sigmas)) == nfe


def test_bad_configs_and_students_are_refused():
    for cls, bad in ((MeanFlow, {"velocity": "data"}), (MeanFlow, {"r_neq_t_share": 1.5}),
                     (MeanFlow, {"jvp": "backward"}), (FlowMapDistillation, {"form": "hamiltonian"}),
                     (FlowMapWithoutData, {"start_share": -0.1})):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            cls(ring_mixture(), random_student(), cls.Config(**bad))
    with pytest.raises(ConfigError, match="flow_time"):
        FlowMapDistillation(ring_mixture(), TwoTimeDenoiser(add_extra_conditions(small_mlp(), 1)), FlowMapConfig())


def test_meanflows_stages_follow_the_run():
    method = MeanFlow(ring_mixture(), random_student(), MeanFlowConfig(total_steps=100, mid_training_share=0.2,
                                                                      bootstrap_share=0.3))
    assert [method.stage(k) for k in (0, 19, 20, 69, 70, 99)] == ["mid_training"] * 2 + ["distillation"] * 2 + \
        ["bootstrap"] * 2
    assert method.after_update("student", 19) and not method.after_update("student", 20)
    assert MeanFlow.run_schedule(500, {}) == {"total_steps": 500}


def test_mid_training_regresses_the_teachers_euler_chords():
    """Consistency mid-training rolls out batch / pairs trajectories on its levels: one teacher call per
    trajectory and level."""
    method = MeanFlow(gaussian_teacher(), random_student(), MeanFlowConfig(mid_training_levels=8,
                                                                           mid_training_pairs=4))
    out = method.mid_training_losses(torch.zeros(64, 2), None, torch.Generator().manual_seed(0))
    assert method.teacher_evals == 8 * 16 and float(out["loss"]) > 0


def test_the_data_free_method_never_reads_real_data():
    """flow_map_free's source is noise only; training it against a dataset whose samples raise when read works."""

    class NoData:
        name, data_shape, num_classes, conditions = "ring8", (2,), 0, None

        @property
        def train_x(self):
            raise AssertionError("the data-free method read real data")

    source = make_source(FlowMapWithoutData.needs, NoData())
    assert isinstance(source, NoiseOnly)
    method, _ = distil_on_ring(FlowMapWithoutData, FreeFlowConfig(jvp="finite_difference"), steps=3, source=source)
    batch = source.batch(8, torch.Generator().manual_seed(0))
    assert batch.x0 is None and batch.noise is not None and method.teacher_evals > 0


def test_flow_map_free_spends_two_teacher_calls_per_sample_and_none_in_its_fake_phase():
    method = FlowMapWithoutData(ring_mixture(), random_student(), FreeFlowConfig(jvp="finite_difference"))
    batch = Batch(noise=torch.randn(32, 2))
    method.losses("fake_score", batch, 0, torch.Generator().manual_seed(0))
    assert method.teacher_evals == 0
    out = method.losses("student", batch, 0, torch.Generator().manual_seed(0))
    assert method.teacher_evals == 64 and {"prediction", "correction"} <= set(out)


# ------------------------------------------------------------------------------------ exact teacher


def rotated_ring() -> GaussianMixture:
    """The ring turned by half a mode spacing: a wrong teacher, whose modes sit between the true ones."""
    angles = torch.arange(8, dtype=DT) * (2 * math.pi / 8) + math.pi / 8
    means = 2.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return GaussianMixture(torch.ones(8, dtype=DT), means, torch.full((8,), 0.01, dtype=DT))


def with_wrong_teacher(cls):
    """``cls`` distilling the rotated ring while judged against the true one: its target is perturbed."""

    class Perturbed(cls):
        name = f"{cls.name}_perturbed"

        def __init__(self, teacher, student, config):
            super().__init__(teacher, student, config)
            self.teacher = CountingDenoiser(rotated_ring()).requires_grad_(False).eval()

    return Perturbed


TIMES = {"p_mean": 0.0, "p_std": 1.6, "target_p_mean": -4.0, "target_p_std": 1.6}  # the ring recipes' draws
RING_CASES = {  # the ring recipes' settings (method arguments, backbone, steps, learning-rate schedule)
    "meanflow": (MeanFlow, MeanFlowConfig(mid_training_share=0.2, total_steps=3000, **TIMES), low_frequency_mlp,
                 3000, "cosine"),
    "flow_map_eulerian": (FlowMapDistillation, FlowMapConfig(tangent_norm_c=0.01, tangent_warmup=300, **TIMES),
                          low_frequency_mlp, 3000, "cosine"),
    "flow_map_lagrangian": (FlowMapDistillation, FlowMapConfig(form="lagrangian", tangent_norm_c=0.01,
                                                               tangent_warmup=300, **TIMES),
                            low_frequency_mlp, 3000, "cosine"),
    "flow_map_free": (FlowMapWithoutData, FreeFlowConfig(jvp="finite_difference", tangent_warmup=1000), small_mlp,
                      3000, "constant"),
}


def ring_run(cls, config, backbone, steps, lr_schedule):
    return distil_on_ring(cls, config, steps, source=make_source(cls.needs, RING), backbone=backbone,
                          lr_schedule=lr_schedule)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(RING_CASES))
def test_on_the_exact_ring_every_flow_map_method_passes_the_two_step_bar(case):
    cls, *settings = RING_CASES[case]
    method, student = ring_run(cls, *settings)
    ok, m = passes_issue_bar(draw(method, student, 2))
    assert ok, m


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(RING_CASES))
def test_the_ring_bar_fails_when_the_teachers_target_is_perturbed(case):
    cls, *settings = RING_CASES[case]
    method, student = ring_run(with_wrong_teacher(cls), *settings)
    ok, m = passes_issue_bar(draw(method, student, 2))
    assert not ok, m


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 20's bar not met: the flow-map students' one-step flow-map error on the "
                   "ring (flow_map 0.161 at 768,000 teacher evaluations, meanflow 0.179 at 1,228,800, flow_map_free "
                   "0.173 at 1,536,000; seed 0) stays above CD's (0.076 at 3000 steps, 1,536,000); docs/flow.md")
def test_the_flow_map_students_one_step_flow_map_error_is_below_cds_at_equal_teacher_evaluations():
    cd_method, cd_student = distil_on_ring(ConsistencyDistillation, CDConfig(), 3000)
    cd_error = flow_map_error(draw(cd_method, cd_student, 1))
    for case in ("meanflow", "flow_map_eulerian", "flow_map_free"):
        cls, config, backbone, steps, schedule = RING_CASES[case]
        method, student = ring_run(cls, config, backbone, steps, schedule)
        assert method.teacher_evals <= cd_method.teacher_evals
        assert flow_map_error(draw(method, student, 1)) < cd_error, case
