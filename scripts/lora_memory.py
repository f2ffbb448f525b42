"""Trainable parameters and peak training memory of a LoRA student against the full student, on an SD-like
pipeline built from a config with random weights (no download), distilled with LCM on a folder of random images.

Each mode runs in its own process; peak memory is the most resident memory (``/proc/self/statm``, sampled every
2 ms) while the student trains, minus the resident memory just before training starts (teacher, VAE and text
encoder loaded, latents cached)::

    python scripts/lora_memory.py --rank 8 --steps 3 --width 64

prints one line per mode and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def build(folder: Path, width: int) -> None:
    import diffusers
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_pipelines import save_sd_with_images, vae

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                                          block_out_channels=(width, 2 * width, 4 * width), norm_num_groups=32,
                                          cross_attention_dim=64, attention_head_dim=8,
                                          down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                                          up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2)
    save_sd_with_images(folder, unet, vae(), 64, 32, 16)


def measure(folder: Path, rank: int | None, steps: int) -> dict:
    import fewstep

    teacher = fewstep.Teacher.from_pipeline(folder / "pipe", images=folder / "images", guidance_scale=3.0)
    before, peak, done = resident(), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.perf_counter()
    student = fewstep.distill(teacher, "lcm", steps=steps, batch_size=4, progress=False, lora_rank=rank)
    seconds = time.perf_counter() - started
    done.set()
    watcher.join()
    network = student.denoiser.backbone.model
    return {"rank": rank, "trainable": sum(p.numel() for p in network.parameters() if p.requires_grad),
            "parameters": sum(p.numel() for p in network.parameters()), "peak_mb": (peak[0] - before) / 2**20,
            "seconds_per_step": seconds / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--width", type=int, default=64, help="the UNet's first block width")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "RANK"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        rank = int(options.child[1])
        print(json.dumps(measure(Path(options.child[0]), rank or None, options.steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FEWSTEP_CACHE"] = str(Path(tmp) / "cache")
        build(Path(tmp), options.width)
        rows = []
        for rank in (0, options.rank):
            result = subprocess.run([sys.executable, __file__, "--steps", str(options.steps), "--child", tmp,
                                     str(rank)], capture_output=True, text=True, check=True, env=os.environ)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    for row in rows:
        name = "full student" if row["rank"] is None else f"LoRA rank {row['rank']}"
        print(f"{name:>14}: {row['trainable']:>10,} of {row['parameters']:,} parameters train; peak training memory "
              f"{row['peak_mb']:.1f} MiB; {row['seconds_per_step']:.2f} s/step")
    print(f"LoRA / full: trainable {rows[1]['trainable'] / rows[0]['trainable']:.4f}, peak memory "
          f"{rows[1]['peak_mb'] / rows[0]['peak_mb']:.3f} ({1 - rows[1]['peak_mb'] / rows[0]['peak_mb']:.0%} lower)")


if __name__ == "__main__":
    main()
