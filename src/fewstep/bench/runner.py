"""The benchmark runner: every method on the same teachers with the same budget, one leaderboard.

For each suite: resolve its teacher and measure the teacher's training-free solvers once (the NFE sweep);
then, for each method that applies, measure the teacher evaluations it makes per training sample, convert
the suite's budget into its training steps, distil, and evaluate the student at the suite's NFEs on the same
noise (and labels) as the sweep.

Every finished cell (suite x method) and every sweep is saved under ``out/cells/<suite>/`` together with the
settings it ran with, and a later run with the same settings reuses it; a failed cell is recorded (status
``failed`` and a one-line error) and retried by the next run. All derived numbers (noise-floor and teacher
ratios, speedups) are recomputed from the saved cells each run, so ``out/`` is never edited by hand::

    out/BENCHMARKS.md, out/benchmarks.json (or json_path)
    out/<suite>_quality_vs_nfe.png, out/<suite>_samples.png, out/quality_vs_train_time.png
    out/cells/<suite>/teacher_sweep.json, teacher_samples.safetensors, <method>.json, <method>.safetensors
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from fewstep.api import (
    BEST_TEACHER_NFE,
    Student,
    Teacher,
    build_method,
    evaluate_models,
    pair_source_args,
)
from fewstep.bench.suites import (
    SCHEDULE_RULES,
    TEACHER_FREE_EVALS_PER_SAMPLE,
    Suite,
    method_args,
    steps_for_budget,
    student_backbone_args,
)
from fewstep.cache import atomic_write
from fewstep.data import load_dataset
from fewstep.data.sources import make_source
from fewstep.data.spec import DatasetSpec
from fewstep.errors import ConfigError
from fewstep.eval.evaluate import write_json
from fewstep.eval.plots import compare_grids, quality_vs_nfe, scatter_2d
from fewstep.methods import METHODS
from fewstep.methods.base import Batch, DistillationMethod
from fewstep.models.io import one_line
from fewstep.run import machine
from fewstep.train.trainer import TrainConfig, train

CELL_FORMAT = 1  # bump when a cell's contents change meaning, so old cells are recomputed
QUALITY_METRICS = ("fd", "swd")
SCATTER_POINTS = 2000
DIGIT_GRID = 40  # four rows of the ten classes
NFE_MARKERS = {1: "o", 2: "s", 4: "^", 8: "D"}
METHOD_COLOURS = colormaps["tab20"]


def select_methods(names: list[str] | None) -> dict[str, type[DistillationMethod]]:
    """The registered methods called ``names`` (all of them for None), in the given order."""
    if names is None:
        return dict(METHODS)
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown method {unknown[0]!r}; available: {', '.join(sorted(METHODS))}")
    return {name: METHODS[name] for name in dict.fromkeys(names)}


def run_bench(suites: list[Suite], out: str | Path, methods: dict[str, type[DistillationMethod]] | None = None,
              *, name: str = "custom", json_path: str | Path | None = None, seed: int = 0, progress: bool = True,
              command: str = "") -> dict:
    """Run (or resume) every method of ``methods`` (default: the registry) on every suite; write ``out/`` and
    return the JSON report ``{"suite", "cells", "teachers", "suites", "machine", "wall_seconds", ...}``."""
    started = time.perf_counter()
    methods = dict(METHODS) if methods is None else methods
    _check_suites(suites, methods)
    out = Path(out)
    measured = []
    bar = tqdm(total=len(suites) * (1 + len(methods)), desc="bench", unit="cell", disable=not progress)
    try:
        for suite in suites:
            teacher = functools.cache(lambda suite=suite: resolve_teacher(suite, progress))
            bar.set_postfix_str(f"{suite.name}: teacher")
            sweep = teacher_sweep(suite, teacher, out / "cells" / suite.name, seed)
            bar.update()
            cells = []
            for method_name, method_cls in methods.items():
                bar.set_postfix_str(f"{suite.name}: {method_name}")
                cell = run_cell(suite, method_name, method_cls, teacher, out / "cells" / suite.name, seed, progress)
                if cell["status"] == "failed":
                    bar.write(f"{suite.name}/{method_name} failed: {cell['error']}")
                cells.append(cell)
                bar.update()
            measured.append((suite, sweep, cells))
    finally:
        bar.close()

    report = {
        "suite": name, "command": command, "seed": seed,
        "cells": [row for suite, sweep, cells in measured for cell in cells for row in cell_rows(suite, sweep, cell)],
        "teachers": {suite.name: teacher_rows(suite, sweep) for suite, sweep, _ in measured},
        "suites": {suite.name: {**asdict(suite), "teacher_name": sweep["teacher"], "teacher_seconds":
                                sweep["teacher_seconds"]} for suite, sweep, _ in measured},
        "machine": {**machine(), "cpus": os.cpu_count()},
        "compute_seconds": sum(sweep["seconds"] + sum(cell["seconds"] for cell in cells)
                               for _, sweep, cells in measured),
    }
    write_plots(measured, report, out)
    report["wall_seconds"] = time.perf_counter() - started
    write_json(report, json_path if json_path is not None else out / "benchmarks.json")
    atomic_write(out / "BENCHMARKS.md", lambda tmp: Path(tmp).write_text(benchmarks_markdown(report, measured)))
    return report


def _check_suites(suites: list[Suite], methods: dict) -> None:
    if not suites:
        raise ConfigError("the benchmark needs at least one suite")
    if not methods:
        raise ConfigError("the benchmark needs at least one method")
    names = [suite.name for suite in suites]
    if len(set(names)) != len(names):
        raise ConfigError(f"suite names must be unique, got {names}")
    for suite in suites:
        if suite.teacher not in ("analytic", "train"):
            raise ConfigError(f"suite {suite.name}: teacher must be 'analytic' or 'train', got {suite.teacher!r}")
        if suite.quality not in QUALITY_METRICS:
            raise ConfigError(f"suite {suite.name}: quality must be one of {QUALITY_METRICS}, got {suite.quality!r}")
        if suite.teacher_eval_budget < 1:
            raise ConfigError(f"suite {suite.name}: teacher_eval_budget must be positive")
        try:
            teacher_recipe(suite)
        except TypeError as error:
            raise ConfigError(f"suite {suite.name}: teacher_args do not fit Teacher.cached: {error}") from None


def teacher_recipe(suite: Suite) -> dict:
    """What identifies the suite's teacher. For a trained one, ``Teacher.cached``'s arguments with its
    defaults filled in, so that a change of fewstep's default teacher recipe makes the saved cells stale
    (not ``progress``, nor ``device``: the bench trains on the CPU)."""
    if suite.teacher == "analytic":
        return {"analytic": suite.dataset}
    bound = inspect.signature(Teacher.cached).bind(suite.dataset, **suite.teacher_args)
    bound.apply_defaults()
    return _jsonable({k: v for k, v in bound.arguments.items() if k not in ("progress", "device")})


def resolve_teacher(suite: Suite, progress: bool = True) -> Teacher:
    """The suite's teacher with its guidance: the exact mixture, or the cached trained teacher."""
    if suite.teacher == "analytic":
        teacher = Teacher.analytic(suite.dataset)
    else:
        teacher = Teacher.cached(suite.dataset, progress=progress, **suite.teacher_args)
    return teacher.with_guidance(suite.guidance_scale, suite.guidance_convention)


# --- measuring: teacher sweeps and cells, each saved once -------------------------------------------------


def _sweep_key(suite: Suite, seed: int) -> dict:
    fields = ("dataset", "conditional", "guidance_scale", "guidance_convention", "teacher_nfe", "n_samples")
    return {"format": CELL_FORMAT, "seed": seed, "teacher": teacher_recipe(suite),
            **{k: _jsonable(getattr(suite, k)) for k in fields}}


def _cell_key(suite: Suite, method: str, seed: int) -> dict:
    fields = ("teacher_eval_budget", "max_seconds", "nfe", "batch_size", "lr")
    return {**_sweep_key(suite, seed), "method": method, "method_args": suite.method_args.get(method, {}),
            **SCHEDULE_RULES.get(method, {}), **{k: _jsonable(getattr(suite, k)) for k in fields},
            "student_backbone_args": _jsonable(student_backbone_args(suite, method))}


def _jsonable(value):
    return json.loads(json.dumps(value))


def _load_saved(path: Path, key: dict) -> dict | None:
    """The saved measurement at ``path`` if it was made with ``key`` and did not fail, else None."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return saved if saved.get("key") == key and saved.get("status") != "failed" else None


def _figure_inputs(dataset: DatasetSpec, conditional: bool, seed: int) -> tuple[int, Tensor | None]:
    """How many samples the figures show, and their labels (cycling through the classes when conditional)."""
    n = DIGIT_GRID if len(dataset.data_shape) > 1 else SCATTER_POINTS
    return n, (torch.arange(n) % dataset.num_classes if conditional else None)


def _save_samples(path: Path, samples: dict[str, Tensor]) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.detach().float().contiguous() for k, v in samples.items()}, tmp))


def teacher_sweep(suite: Suite, teacher: Callable[[], Teacher], folder: Path, seed: int) -> dict:
    """The teacher's training-free solvers at the suite's NFEs (and Heun at 35), saved in ``folder``."""
    path = folder / "teacher_sweep.json"
    key = _sweep_key(suite, seed)
    saved = _load_saved(path, key)
    if saved is not None:
        return saved
    started = time.perf_counter()
    model = teacher()
    teacher_seconds = time.perf_counter() - started
    report = evaluate_models(model, [], teacher_nfe=tuple(suite.teacher_nfe), n_samples=suite.n_samples,
                             conditional=suite.conditional, seed=seed, progress=False)
    n, label = _figure_inputs(model.dataset, suite.conditional, seed)
    _save_samples(folder / "teacher_samples.safetensors", {"heun35": model.sample(n, label=label, seed=seed)})
    name = model.name if model.is_analytic else f"cached:{Path(model.name).name}"  # not the local cache path
    sweep = {"key": key, "status": "ok", "teacher": name, "teacher_seconds": teacher_seconds,
             "seconds": time.perf_counter() - started, "report": report}
    write_json(sweep, path)
    return sweep


def teacher_evals_per_sample(distiller: DistillationMethod, dataset: DatasetSpec, probe: int = 4,
                             step: int = 0) -> float:
    """Teacher evaluations per training sample in trainer step ``step`` (one cycle over the method's phases),
    counted by running the method's losses on a batch of ``probe`` samples, which should be the training
    batch size: a method may spend per step rather than per sample (TBCM's rollouts). The method must count
    ``teacher_evals``."""
    if not hasattr(distiller, "teacher_evals"):
        raise ConfigError(f"method {distiller.name!r} does not count its teacher evaluations (a teacher_evals "
                          "attribute), so it cannot be given the same budget as the others")
    generator = torch.Generator().manual_seed(0)
    rows = torch.arange(probe) % dataset.train_x.shape[0]
    x0 = dataset.train_x[rows]
    batch = Batch(x0=x0, label=dataset.train_y[rows] if dataset.train_y is not None else None,
                  noise=torch.randn(x0.shape, generator=generator), endpoint=x0)
    before = distiller.teacher_evals
    for phase in distiller.phases():
        for _ in range(phase.updates):
            distiller.losses(phase.name, batch, step, generator)
    return (distiller.teacher_evals - before) / probe


def _skip_reason(suite: Suite, method_cls: type[DistillationMethod]) -> str | None:
    if method_cls.needs == "labels" and not suite.conditional:
        return f"needs class labels; {suite.name} is unconditional"
    return None


def run_cell(suite: Suite, method_name: str, method_cls: type[DistillationMethod], teacher: Callable[[], Teacher],
             folder: Path, seed: int, progress: bool = True) -> dict:
    """Distil and evaluate one method on one suite (or reuse the saved cell); never raises for a method's
    failure, which is recorded as status ``failed`` with a one-line error."""
    path = folder / f"{method_name}.json"
    key = _cell_key(suite, method_name, seed)
    saved = _load_saved(path, key)
    if saved is not None:
        return saved
    cell = {"key": key, "suite": suite.name, "method": method_name, "family": method_cls.family,
            "status": "ok", "error": None, "budget": suite.teacher_eval_budget, "rows": []}
    started = time.perf_counter()
    reason = _skip_reason(suite, method_cls)
    if reason is not None:
        cell.update(status="skipped", error=reason)
    else:
        try:
            cell.update(_distill_and_evaluate(suite, method_name, method_cls, teacher(), folder, seed, progress))
        except Exception as error:  # a method's failure is a result of the benchmark, not the end of it
            cell.update(status="failed", error=f"{type(error).__name__}: {one_line(error)}")
    cell["seconds"] = time.perf_counter() - started
    write_json(cell, path)
    return cell


def _distill_and_evaluate(suite: Suite, method_name: str, method_cls: type[DistillationMethod], teacher: Teacher,
                          folder: Path, seed: int, progress: bool) -> dict:
    dataset = teacher.dataset
    base_args = method_args(suite, method_name, 1)
    backbone_args = student_backbone_args(suite, method_name)
    probe = build_method(teacher, method_cls, base_args, backbone_args)
    per_sample = teacher_evals_per_sample(probe, dataset, suite.batch_size)
    steps = steps_for_budget(suite.teacher_eval_budget, per_sample or TEACHER_FREE_EVALS_PER_SAMPLE,
                             suite.batch_size)
    args = method_args(suite, method_name, steps)
    # a method may spend more after a warm-up (rCM's DMD term): budget at the dearer of the first and last step
    late_probe = build_method(teacher, method_cls, args, backbone_args, steps=steps)
    late = teacher_evals_per_sample(late_probe, dataset, suite.batch_size, step=steps - 1)
    if late > per_sample:
        per_sample = late
        steps = steps_for_budget(suite.teacher_eval_budget, per_sample, suite.batch_size)
        args = method_args(suite, method_name, steps)
    with torch.random.fork_rng(devices=[]):  # a new student's initial weights come from the seed alone
        torch.manual_seed(seed)
        distiller = build_method(teacher, method_cls, args, backbone_args, steps=steps)
    source = make_source(distiller.needs, dataset, **pair_source_args(distiller, teacher, None))
    config = TrainConfig(steps=steps, batch_size=suite.batch_size, lr=suite.lr, seed=seed,
                         max_seconds=suite.max_seconds)
    result = train(distiller, source, config, progress=progress)
    sampling = {nfe: distiller.sampling(nfe) for nfe in suite.nfe}
    student = Student(result.ema_student, method_name, sampling, dataset, train_result=result)
    report = evaluate_models(teacher, [student], tuple(suite.nfe), teacher_nfe=(), teacher_solvers=(),
                             n_samples=suite.n_samples, conditional=suite.conditional, seed=seed, progress=False)
    n, label = _figure_inputs(dataset, suite.conditional, seed)
    _save_samples(folder / f"{method_name}.safetensors",
                  {f"nfe{nfe}": student.sample(n, nfe, label=label, seed=seed) for nfe in suite.nfe})
    return {"status": "capped" if result.stopped_early else "ok", "method_args": asdict(distiller.config),
            "teacher_evals_per_sample": per_sample, "steps": steps, "steps_done": result.steps_done,
            "train_seconds": result.seconds, "teacher_evals": result.teacher_evals,
            "rows": [row for row in report["results"] if row["role"] == "student"]}


# --- deriving: ratios and the JSON rows -------------------------------------------------------------------


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or not math.isfinite(value) or reference == 0:
        return None
    return value / reference


def best_teacher_row(suite: Suite, sweep: dict) -> dict | None:
    """The sweep's best row by the suite's quality metric (fewer NFE on a tie)."""
    rows = [row for row in sweep["report"]["results"] if math.isfinite(row.get(suite.quality, math.inf))]
    return min(rows, key=lambda row: (row[suite.quality], row["nfe"])) if rows else None


def default_teacher_row(sweep: dict) -> dict | None:
    """The sweep's row of the teacher's default sampler (Heun at 35 NFE), the reference of ``speedup``."""
    name = f"teacher/heun@{BEST_TEACHER_NFE}"
    return next((row for row in sweep["report"]["results"] if row["name"] == name), None)


def _derived(suite: Suite, sweep: dict, row: dict) -> dict:
    """Quality, its ratios to the noise floor and to the teacher's best, the excess NLL and the speedups
    against the teacher's default sampler and against its best-quality row."""
    report, best, default = sweep["report"], best_teacher_row(suite, sweep), default_teacher_row(sweep)
    quality = row.get(suite.quality)
    floor = report["noise_floor"].get(suite.quality)
    nll, reference_nll = row.get("nll"), report["reference"].get("nll")
    return {"quality_metric": suite.quality, "quality": quality, "noise_floor": floor,
            "floor_ratio": _ratio(quality, floor), "teacher_ratio": _ratio(quality, best and best[suite.quality]),
            "excess_nll": nll - reference_nll if nll is not None and reference_nll is not None else None,
            "speedup": _ratio(default and default["sec_per_sample"], row.get("sec_per_sample")),
            "speedup_vs_best": _ratio(best and best["sec_per_sample"], row.get("sec_per_sample"))}


def cell_rows(suite: Suite, sweep: dict, cell: dict) -> list[dict]:
    """One JSON row per NFE of a cell (rows without metrics when the cell failed or was skipped)."""
    common = {"suite": suite.name, "method": cell["method"], "family": cell["family"], "status": cell["status"],
              "error": cell["error"], "train_seconds": cell.get("train_seconds"),
              "train_steps": cell.get("steps_done"), "teacher_evals": cell.get("teacher_evals"),
              "teacher_eval_budget": cell["budget"]}
    measured = [_measured(row) for row in cell["rows"]]
    if not measured:  # the same keys as a measured row, without values
        measured = [{**dict.fromkeys(_measured(sweep["report"]["results"][0])), "nfe": nfe} for nfe in suite.nfe]
    return [{**common, **row, **_derived(suite, sweep, row)} for row in measured]


def _measured(row: dict) -> dict:
    """An evaluation row without its name, role and what the bench derives itself."""
    return {k: v for k, v in row.items() if k not in ("name", "role", "speedup", "speedup_vs_best", "excess_nll")}


def teacher_rows(suite: Suite, sweep: dict) -> list[dict]:
    """The sweep's rows with the same derived columns as the cells."""
    return [{"name": row["name"], **_measured(row), **_derived(suite, sweep, row)}
            for row in sweep["report"]["results"]]


# --- writing: plots and BENCHMARKS.md ---------------------------------------------------------------------


def write_plots(measured: list[tuple[Suite, dict, list[dict]]], report: dict, out: Path) -> None:
    """Per suite: quality vs NFE and the sample figure; over all suites: quality vs training time."""
    for suite, sweep, cells in measured:
        rows = [row for row in report["cells"] if row["suite"] == suite.name and row["quality"] is not None]
        results = sweep["report"]["results"] + [
            {"name": f"{row['method']}@{row['nfe']}", "role": "student", "sampler": row["sampler"],
             "nfe": row["nfe"], suite.quality: row["quality"]} for row in rows]
        quality_vs_nfe({"dataset": suite.name, "model": sweep["teacher"], "results": results},
                       out / f"{suite.name}_quality_vs_nfe.png", metric=suite.quality,
                       floor=sweep["report"]["noise_floor"].get(suite.quality))
        _sample_figure(suite, cells, out)
    quality_vs_train_time(measured, report, out / "quality_vs_train_time.png")


def _sample_figure(suite: Suite, cells: list[dict], out: Path) -> None:
    folder = out / "cells" / suite.name
    teacher_file = folder / "teacher_samples.safetensors"
    if not teacher_file.is_file():
        return
    # one row per method, one column per NFE; the teacher alone on the first row
    columns = len(suite.nfe)
    panels: dict[str, Tensor | None] = {"teacher heun@35": load_file(teacher_file)["heun35"]}
    panels |= {f"blank {i}": None for i in range(1, columns)}
    for cell in cells:
        path = folder / f"{cell['method']}.safetensors"
        if cell["rows"] and path.is_file():
            samples = load_file(path)
            panels |= {f"{cell['method']} @{nfe}": samples.get(f"nfe{nfe}") for nfe in suite.nfe}
    dataset = load_dataset(suite.dataset)
    if len(dataset.data_shape) > 1:
        compare_grids(panels, out / f"{suite.name}_samples.png", nrow=dataset.num_classes or 8, columns=columns)
    else:
        scatter_2d(panels, out / f"{suite.name}_samples.png", reference=dataset.ref_x[:SCATTER_POINTS],
                   columns=columns)


def quality_vs_train_time(measured: list[tuple[Suite, dict, list[dict]]], report: dict, path: Path) -> None:
    """One panel per suite: each method's quality (colour) at each NFE (marker) against its training seconds,
    with the teacher's best quality (dashed) and the noise floor (dotted); one shared legend below."""
    methods = list(dict.fromkeys(cell["method"] for _, _, cells in measured for cell in cells))
    colours = {name: METHOD_COLOURS(i % METHOD_COLOURS.N) for i, name in enumerate(methods)}
    fig = Figure(figsize=(3.6 * len(measured), 3.6 + 0.25 * math.ceil(len(methods) / 8)), dpi=100,
                 layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (suite, sweep, _) in zip(fig.subplots(1, len(measured), squeeze=False)[0], measured, strict=True):
        for row in report["cells"]:
            if row["suite"] == suite.name and row["quality"] is not None:
                ax.scatter(row["train_seconds"], row["quality"], color=colours[row["method"]],
                           marker=NFE_MARKERS.get(row["nfe"], "x"))
        best = best_teacher_row(suite, sweep)
        if best is not None:
            ax.axhline(best[suite.quality], ls="--", color="0.3")
        floor = sweep["report"]["noise_floor"].get(suite.quality)
        if floor is not None:
            ax.axhline(floor, ls=":", color="0.5")
        ax.set_yscale("log")
        ax.set_xlabel("training seconds")
        ax.set_ylabel("FD-digits" if suite.quality == "fd" else suite.quality)
        ax.set_title(suite.name, fontsize=9)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], ls="", marker="o", color=colour, label=name) for name, colour in colours.items()]
    handles += [Line2D([], [], ls="", marker=marker, color="0.3", label=f"{nfe} NFE")
                for nfe, marker in NFE_MARKERS.items() if any(row["nfe"] == nfe for row in report["cells"])]
    handles += [Line2D([], [], ls="--", color="0.3", label="teacher best"),
                Line2D([], [], ls=":", color="0.5", label="noise floor")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 12), fontsize=7)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=fig.dpi))


def benchmarks_markdown(report: dict, measured: list[tuple[Suite, dict, list[dict]]]) -> str:
    """``BENCHMARKS.md``: what was run, one table per suite, the machine."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    teacher_seconds = sum(sweep["teacher_seconds"] for _, sweep, _ in measured)
    lines = [
        "# fewstep benchmarks", "",
        f"Written by `{report['command'] or 'fewstep bench'}` (suite `{report['suite']}`, seed {report['seed']}) "
        f"on {when}. Do not edit: rerun the command, which reuses every finished cell in `cells/`.", "",
        f"Wall time of this run: {report['wall_seconds']:.0f} s. Compute time of all cells and teacher sweeps, "
        f"including earlier resumed runs: {report['compute_seconds']:.0f} s (of which resolving the teachers, "
        f"training or loading them: {teacher_seconds:.0f} s).", "",
        "How to read the tables:", "",
        "- Every method of a suite gets the same budget of *teacher evaluations* (one denoiser call on one "
        "sample; a guided call counts once), converted to its training steps from the teacher evaluations it "
        "makes per training sample and step (measured). `teacher evals` is what the run used: less than the "
        "budget when the wall-time cap stopped it (status `capped`).",
        "- Quality: lower is better (`swd`: sliced Wasserstein distance to held-out data; `fd`: FD-digits). "
        "`x noise floor`: quality over the same metric between two real sample sets of the same size (1 is as "
        "good as measurable). `vs teacher`: quality over the teacher's best quality at any solver and NFE. "
        f"`speedup`: seconds per sample of the teacher's default sampler (Heun, {BEST_TEACHER_NFE} NFE) over "
        "this row's (the JSON also has `speedup_vs_best`, against the teacher's best-quality row).",
        "- Teacher rows: the best training-free solver (euler, heun, dpmpp_2m) at each NFE, on the same noise "
        "and labels as the students.",
        "- 2-D extras, where they tell rows apart: `excess NLL` is the samples' NLL under the true density minus "
        "that of held-out data (negative when samples crowd the modes' centres, so it cannot rank), `off "
        "support` the share of samples where the density is zero, `modes` covered, `spread` the in-mode spread "
        "over real data's (1 is right).",
        "- PD is trained down to 4 steps (from 32 in `quick`, 64 in `full`, the steps split evenly over the "
        "halving rounds); its 1- and 2-NFE rows use that 4-step student on coarser grids, untrained for them. "
        "CD uses its default settings.",
        "- sCT, sCD and rCM warm their tangent up over the first 10% of the cell's steps (the recipes' share), "
        "and rCM's DMD term starts after that, so every cell trains with the full tangent and rCM with its "
        "regulariser. On digits sCD is sensitive to the learning rate: the tables' shared 2e-4 is twice its "
        "recipe's 1e-4, and at 2e-4 its 2- and 4-NFE samples degrade (see `configs/digits-scd.yaml`).",
        "- Timings come from a shared CPU and are noisy.", ""]
    for suite, sweep, cells in measured:
        lines += _suite_section(suite, sweep, cells, report)
    lines += ["## Machine", "", *[f"- {k}: {v}" for k, v in report["machine"].items()], ""]
    return "\n".join(lines)


def _suite_section(suite: Suite, sweep: dict, cells: list[dict], report: dict) -> list[str]:
    metric = suite.quality
    floor = sweep["report"]["noise_floor"].get(metric)
    best = best_teacher_row(suite, sweep)
    steps = ", ".join(f"{cell['method']} {cell['steps']:,} steps" for cell in cells if cell.get("steps"))
    cond = (f"class-conditional, guidance {suite.guidance_scale:g} ({suite.guidance_convention})"
            if suite.conditional else "unconditional")
    lines = [f"## {suite.name}", "",
             f"Dataset `{suite.dataset}`, teacher `{sweep['teacher']}`, {cond}; {sweep['report']['n_samples']} "
             f"samples, seed {report['seed']}. Budget {suite.teacher_eval_budget:,} teacher evaluations per "
             f"method ({steps or 'no method trained'}), batch {suite.batch_size}, lr {suite.lr:g}, wall-time cap "
             f"{suite.max_seconds:.0f} s per method.", ""]
    if floor is not None and best is not None:
        lines += [f"Quality `{metric}`; noise floor {floor:.4g}; teacher's best {best['name']} at "
                  f"{best[metric]:.4g}.", ""]
    rows = [row for row in report["cells"] if row["suite"] == suite.name]
    teachers = report["teachers"][suite.name]
    extras = _extra_columns(suite, teachers + rows)
    header = ["model", "nfe", metric, "x noise floor", "vs teacher", *[title for title, _ in extras], "train s",
              "teacher evals", "speedup", "status"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for nfe in sorted({row["nfe"] for row in teachers}):
        row = min((r for r in teachers if r["nfe"] == nfe), key=lambda r: (_finite(r["quality"]), r["name"]))
        lines.append(_table_row(f"teacher · {row['sampler']}", row, extras, "–", "–", ""))
    families: dict[str, list[dict]] = {}
    for cell in cells:
        families.setdefault(cell["family"], []).append(cell)
    for family, members in families.items():
        lines.append("| " + " | ".join([f"**{family}**"] + [""] * (len(header) - 1)) + " |")
        for cell in members:
            if not cell["rows"]:  # failed or skipped: one row saying why
                status = f"{cell['status']}: {cell['error']}".replace("|", "/")
                lines.append("| " + " | ".join([cell["method"]] + ["–"] * (len(header) - 2) + [status]) + " |")
                continue
            for row in (r for r in rows if r["method"] == cell["method"]):
                evals = f"{row['teacher_evals']:,}" if row["teacher_evals"] is not None else "–"
                train_s = f"{row['train_seconds']:.1f}" if row["train_seconds"] is not None else "–"
                lines.append(_table_row(row["method"], row, extras, train_s, evals, row["status"]))
    lines += ["", f"![{suite.name}: quality vs NFE]({suite.name}_quality_vs_nfe.png)",
              f"![{suite.name}: samples]({suite.name}_samples.png)", ""]
    return lines


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else math.inf


def _extra_columns(suite: Suite, rows: list[dict]) -> list[tuple[str, Callable[[dict], str]]]:
    """Suite-specific diagnostic columns, each shown where it tells rows apart (e.g. not the excess NLL on
    the checkerboard, whose density is flat on its support)."""
    if suite.quality == "fd":
        columns = [("precision", "precision", _fmt("precision", "{:.3f}")),
                   ("recall", "recall", _fmt("recall", "{:.3f}")),
                   ("class acc", "class_accuracy", _fmt("class_accuracy", "{:.3f}"))]
    else:
        columns = [("excess NLL", "excess_nll", _fmt("excess_nll", "{:.3g}")),
                   ("off support", "off_support", _fmt("off_support", "{:.3f}")),
                   ("modes", "modes_covered", lambda r: f"{r['modes_covered']}/{r['modes_total']}"
                    if r.get("modes_covered") is not None else "–"),
                   ("spread", "spread_ratio", _fmt("spread_ratio", "{:.2f}"))]
    return [(title, show) for title, key, show in columns if _varies([row.get(key) for row in rows])]


def _varies(values: list) -> bool:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return bool(finite) and max(finite) - min(finite) > 1e-9 * max(1.0, abs(max(finite)))


def _fmt(key: str, spec: str) -> Callable[[dict], str]:
    def cell(row: dict) -> str:
        value = row.get(key)
        return spec.format(value) if value is not None and math.isfinite(value) else "–"
    return cell


def _table_row(label: str, row: dict, extras: list, train_s: str, evals: str, status: str) -> str:
    cells = [label, str(row["nfe"]), _fmt("quality", "{:.4g}")(row), _fmt("floor_ratio", "{:.3g}")(row),
             _fmt("teacher_ratio", "{:.3g}")(row), *[show(row) for _, show in extras], train_s, evals,
             _fmt("speedup", "{:.1f}x")(row), status]
    return "| " + " | ".join(cells) + " |"
