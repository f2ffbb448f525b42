"""Compare a student's size and time per network evaluation with its recipe's teacher (SlimFlow's smaller students)::

    python scripts/step_time.py configs/digits-slimflow.yaml runs/digits-slimflow/student

prints the parameters of both networks and the median wall time of one denoiser call on a batch of ``--batch``
samples (after five warm-up calls), over ``--repeats`` timed calls, at ``FEWSTEP_THREADS`` threads (one when unset).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fewstep.config import load_recipe
from fewstep.models.denoiser import Denoiser
from fewstep.run import resolve_teacher
from fewstep.student import Student
from fewstep.threads import fixed_threads


def seconds_per_call(denoiser: Denoiser, x: torch.Tensor, cond: torch.Tensor | None, repeats: int) -> float:
    s = torch.full((x.shape[0],), 1.0)
    times = []
    with torch.no_grad():
        for k in range(repeats + 5):
            started = time.perf_counter()
            denoiser(x, s, cond)
            if k >= 5:
                times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("student")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=200)
    options = parser.parse_args()
    torch.set_num_threads(fixed_threads() or 1)
    recipe = load_recipe(options.recipe)
    teacher = resolve_teacher(recipe.teacher, recipe.dataset, progress=False)
    student = Student.load(options.student, teacher.dataset)
    dataset = teacher.dataset
    x = torch.randn(options.batch, *dataset.data_shape, generator=torch.Generator().manual_seed(0))
    cond = torch.arange(options.batch) % dataset.num_classes if dataset.num_classes else None
    rows = {"teacher": teacher.denoiser, "student": student.denoiser}
    timings = {}
    for name, denoiser in rows.items():
        timings[name] = seconds_per_call(denoiser, x, cond, options.repeats)
        count = sum(p.numel() for p in denoiser.parameters())
        print(f"{name}: {count:,} parameters, {1e3 * timings[name]:.3f} ms per call on {options.batch} samples")
    print(f"student / teacher time per step: {timings['student'] / timings['teacher']:.3f} "
          f"({timings['teacher'] / timings['student']:.2f}x faster)")


if __name__ == "__main__":
    main()
