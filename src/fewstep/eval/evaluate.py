"""Evaluate teachers and students side by side: same noise, same labels, same metrics, one report.

:func:`evaluate` draws one seeded batch of noise (and class labels when conditional) and gives it to every
:class:`Candidate`, so differences between rows come from the samplers alone; :func:`evaluate_models` does it
for a teacher's training-free solvers and distilled students. A dataset whose metric is ``fd`` (digits) is
measured by :func:`fewstep.eval.digits.digits_metrics`, every other one by :func:`fewstep.eval.toy.toy_metrics`;
the report's ``quality_metric`` is the dataset's (:attr:`~fewstep.data.spec.DatasetSpec.metric`), a distance
(lower is better). Each report carries the noise floor, the values two real sample sets of the same size reach.

Report keys that scripts rely on (keep them stable): ``dataset``, ``model``, ``results`` (rows with ``name``,
``role``, ``sampler``, ``nfe``, the metric keys, ``sec_per_sample``, ``peak_memory_bytes``, and ``speedup``
for students), ``noise_floor``, ``reference``, ``n_samples``, ``seed``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm import tqdm

from fewstep.cache import atomic_write
from fewstep.data.spec import DatasetSpec
from fewstep.errors import ConfigError, DataError
from fewstep.eval import digits, toy
from fewstep.eval.speed import peak_memory, time_sampler
from fewstep.solvers import DEFAULT_TEACHER_NFE, ode_endpoint
from fewstep.threads import share_cpu

if TYPE_CHECKING:
    from fewstep.student import Student
    from fewstep.teachers import Teacher

ROLES = ("teacher", "student")
DEFAULT_TOY_SAMPLES = 5000


@dataclass
class Candidate:
    """One way of drawing samples: a teacher solver at some NFE, or a distilled student."""

    name: str  # e.g. "teacher/heun-35" or "student/cd"
    role: str  # "teacher" | "student"
    sampler: str  # e.g. "heun", "consistency"
    nfe: int
    draw: Callable[[Tensor, Tensor | None, torch.Generator], Tensor]  # (noise, labels, generator) -> samples


def evaluate(dataset: DatasetSpec, candidates: list[Candidate], n_samples: int | None = None, seed: int = 0,
             exact_endpoint: Callable[[Tensor, Tensor | None], Tensor] | None = None, conditional: bool = False,
             progress: bool = True, *, model: str = "", endpoint_tolerance: float | None = None,
             device: str | torch.device = "cpu", timing_batch: int = 256, timing_repeats: int = 3,
             speedup_reference: str | None = None) -> dict:
    """Measure every candidate on the same seeded noise (and labels) and return a JSON-able report.

    Args:
        n_samples: samples per candidate; defaults to ``len(dataset.ref_x)`` for digits, 5000 otherwise.
        exact_endpoint: ``(noise, labels) -> x0``, the exact ODE endpoint (analytic teacher); adds each row's
            ``flow_map_error``, the mean distance between its samples and these endpoints.
        conditional: draw labels uniformly from the dataset's classes (seeded) and pass them to ``draw``.
        endpoint_tolerance: the integration error of ``exact_endpoint`` itself, as measured by the caller;
            reported as ``noise_floor["exact_endpoint_error"]``.
        device: where noise, labels and generators live; samples are measured on the CPU.
        timing_batch: batch size of the speed and memory measurement (at most ``n_samples``).
        speedup_reference: name of the teacher row that student ``speedup`` is measured against (e.g. the
            teacher's default sampler); by default the teacher row with the best quality. Student rows also
            carry ``speedup_vs_best``, against the best-quality teacher row, whichever the reference.
    """
    _check_candidates(candidates)
    is_digits = dataset.metric == "fd"
    n = n_samples if n_samples is not None else (len(dataset.ref_x) if is_digits else DEFAULT_TOY_SAMPLES)
    if n < 2:
        raise ConfigError(f"n_samples must be at least 2, got {n}")
    if conditional and dataset.num_classes < 1:
        raise DataError(f"dataset {dataset.name!r} has no classes, so it cannot be evaluated conditionally")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *dataset.data_shape), generator=generator)
    labels = torch.randint(0, dataset.num_classes, (n,), generator=generator) if conditional else None
    noise_on_device = noise.to(device)
    labels_on_device = labels.to(device) if labels is not None else None

    classifier = digits.feature_extractor(dataset) if is_digits else None
    exact = None
    if exact_endpoint is not None:
        with torch.no_grad():
            exact = exact_endpoint(noise_on_device, labels_on_device).detach().cpu()

    def sampler_generator() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed + 1)

    batch = min(timing_batch, n)
    timing_noise = noise_on_device[:batch]
    timing_labels = labels_on_device[:batch] if labels_on_device is not None else None
    results = []
    for candidate in tqdm(candidates, desc=f"evaluate {dataset.name}", disable=not progress):
        share_cpu()
        with torch.no_grad():
            samples = candidate.draw(noise_on_device, labels_on_device, sampler_generator())
        if not isinstance(samples, Tensor) or samples.shape != noise.shape:
            got = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
            raise DataError(f"candidate {candidate.name!r} returned {got}, expected samples of shape "
                            f"{tuple(noise.shape)}")
        samples = samples.detach().cpu()
        if is_digits:
            metrics = digits.digits_metrics(samples, dataset, labels=labels, classifier=classifier)
        else:
            metrics = toy.toy_metrics(samples, dataset, seed=seed)
        if exact is not None:
            metrics["flow_map_error"] = toy.flow_map_error(samples, exact)

        def draw_batch(candidate: Candidate = candidate) -> Tensor:
            return candidate.draw(timing_noise, timing_labels, sampler_generator())

        results.append({
            "name": candidate.name, "role": candidate.role, "sampler": candidate.sampler, "nfe": candidate.nfe,
            **metrics,
            "sec_per_sample": time_sampler(draw_batch, batch, warmup=1, repeats=timing_repeats),
            "peak_memory_bytes": peak_memory(draw_batch, device),
        })

    best = best_teacher(results, dataset.metric)
    teacher = best
    if speedup_reference is not None:
        named = [row for row in results if row["name"] == speedup_reference and row["role"] == "teacher"]
        if not named:
            raise ConfigError(f"speedup_reference {speedup_reference!r} is not a teacher candidate")
        teacher = named[0]
    for row in results:
        if row["role"] == "student":
            row["speedup"] = teacher["sec_per_sample"] / row["sec_per_sample"] if teacher is not None else None
            row["speedup_vs_best"] = best["sec_per_sample"] / row["sec_per_sample"] if best is not None else None

    if is_digits:
        floor_n = min(n, len(dataset.train_x))
        noise_floor = digits.noise_floor_digits(dataset, floor_n, seed=seed, classifier=classifier)
    else:
        floor_n = n
        noise_floor = toy.noise_floor_toy(dataset, n, seed=seed)
    noise_floor["n"] = floor_n
    if endpoint_tolerance is not None:
        noise_floor["exact_endpoint_error"] = float(endpoint_tolerance)
    reference = {"nll": toy.reference_nll(dataset)} if dataset.log_prob is not None else {}
    if reference:  # excess NLL: above the exact density's own held-out samples (0 is perfect)
        for row in [*results, noise_floor]:
            if "nll" in row:
                row["excess_nll"] = row["nll"] - reference["nll"]
    return {
        "dataset": dataset.name,
        "model": model,
        "quality_metric": dataset.metric,
        "n_samples": n,
        "seed": seed,
        "conditional": conditional,
        "speedup_reference": teacher["name"] if teacher is not None else None,
        "best_teacher": best["name"] if best is not None else None,
        "results": results,
        "noise_floor": noise_floor,
        "reference": reference,
    }


def evaluate_models(teacher: Teacher, students: list[Student], student_nfe: tuple[int, ...] = (1, 2, 4),
                    teacher_nfe: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
                    teacher_solvers: tuple[str, ...] = ("euler", "heun", "dpmpp_2m"),
                    n_samples: int | None = None, conditional: bool | None = None, seed: int = 0,
                    progress: bool = True, device: str | torch.device | None = None) -> dict:
    """One report: the teacher under each training-free solver and NFE (and its default sampler, Heun at
    :data:`~fewstep.solvers.DEFAULT_TEACHER_NFE`), then each student at each NFE, all from the same noise. For an
    analytic teacher it also reports each row's exact flow-map error.

    ``device`` is where the noise is drawn onto and timed (default: the teacher's); each model samples on
    its own device, so put the teacher and students where they should be timed."""
    dataset = teacher.dataset
    device = teacher.denoiser.device if device is None else torch.device(device)
    conditional = dataset.num_classes > 0 if conditional is None else conditional

    def teacher_row(solver: str, nfe: int) -> Candidate:
        return Candidate(f"teacher/{solver}@{nfe}", "teacher", solver, nfe,
                         lambda noise, label, gen: teacher.sample(0, solver, nfe, label=label, noise=noise))

    candidates = [teacher_row(solver, nfe) for solver in teacher_solvers for nfe in teacher_nfe]
    candidates.append(teacher_row("heun", DEFAULT_TEACHER_NFE))
    for student in students:
        candidates += [Candidate(f"{student.name}@{nfe}", "student", student.sampling[nfe].sampler, nfe,
                                 lambda noise, label, gen, student=student, nfe=nfe: student.sample(
                                     0, nfe, label=label, noise=noise, generator=gen))
                       for nfe in student_nfe if nfe in student.sampling]
    exact, tolerance = None, None
    if teacher.is_analytic:
        def exact(noise: Tensor, label: Tensor | None) -> Tensor:
            noise, label = noise.to(teacher.denoiser.device), None if label is None else label.to(noise.device)
            return ode_endpoint(lambda x, s: teacher.guided(x, s, label), noise.double(), steps=256).float()

        probe = torch.randn((256, *dataset.data_shape), dtype=torch.float64,
                            generator=torch.Generator().manual_seed(seed + 7)).to(teacher.denoiser.device)
        coarse = ode_endpoint(teacher.guided, probe, steps=256)
        fine = ode_endpoint(teacher.guided, probe, steps=512)
        tolerance = float((coarse - fine).flatten(1).norm(dim=1).mean())
    report = evaluate(dataset, candidates, n_samples=n_samples, seed=seed, exact_endpoint=exact,
                      conditional=conditional, progress=progress, model=teacher.name,
                      endpoint_tolerance=tolerance, speedup_reference=f"teacher/heun@{DEFAULT_TEACHER_NFE}",
                      device=device)
    for student in students:
        if student.train_result is not None:
            report.setdefault("training", {})[student.name] = {
                "seconds": student.train_result.seconds, "steps": student.train_result.steps_done,
                **student.train_result.evals()}
    return report


def best_teacher(results: list[dict], metric: str) -> dict | None:
    """The teacher row with the best ``metric`` (fewer NFE on a tie), or None without teacher rows."""
    return _best([row for row in results if row["role"] == "teacher"], metric)


def finest_teacher(results: list[dict], metric: str) -> dict | None:
    """The best teacher row at the largest NFE measured: the teacher's ODE as nearly solved as the report has
    it, which an ODE-following student aims at. None without teacher rows."""
    nfes = [row["nfe"] for row in results if row["role"] == "teacher"]
    return best_at_nfe(results, "teacher", max(nfes), metric) if nfes else None


def ratios_to_teacher(row: dict, results: list[dict], metric: str) -> str:
    """``" (1.86x the teacher's best, 1.21x its finest solve)"``: ``row``'s ``metric`` over the teacher's best
    reading and over its finest solve (the second only when the finest solve is not the best). Empty without
    teacher rows."""
    best, finest = best_teacher(results, metric), finest_teacher(results, metric)
    if best is None:
        return ""
    text = f" ({row[metric] / best[metric]:.2f}x the teacher's best"
    return text + (f", {row[metric] / finest[metric]:.2f}x its finest solve)" if finest is not best else ")")


def best_at_nfe(results: list[dict], role: str, nfe: int, metric: str) -> dict | None:
    """The best-``metric`` row of ``role`` at exactly ``nfe`` function evaluations, or None if there is none."""
    return _best([row for row in results if row["role"] == role and row["nfe"] == nfe], metric)


def format_table(report: dict) -> str:
    """A markdown table of the report: teachers first, then students, then the real-data noise floor."""
    rows = [row for role in ROLES for row in report["results"] if row["role"] == role]
    floor = report["noise_floor"]
    key = report["quality_metric"]
    # (header, key in a row or the floor, format); "x floor" columns divide by the floor's value.
    if key == "fd":
        columns = [("FD-digits", "fd", _number), ("x floor", "fd/floor", _ratio), ("precision", "precision", _frac),
                   ("recall", "recall", _frac), ("coverage", "coverage", _frac)]
        if any("class_accuracy" in row for row in rows):
            columns.append(("class acc", "class_accuracy", _frac))
    else:
        columns = [("excess nll", "excess_nll", _number)] if any("excess_nll" in row for row in rows) else []
        if any("modes_covered" in row for row in rows):
            columns += [("modes", "modes", str), ("in-mode", "in_mode_fraction", _frac),
                        ("spread", "spread_ratio", _ratio), ("balance TV", "mode_balance", _frac)]
        columns += [("swd", "swd", _number), ("swd x floor", "swd/floor", _ratio)]
        if any("flow_map_error" in row for row in rows):
            columns.append(("flow-map err", "flow_map_error", _number))
    columns += [("sec/sample", "sec_per_sample", _seconds), ("peak MiB", "peak_memory_bytes", _mebibytes),
                ("speedup", "speedup", _speedup)]

    def cell(row: dict, name: str, fmt: Callable) -> str:
        if name.endswith("/floor"):
            metric = name.removesuffix("/floor")
            value = row.get(metric)
            return fmt(value / floor[metric]) if value is not None and floor.get(metric) else "–"
        if name == "modes":
            return f"{row['modes_covered']}/{row['modes_total']}" if "modes_covered" in row else "–"
        value = row.get(name)
        return fmt(value) if value is not None else "–"

    header = ["name", "nfe"] + [title for title, _, _ in columns]
    lines = [f"{report['dataset']} · model {report['model'] or '–'} · {report['n_samples']} samples · "
             f"seed {report['seed']} · speedup vs {report.get('speedup_reference') or '–'}",
             "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join([row["name"], str(row["nfe"])]
                                       + [cell(row, name, fmt) for _, name, fmt in columns]) + " |")
    floor_cells = [cell(floor, name, fmt) if name not in ("sec_per_sample", "peak_memory_bytes", "speedup") else "–"
                   for _, name, fmt in columns]
    lines.append("| " + " | ".join([f"real data (noise floor, n={floor.get('n', '–')})", "–", *floor_cells]) + " |")
    if "nll" in report.get("reference", {}):
        lines.append(f"\nexcess nll = nll - {_number(report['reference']['nll'])} (the held-out data's NLL); "
                     "spread = within-mode spread / the data's; balance TV = 0 when modes are weighted as in the data")
    if "exact_endpoint_error" in floor:
        lines.append(f"\nexact endpoint integration error: {_number(floor['exact_endpoint_error'])}")
    return "\n".join(lines)


def write_json(report: dict, path: str | Path) -> None:
    """Write the report as indented JSON, atomically (a temporary file moved into place)."""
    def dump(tmp: str) -> None:
        with open(tmp, "w") as file:
            json.dump(report, file, indent=2)
            file.write("\n")

    atomic_write(path, dump)


def _best(rows: list[dict], metric: str) -> dict | None:
    if not rows:
        return None

    def rank(row: dict) -> tuple[float, int]:
        value = row.get(metric)
        return (value if value is not None and math.isfinite(value) else math.inf, row["nfe"])

    return min(rows, key=rank)


def _check_candidates(candidates: list[Candidate]) -> None:
    if not candidates:
        raise ConfigError("evaluate needs at least one candidate")
    names = [candidate.name for candidate in candidates]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"candidate names must be unique, repeated: {duplicates}")
    for candidate in candidates:
        if candidate.role not in ROLES:
            raise ConfigError(f"candidate {candidate.name!r} has role {candidate.role!r}; use one of {ROLES}")
        if not isinstance(candidate.nfe, int) or candidate.nfe < 1:
            raise ConfigError(f"candidate {candidate.name!r} needs a positive integer nfe, got {candidate.nfe!r}")


def _number(value: float) -> str:
    return f"{value:.4g}"


def _ratio(value: float) -> str:
    return f"{value:.3g}"


def _frac(value: float) -> str:
    return f"{value:.3f}"


def _seconds(value: float) -> str:
    return f"{value:.2e}"


def _mebibytes(value: int) -> str:
    return f"{value / 2**20:.1f}"


def _speedup(value: float) -> str:
    return f"{value:.1f}x"
