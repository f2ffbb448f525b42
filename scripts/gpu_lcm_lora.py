"""LCM-LoRA training step on a GPU: fewstep against the same step written plainly with diffusers + peft (the loop of
diffusers' ``train_lcm_distill_lora_sd_wds.py`` example), on an SD1.5-sized UNet with random weights built from its
config (no download), batch 8 at 512 px (64x64 latents), LoRA rank 64 on the attention projections, bf16 autocast
and a bf16 teacher, with and without gradient checkpointing::

    python scripts/gpu_lcm_lora.py --steps 20 --out $OUT/gpu_lcm_lora.json

prints seconds per step (median after ``--warmup`` steps) and peak CUDA memory of each of the four runs, and the
ratios fewstep / plain. ``--small`` builds a tiny UNet at 64 px for a CPU smoke run (``--device cpu``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
GUIDANCE = 7.5
SKIP = 20  # DDPM timesteps per DDIM step of the example's 50-step solver


def build(folder: Path, small: bool, pixels: int, count: int) -> None:
    """An SD-like pipeline (SD1.5's UNet config unless ``small``; a small VAE with SD's factor 8 and a one-layer CLIP
    text encoder) and ``count`` random captioned images."""
    import diffusers

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_pipelines import save_sd_with_images

    torch.manual_seed(0)
    width = 32 if small else 768
    unet = diffusers.UNet2DConditionModel(
        sample_size=pixels // 8, cross_attention_dim=width,
        **({"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")} if small else {}))
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                                  sample_size=pixels, scaling_factor=0.18215)
    save_sd_with_images(folder, unet, vae, width, pixels, count)


def timed(step, steps: int, warmup: int, device: str) -> dict:
    """Median seconds of ``step()`` after ``warmup`` calls, and peak memory over all of them."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for k in range(warmup + steps):
        started = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if k >= warmup:
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return {"seconds_per_step": statistics.median(times), "peak_gib": peak}


def fewstep_run(folder: Path, options, checkpointing: bool) -> dict:
    import fewstep
    from fewstep.pipeline import distill, new_method
    from fewstep.train.trainer import TrainConfig

    teacher = fewstep.Teacher.from_pipeline(folder / "pipe", images=folder / "images", guidance_scale=GUIDANCE,
                                            resolution=options.pixels)
    config = TrainConfig(steps=options.warmup + options.steps, batch_size=options.batch, lr=1e-4,
                         device=options.device, mixed_precision="bf16", teacher_dtype="bfloat16",
                         gradient_checkpointing=checkpointing, log_every=10**9, checkpoint_every=10**9)
    method = new_method(teacher, "lcm", {}, None, config, options.rank)
    clock = StepClock(options.device, options.warmup)
    distill(teacher, method, train_config=config, progress=False, monitors=(clock,))
    peak = torch.cuda.max_memory_allocated() / 2**30 if options.device.startswith("cuda") else float("nan")
    return {"seconds_per_step": statistics.median(clock.times), "peak_gib": peak}


class StepClock:
    """A training monitor run after every step: the wall time of each step after ``warmup`` (peak memory counts from
    the first step)."""

    every = 1

    def __init__(self, device: str, warmup: int):
        self.device, self.warmup, self.times = device, warmup, []
        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.last = time.perf_counter()

    def __call__(self, step: int, student) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if step > self.warmup:
            self.times.append(now - self.last)
        self.last = now
        return {}


def plain_run(folder: Path, options, checkpointing: bool) -> dict:
    """The diffusers LCM-LoRA example's step: student UNet in bf16 with fp32 LoRA layers, a bf16 teacher copy,
    DDIM skip of 20 timesteps, CFG at 7.5, target from the student itself, pseudo-Huber loss."""
    import diffusers
    from peft import LoraConfig

    from tiny_pipelines import MAX_TOKENS

    device, dtype = options.device, torch.bfloat16
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "pipe", subfolder="unet").to(device, dtype)
    teacher = diffusers.UNet2DConditionModel.from_pretrained(folder / "pipe", subfolder="unet").to(device, dtype)
    unet.requires_grad_(False)
    teacher.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=options.rank, lora_alpha=options.rank, target_modules=LORA_TARGETS,
                                init_lora_weights="gaussian"))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    scheduler = diffusers.DDPMScheduler.from_pretrained(folder / "pipe", subfolder="scheduler")
    alphas = scheduler.alphas_cumprod.to(device)
    size, width = options.pixels // 8, unet.config.cross_attention_dim
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn(options.batch, 4, size, size, device=device, generator=generator)
    text = torch.randn(options.batch, MAX_TOKENS, width, device=device, generator=generator)  # the pipeline's length
    null = torch.zeros_like(text)

    def boundary(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = 10.0 * t.float()
        c_skip = 0.25 / (scaled**2 + 0.25)
        return c_skip.view(-1, 1, 1, 1), (scaled / (scaled**2 + 0.25) ** 0.5).view(-1, 1, 1, 1)

    def x0_of(eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = alphas[t].view(-1, 1, 1, 1)
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    def step() -> None:
        start = torch.randint(1, 50, (options.batch,), device=device) * SKIP - 1
        end = (start - SKIP).clamp(min=0)
        noise = torch.randn_like(latents)
        x = scheduler.add_noise(latents, noise, start)
        with torch.autocast(device.split(":")[0], dtype):
            c_skip, c_out = boundary(start)
            prediction = c_skip * x + c_out * x0_of(unet(x, start, text).sample.float(), x, start)
            with torch.no_grad():
                cond = teacher(x, start, text).sample.float()
                uncond = teacher(x, start, null).sample.float()
                eps = uncond + GUIDANCE * (cond - uncond)
                x0 = x0_of(eps, x, start)
                a_end = alphas[end].view(-1, 1, 1, 1)
                x_end = a_end.sqrt() * x0 + (1 - a_end).sqrt() * eps
                c_skip, c_out = boundary(end)
                target = c_skip * x_end + c_out * x0_of(unet(x_end, end, text).sample.float(), x_end, end)
        loss = ((prediction - target) ** 2 + 1e-6).sqrt().mean() - 1e-3
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in unet.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, options.steps, options.warmup, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--pixels", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a tiny UNet, for a CPU smoke run")
    parser.add_argument("--out", help="write the results as JSON here")
    options = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ["FEWSTEP_CACHE"] = str(Path(tmp) / "cache")
        build(Path(tmp), options.small, options.pixels, max(16, options.batch))
        for checkpointing in (False, True):
            for name, run in (("plain", plain_run), ("fewstep", fewstep_run)):
                key = f"{name}{' +checkpointing' if checkpointing else ''}"
                results[key] = run(Path(tmp), options, checkpointing)
                if options.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                print(f"{key:>26}: {results[key]['seconds_per_step']:.3f} s/step, peak {results[key]['peak_gib']:.2f} "
                      "GiB", flush=True)
    for suffix in ("", " +checkpointing"):
        ours, plain = results[f"fewstep{suffix}"], results[f"plain{suffix}"]
        print(f"fewstep / plain{suffix}: time {ours['seconds_per_step'] / plain['seconds_per_step']:.3f}, peak memory "
              f"{ours['peak_gib'] / plain['peak_gib']:.3f}")
    if options.out:
        Path(options.out).write_text(json.dumps({"options": vars(options), "results": results}, indent=2))


if __name__ == "__main__":
    main()
