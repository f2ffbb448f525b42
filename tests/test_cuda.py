"""On a CUDA GPU (every test here is skipped without one): each method trains, evaluates and exports there; a
GPU-trained student samples the same on the CPU; a resumed GPU run equals an uninterrupted one; the CD recipe
reaches the issue's quality bar on the exact ring in float32 and in bf16; a diffusers UNet teacher distils with
bf16, a bf16 teacher and gradient checkpointing; and the math checks (analytic denoiser, forward-mode JVP) hold.

accelerate fixes one device per process, so every check that trains runs ``fewstep`` in a fresh process.
``FEWSTEP_TEST_DEVICE=cpu pytest tests/test_cuda.py`` runs the same checks on the CPU (to debug them without a GPU).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from fewstep.api import Student, Teacher
from fewstep.cache import cache_dir
from fewstep.jvp import jvp
from fewstep.methods import METHODS
from fewstep.models.denoiser import EDMDenoiser
from fewstep.nets import MLP

DEVICE = os.environ.get("FEWSTEP_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
CONFIGS = Path(__file__).parent.parent / "configs"


def run(*args: str, cwd: Path) -> str:
    """``python args...`` in a fresh process; its stdout, or a failure showing the end of its stderr."""
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stderr[-4000:]}"
    return done.stdout


def fewstep(*args: str, cwd: Path) -> str:
    return run("-m", "fewstep.cli", *args, cwd=cwd)


def student_rows(report: dict) -> dict[int, dict]:
    return {row["nfe"]: row for row in report["results"] if row["role"] == "student"}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_distils_evaluates_and_exports_on_cuda(method, tmp_path):
    """The method's ring recipe, shortened, on the GPU: training, level choice, evaluation, plots and export. The
    exported student then loads on the CPU, and its one-step samples match the GPU's from the same noise."""
    fewstep("distill", str(CONFIGS / f"ring8-{method}.yaml"), f"train.device={DEVICE}", "train.steps=40",
            "train.checkpoint_every=20", "eval.n_samples=500", "eval.teacher_nfe=[1,2]", f"out={tmp_path}",
            "--quiet", cwd=tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["recipe"]["train"]["device"] == DEVICE
    rows = student_rows(report)
    assert sorted(rows) == [1, 2, 4]
    assert all(row["nonfinite"] == 0 and math.isfinite(row["nll"]) for row in rows.values()), rows
    student = Student.load(tmp_path / "student")
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    on_cpu = student.sample(0, 1, noise=noise)
    student.denoiser.to(DEVICE)
    on_gpu = student.sample(0, 1, noise=noise)
    assert on_gpu.device.type == DEVICE
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-4), float((on_gpu.cpu() - on_cpu).abs().max())


def test_a_resumed_cuda_run_equals_an_uninterrupted_one(tmp_path):
    """40 CD steps straight, and 20 then a resume to 40: the same student, bit for bit (the GPU generator's state
    is checkpointed). The resumed call names another seed (allowed with --resume-changed), so a run that started
    over would differ."""
    common = (str(CONFIGS / "ring8-cd.yaml"), f"train.device={DEVICE}", "train.checkpoint_every=20",
              "eval.n_samples=200", "eval.teacher_nfe=[1]", "--quiet")
    fewstep("distill", *common, "train.steps=40", f"out={tmp_path / 'straight'}", cwd=tmp_path)
    fewstep("distill", *common, "train.steps=20", f"out={tmp_path / 'resumed'}", cwd=tmp_path)
    fewstep("distill", *common, "train.steps=40", "train.seed=7", f"out={tmp_path / 'resumed'}", "--resume-changed",
            cwd=tmp_path)
    straight, resumed = weights(tmp_path / "straight" / "student"), weights(tmp_path / "resumed" / "student")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    fewstep("distill", *common, "train.steps=40", "train.seed=7", f"out={tmp_path / 'seed7'}", cwd=tmp_path)
    other_seed = weights(tmp_path / "seed7" / "student")
    assert not all(torch.equal(straight[k], other_seed[k]) for k in straight)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_the_cd_ring_recipe_meets_the_quality_bar_on_cuda(precision, tmp_path):
    """The full ring8-cd recipe on the GPU: 8/8 modes at 2 NFE, at least 3x lower excess NLL than the best
    training-free solver at 2 NFE, spread within 0.7-1.3x of the data's (the CPU run: 2.91 against 76.6), and
    the report's speed columns measured on the GPU."""
    fewstep("distill", str(CONFIGS / "ring8-cd.yaml"), f"train.device={DEVICE}", f"train.mixed_precision={precision}",
            f"out={tmp_path}", "--quiet", cwd=tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    two = student_rows(report)[2]
    best_solver = min(row["excess_nll"] for row in report["results"] if row["role"] == "teacher" and row["nfe"] == 2)
    print(f"ring8-cd on {DEVICE} ({precision}): excess NLL at 2 NFE {two['excess_nll']:.3f} vs best solver "
          f"{best_solver:.3f}; student {two['sec_per_sample']:.3g} s/sample, speedup {two['speedup']:.1f}x")
    assert two["modes_covered"] == two["modes_total"] == 8
    assert two["excess_nll"] * 3 <= best_solver
    assert 0.7 <= two["spread_ratio"] <= 1.3
    assert two["sec_per_sample"] > 0 and two["speedup"] > 1


def test_digits_teacher_trains_distils_evaluates_and_samples_on_cuda(tmp_path):
    """A recipe with a trained teacher on the GPU: the teacher is trained there and cached apart from CPU ones,
    then ``fewstep eval --device cuda`` and ``fewstep sample --device cuda`` read the saved models."""
    fewstep("distill", str(CONFIGS / "digits-cd.yaml"), f"train.device={DEVICE}", "teacher.steps=200", "train.steps=60",
            "eval.n_samples=300", "eval.teacher_nfe=[1,2]", "eval.tune_levels=false", f"out={tmp_path / 'run'}",
            "--quiet", cwd=tmp_path)
    suffix = "" if DEVICE == "cpu" else f"-{DEVICE}"
    teachers = sorted((cache_dir() / "teachers").glob(f"digits-mlp-????????????{suffix}"))
    assert len(teachers) == 1
    student = str(tmp_path / "run" / "student")
    fewstep("eval", "--dataset", "digits", "--teacher", str(teachers[0]), "--student", student, "--teacher-nfe", "2",
            "--n-samples", "300", "--device", DEVICE, "--json", str(tmp_path / "eval.json"),
            "--quiet", cwd=tmp_path)
    rows = student_rows(json.loads((tmp_path / "eval.json").read_text()))
    assert all(math.isfinite(row["fd"]) for row in rows.values()), rows
    fewstep("sample", "--model", student, "--device", DEVICE, "-n", "16",
            "--out", str(tmp_path / "x.pt"), cwd=tmp_path)
    images = torch.load(tmp_path / "x.pt")
    assert images.shape == (16, 1, 8, 8) and images.device.type == "cpu" and images.isfinite().all()


DIFFUSERS_JOB = """
import math, diffusers, torch, fewstep
from fewstep.train.trainer import TrainConfig
torch.manual_seed(0)
unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
    layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
unet.save_pretrained("tiny/unet")
diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False).save_pretrained("tiny/scheduler")
teacher = fewstep.Teacher.from_diffusers("tiny", dataset="digits")
config = TrainConfig(steps=20, batch_size=16, device="{device}", mixed_precision="bf16", teacher_dtype="bfloat16",
                     gradient_checkpointing=True)
student = fewstep.distill(teacher, "cd", train_config=config, progress=False)
images = student.sample(8, 2)
assert images.device.type == "{device}" and images.isfinite().all(), images
losses = student.train_result.losses
assert losses and all(math.isfinite(value) for value in losses.values()), losses
print("trained", student.train_result.steps_done)
"""


def test_a_diffusers_unet_teacher_distils_on_cuda_with_the_memory_savers(tmp_path):
    """A tiny diffusers UNet2DModel teacher: CD with bf16 autocast, a bf16 teacher and gradient checkpointing."""
    pytest.importorskip("diffusers")
    assert run("-c", DIFFUSERS_JOB.format(device=DEVICE), cwd=tmp_path).split() == ["trained", "20"]


def test_the_analytic_teacher_gives_the_same_answers_on_cuda():
    """The ring's closed-form denoiser and its teacher sampler agree between CPU and GPU (float64 math)."""
    teacher = Teacher.analytic("ring8")
    generator = torch.Generator().manual_seed(0)
    x, s = torch.randn(512, 2, generator=generator, dtype=torch.float64), torch.rand(512, dtype=torch.float64) * 5
    on_cpu = teacher.denoiser(x, s)
    samples_cpu = teacher.sample(512, "heun", 8, seed=3)
    teacher.denoiser.to(DEVICE)
    assert torch.allclose(teacher.denoiser(x.to(DEVICE), s.to(DEVICE)).cpu(), on_cpu, rtol=1e-9, atol=1e-12)
    samples_gpu = teacher.sample(512, "heun", 8, seed=3)
    assert samples_gpu.device.type == DEVICE
    assert torch.allclose(samples_gpu.cpu(), samples_cpu, atol=1e-5)


def test_forward_mode_jvp_matches_central_differences_on_cuda():
    torch.manual_seed(0)
    fn = EDMDenoiser(MLP((3,), width=32, depth=2), sigma_data=0.7).double().to(DEVICE)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    x, vx = (torch.randn(16, 3, generator=generator, device=DEVICE, dtype=torch.float64) for _ in range(2))
    s = torch.rand(16, generator=generator, device=DEVICE, dtype=torch.float64) + 0.2
    vs = torch.randn(16, generator=generator, device=DEVICE, dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        _, derivative = jvp(fn, (x, s), (vx, vs), method="forward")
        central = (fn(x + h * vx, s + h * vs) - fn(x - h * vx, s - h * vs)) / (2 * h)
    assert derivative.device.type == DEVICE
    assert float((derivative - central).norm() / central.norm()) < 1e-6
