"""Diffusers teachers in, diffusers pipelines and LoRA out (tiny models built from configs, no downloads).

The scheduler-step check uses the untrained UNet (an exact equivalence, true for any weights); the CD student
that is exported is distilled from the same tiny UNet trained on digits through its own DDPM path."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import diffusers

import fewstep
import fewstep.hub as hub
from fewstep.data.sources import RealData
from fewstep.errors import ConfigError, FewstepError
from fewstep.paths import RectifiedFlow, VPDiscrete
from fewstep.solvers import Sampling, sample
from fewstep.train.teacher import TeacherConfig, TeacherTraining
from fewstep.train.trainer import TrainConfig, train


def tiny_unet() -> diffusers.UNet2DModel:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8)


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-ddpm")
    tiny_unet().save_pretrained(folder / "unet")
    diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False).save_pretrained(folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def teacher(unet_folder):
    return fewstep.Teacher.from_diffusers(unet_folder, dataset="digits")


def denoising_error(denoiser, dataset) -> float:
    """Mean squared error of the denoiser's x0 on held-out digits at four noise levels (fixed draws)."""
    generator = torch.Generator().manual_seed(0)
    errors = []
    with torch.no_grad():
        for level in (0.25, 0.5, 1.0, 2.0):
            x0 = dataset.ref_x[:256]
            noisy = x0 + level * torch.randn(x0.shape, generator=generator)
            errors.append(float((denoiser(noisy, torch.full((x0.shape[0],), level)) - x0).square().mean()))
    return sum(errors) / len(errors)


@pytest.fixture(scope="module")
def trained_teacher(unet_folder):
    """The tiny UNet2DModel trained on digits for 300 steps with EDM's loss, read through its DDPM path (VP
    discrete, eps prediction): fewstep's teacher training works on any denoiser."""
    teacher = fewstep.Teacher.from_diffusers(unet_folder, dataset="digits")
    dataset = teacher.dataset
    before = denoising_error(teacher.denoiser, dataset)
    method = TeacherTraining(teacher.denoiser, TeacherConfig(sigma_data=dataset.sigma_data))
    result = train(method, RealData(dataset.train_x), TrainConfig(steps=300, batch_size=64, lr=2e-3, seed=0),
                   progress=False)
    trained = fewstep.Teacher(result.ema_student, dataset, teacher.name)
    return trained, before, denoising_error(trained.denoiser, dataset)


def test_the_diffusers_teacher_trains_on_digits(trained_teacher):
    _, before, after = trained_teacher
    print(f"tiny UNet2DModel denoising MSE on held-out digits: {before:.3f} untrained, {after:.3f} trained")
    assert after < 0.5 * before


@pytest.fixture(scope="module")
def student(trained_teacher):
    return fewstep.distill(trained_teacher[0], "cd", steps=20, batch_size=16, progress=False)


def test_scheduler_config_sets_path_prediction_and_time(teacher):
    denoiser = teacher.denoiser
    assert isinstance(denoiser.path, VPDiscrete) and denoiser.prediction == "eps" and denoiser.time_scale == 1.0
    assert denoiser.data_shape == (1, 8, 8) and denoiser.num_classes == 0
    cumprod = diffusers.DDIMScheduler(beta_schedule="linear").alphas_cumprod
    t = torch.tensor([0.0, 17.0, 500.0, 999.0])
    alpha = denoiser.path.alpha(t)
    assert torch.allclose(alpha**2, cumprod[t.long()], rtol=1e-5)


def test_one_fewstep_euler_step_equals_ddim_step(teacher):
    scheduler = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False)
    scheduler.set_timesteps(10)
    t, t_prev = scheduler.timesteps[0], scheduler.timesteps[1]
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    path, unet = teacher.denoiser.path, teacher.denoiser.backbone.model
    with torch.no_grad():
        reference = scheduler.step(unet(x, t).sample, t, x).prev_sample
        levels = path.ve_sigma(torch.tensor([float(t), float(t_prev)]))
        x_ve = x / path.alpha(torch.tensor(float(t)))
        ours = sample(teacher.denoiser, x_ve / levels[0], "euler", levels)
        ours = ours * path.alpha(torch.tensor(float(t_prev)))
    diff = (ours - reference).abs().max().item()
    print(f"fewstep euler step vs DDIMScheduler.step: max abs diff {diff:.2e}")
    assert diff < 1e-5


def pipeline_sample(pipe, nfe: int, seed: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's final state (before post-processing) and its post-processed images."""
    final = {}
    images = pipe(batch_size=n, num_inference_steps=nfe, generator=torch.Generator().manual_seed(seed),
                  output_type="pt", callback=lambda i, t, x: final.__setitem__("x", x)).images
    return final["x"], images


def student_sample(student, nfe: int, seed: int, n: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)  # one generator: initial noise, then re-noising draws
    noise = torch.randn((n, *student.dataset.data_shape), generator=generator)
    return student.sample(n, nfe=nfe, noise=noise, generator=generator)


@pytest.fixture(scope="module")
def dmd2_student(trained_teacher):
    return fewstep.distill(trained_teacher[0], "dmd2", steps=3, batch_size=8, progress=False,
                           method_args={"fake_updates": 1})


@pytest.mark.parametrize("name", ["student", "dmd2_student"])
def test_a_student_exports_to_a_diffusers_pipeline_that_samples_identically(name, request, tmp_path):
    """CD's and DMD2's students: the exported pipeline reproduces fewstep's own sampling at 1, 2 and 4 NFE."""
    student = request.getfixturevalue(name)
    hub.export_student(student, tmp_path / "pipe", "diffusers")
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(pipe.scheduler, hub.FewstepScheduler)
    for nfe in (1, 2, 4):
        raw, images = pipeline_sample(pipe, nfe, seed=nfe)
        ours = student_sample(student, nfe, seed=nfe)
        diff = (raw - ours).abs().max().item()
        print(f"{student.method} student vs diffusers pipeline at {nfe} NFE: max abs diff {diff:.2e}")
        assert diff < 1e-5
        assert (images - (ours / 2 + 0.5).clamp(0, 1)).abs().max().item() < 1e-5


def test_fewstep_folder_round_trip(student, tmp_path):
    hub.export_student(student, tmp_path / "student", "fewstep")
    reloaded = fewstep.Student.load(tmp_path / "student")
    diff = (student_sample(reloaded, 2, seed=0) - student_sample(student, 2, seed=0)).abs().max().item()
    assert diff == 0.0


def tiny_condition_unet() -> diffusers.UNet2DConditionModel:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                          block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=16,
                                          attention_head_dim=4,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def test_lora_export_loads_through_load_lora_weights(tmp_path):
    """A text-conditioned student with a LoRA adapter: the exported weights, loaded by a pipeline's
    ``load_lora_weights``, change the pipeline's network exactly as they change the student's."""
    scheduler = diffusers.DDPMScheduler()
    denoiser = hub.diffusers_denoiser(tiny_condition_unet(), scheduler, encoder_hidden_states=TEXT)
    dataset = fewstep.load_dataset("digits")
    student = fewstep.Student(denoiser, "cd", {1: Sampling("consistency", [80.0])}, dataset)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        before = student.denoiser.backbone(x, t)
        unet = hub.add_lora(student, rank=4)
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(7))
        after = student.denoiser.backbone(x, t)
    hub.export_student(student, tmp_path / "lora", "lora")
    pipe = hub.ConsistencyModelLoraPipeline(unet=tiny_condition_unet(), scheduler=diffusers.DDPMScheduler())
    pipe.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        loaded = pipe.unet(x, t, encoder_hidden_states=TEXT.expand(2, -1, -1)).sample
    change, diff = (after - before).abs().max().item(), (loaded - after).abs().max().item()
    print(f"LoRA changes the student's network by {change:.2e}; pipeline with loaded LoRA vs student: {diff:.2e}")
    assert change > 1e-3 and diff < 1e-5


def test_lora_on_a_unet2d_model_is_refused(student):
    with pytest.raises(ConfigError, match="LoRA"):
        hub.add_lora(student)
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        hub.export_student(student, "unused", "lora")


def test_export_of_a_non_diffusers_student_is_refused(tmp_path):
    teacher = fewstep.Teacher.analytic("ring8")
    student = fewstep.distill(teacher, "cd", steps=2, batch_size=8, progress=False)
    with pytest.raises(ConfigError, match="diffusers teacher"):
        hub.export_student(student, tmp_path / "out", "diffusers")
    with pytest.raises(ConfigError, match="export format"):
        hub.export_student(student, tmp_path / "out", "onnx")


def flow_scheduler() -> diffusers.FlowMatchEulerDiscreteScheduler:
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)


TEXT = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(0))
POOLED = torch.randn(1, 8, generator=torch.Generator().manual_seed(1))


def flow_models():
    torch.manual_seed(0)
    return [
        (diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                         pos_embed_max_size=16), {"pooled_projections": POOLED}),
        (diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                          pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)),
         {"pooled_projections": POOLED, "data_shape": (4, 8, 8)}),
        (diffusers.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                          attention_head_dim=8, num_layers=1, num_cross_attention_heads=2,
                                          cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
                                          sample_size=8, patch_size=1), {}),
    ]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["sd3", "flux", "sana"])
def test_flow_matching_transformers_as_teachers(index):
    model, kwargs = flow_models()[index]
    denoiser = hub.diffusers_denoiser(model, flow_scheduler(), encoder_hidden_states=TEXT, **kwargs)
    assert isinstance(denoiser.path, RectifiedFlow) and denoiser.prediction == "velocity"
    expected_scale = 1.0 if type(model).__name__ == "FluxTransformer2DModel" else 1000.0
    assert denoiser.time_scale == expected_scale
    assert hub.scheduler_reading(flow_scheduler(), type(model).__name__, dict(model.config))["shift"] == 3.0
    x = torch.randn(2, *denoiser.data_shape)
    with torch.no_grad():
        out = denoiser(x, torch.tensor([0.5, 20.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_dit_teacher_is_class_conditional():
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                            out_channels=8, num_layers=1, sample_size=8, patch_size=2,
                                            num_embeds_ada_norm=10)
    denoiser = hub.diffusers_denoiser(model, diffusers.DDPMScheduler())
    assert denoiser.num_classes == 10 and denoiser.data_shape == (4, 8, 8)
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        out = denoiser(x, torch.tensor([0.1, 1.0, 50.0]), torch.tensor([0, 3, 10]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_unet2d_condition_model_uses_the_given_embeddings():
    model = tiny_condition_unet()
    scheduler = diffusers.EulerDiscreteScheduler(prediction_type="v_prediction")
    a = hub.diffusers_denoiser(model, scheduler, encoder_hidden_states=TEXT)
    assert a.prediction == "v"
    x, s = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 3.0])
    with torch.no_grad():
        first = a(x, s)
        a.backbone.set_conditioning(encoder_hidden_states=TEXT + 1)
        second = a(x, s)
    assert torch.isfinite(first).all() and (first - second).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="encoder_hidden_states"):
        hub.diffusers_denoiser(model, scheduler)


def test_folder_without_scheduler_config_is_refused(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "unet")
    with pytest.raises(FewstepError, match="scheduler config"):
        fewstep.Teacher.from_diffusers(tmp_path)


def test_unsupported_model_or_scheduler_is_refused(tmp_path, unet_folder):
    diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=2).save_pretrained(
        tmp_path / "unet")
    diffusers.DDIMScheduler().save_pretrained(tmp_path / "scheduler")
    with pytest.raises(FewstepError, match="AutoencoderKL"):
        fewstep.Teacher.from_diffusers(tmp_path)
    with pytest.raises(FewstepError, match="KarrasVeScheduler"):
        hub.scheduler_reading({"_class_name": "KarrasVeScheduler"}, "UNet2DModel", {})


def test_cli_export_writes_a_diffusers_folder(student, tmp_path):
    from fewstep.cli import main

    student.save(tmp_path / "run" / "student")
    assert main(["export", str(tmp_path / "run"), "--format", "diffusers", "--out", str(tmp_path / "pipe")]) == 0
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    raw, _ = pipeline_sample(pipe, 2, seed=9)
    assert (raw - student_sample(student, 2, seed=9)).abs().max().item() < 1e-5
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2


def test_gradient_checkpointing_switches_on_a_diffusers_models_own_and_keeps_its_gradients(teacher):
    """``train.gradient_checkpointing`` on a diffusers backbone uses the model's own switch; the gradients match."""
    from fewstep.train.memory import enable_gradient_checkpointing

    student = fewstep.build_method(teacher, "cd").student.train()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.5, 1.0, 2.0, 4.0])

    def grads() -> dict[str, torch.Tensor]:
        student.zero_grad()
        student(x, s).square().sum().backward()
        return {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}

    plain = grads()
    assert enable_gradient_checkpointing(student) == 1
    unet = next(m for m in student.modules() if isinstance(m, diffusers.UNet2DModel))
    assert unet.is_gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)
