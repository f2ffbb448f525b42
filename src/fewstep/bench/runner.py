"""The benchmark runner: every method on the same teachers with the same budget, one leaderboard.

For each suite: resolve its teacher and measure the teacher's training-free solvers once (the NFE sweep);
then, for each method that applies, take its arguments from its recipe, convert the suite's budget into its
training steps (:func:`fewstep.pipeline.steps_for_budget`), distil (:func:`fewstep.pipeline.distill`), and
evaluate the student at the suite's NFEs on the same noise (and labels) as the sweep.

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

from fewstep.bench.suites import TEACHER_FREE_EVALS_PER_SAMPLE, Suite
from fewstep.cache import atomic_write
from fewstep.config import TeacherRecipe, build_dataclass, load_recipe
from fewstep.data import load_dataset
from fewstep.data.spec import DatasetSpec
from fewstep.errors import ConfigError
from fewstep.eval.evaluate import evaluate_models, write_json
from fewstep.eval.plots import compare_grids, quality_vs_nfe, scatter_2d
from fewstep.methods import METHODS
from fewstep.methods.base import DistillationMethod
from fewstep.models.io import one_line
from fewstep.outputs import mark
from fewstep.pipeline import distill, steps_for_budget
from fewstep.run import machine, resolve_teacher
from fewstep.solvers import DEFAULT_TEACHER_NFE
from fewstep.teachers import Teacher
from fewstep.train.trainer import TrainConfig

CELL_FORMAT = 2  # bump when a cell's contents change meaning, so old cells are recomputed
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
    mark(out, "bench")  # before the first cell, so an interrupted bench resumes into the same folder
    measured = []
    bar = tqdm(total=len(suites) * (1 + len(methods)), desc="bench", unit="cell", disable=not progress)
    try:
        for suite in suites:
            teacher = functools.cache(lambda suite=suite: suite_teacher(suite, progress))
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
    mark(out, "bench")
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
        if suite.teacher_eval_budget < 1:
            raise ConfigError(f"suite {suite.name}: teacher_eval_budget must be positive")
        teacher_spec(suite)
        for name, method_cls in methods.items():
            cell_args(suite, name, method_cls)  # every recipe a suite reads is valid before anything runs


@functools.cache
def _dataset(name: str) -> DatasetSpec:
    return load_dataset(name)


def quality(suite: Suite) -> str:
    """The metric that ranks a suite's rows: its dataset's (lower is better)."""
    return _dataset(suite.dataset).metric


def teacher_spec(suite: Suite) -> TeacherRecipe:
    """The suite's teacher as a recipe's ``teacher`` section."""
    return build_dataclass(TeacherRecipe, {"source": suite.teacher, **suite.teacher_args,
                                           "guidance_scale": suite.guidance_scale,
                                           "guidance_convention": suite.guidance_convention},
                           f"suite {suite.name}: teacher")


def suite_teacher(suite: Suite, progress: bool = True) -> Teacher:
    """The suite's teacher with its guidance: the exact mixture, or the cached trained teacher (seed 0, CPU)."""
    return resolve_teacher(teacher_spec(suite), suite.dataset, progress=progress)


def cell_args(suite: Suite, method: str, method_cls: type[DistillationMethod]) -> tuple[dict, dict]:
    """``(method_args, student_backbone_args)`` of ``method`` (a ``method_cls``) in ``suite``: its recipe's (see
    :mod:`fewstep.bench.suites`), without the fields its schedule fits to the cell's steps."""
    path = suite.recipe_path(method)
    if not path.is_file():
        return {}, dict(suite.student_backbone_args)
    recipe = load_recipe(path)
    if recipe.method != method or recipe.dataset != suite.dataset:
        raise ConfigError(f"suite {suite.name}: recipe {path} is for {recipe.method} on {recipe.dataset}, not "
                          f"{method} on {suite.dataset}")
    scheduled = method_cls.run_schedule(1, recipe.method_args)
    args = {key: value for key, value in recipe.method_args.items() if key not in scheduled}
    return args, {**suite.student_backbone_args, **recipe.student_backbone_args}


# --- measuring: teacher sweeps and cells, each saved once -------------------------------------------------


def _sweep_key(suite: Suite, seed: int) -> dict:
    fields = ("dataset", "conditional", "teacher_nfe", "n_samples")
    return {"format": CELL_FORMAT, "seed": seed, "teacher": _jsonable(asdict(teacher_spec(suite))),
            **{k: _jsonable(getattr(suite, k)) for k in fields}}


def _cell_key(suite: Suite, method: str, method_cls: type[DistillationMethod], seed: int) -> dict:
    fields = ("teacher_eval_budget", "max_seconds", "nfe", "batch_size", "lr")
    method_args, backbone_args = cell_args(suite, method, method_cls)
    return {**_sweep_key(suite, seed), "method": method, "method_args": _jsonable(method_args),
            **{k: _jsonable(getattr(suite, k)) for k in fields}, "student_backbone_args": _jsonable(backbone_args)}


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
    n = DIGIT_GRID if dataset.kind == "images" else SCATTER_POINTS
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
    _save_samples(folder / "teacher_samples.safetensors",
                  {f"heun{DEFAULT_TEACHER_NFE}": model.sample(n, label=label, seed=seed)})
    name = model.name if model.is_analytic else f"cached:{Path(model.name).name}"  # not the local cache path
    sweep = {"key": key, "status": "ok", "teacher": name, "teacher_seconds": teacher_seconds,
             "seconds": time.perf_counter() - started, "report": report}
    write_json(sweep, path)
    return sweep


def _skip_reason(suite: Suite, method_cls: type[DistillationMethod]) -> str | None:
    if "labels" in method_cls.needs and not suite.conditional:
        return f"needs class labels; {suite.name} is unconditional"
    return None


def run_cell(suite: Suite, method_name: str, method_cls: type[DistillationMethod], teacher: Callable[[], Teacher],
             folder: Path, seed: int, progress: bool = True) -> dict:
    """Distil and evaluate one method on one suite (or reuse the saved cell); never raises for a method's
    failure, which is recorded as status ``failed`` with a one-line error."""
    path = folder / f"{method_name}.json"
    key = _cell_key(suite, method_name, method_cls, seed)
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
    method_args, backbone_args = cell_args(suite, method_name, method_cls)
    steps, per_sample = steps_for_budget(teacher, method_cls, suite.teacher_eval_budget, suite.batch_size,
                                         method_args, backbone_args, TEACHER_FREE_EVALS_PER_SAMPLE)
    config = TrainConfig(steps=steps, batch_size=suite.batch_size, lr=suite.lr, seed=seed,
                         max_seconds=suite.max_seconds)
    student = distill(teacher, method_cls, method_args=method_args, train_config=config,
                      student_backbone_args=backbone_args, nfe=tuple(suite.nfe), progress=progress)
    result = student.train_result
    report = evaluate_models(teacher, [student], tuple(suite.nfe), teacher_nfe=(), teacher_solvers=(),
                             n_samples=suite.n_samples, conditional=suite.conditional, seed=seed, progress=False)
    n, label = _figure_inputs(teacher.dataset, suite.conditional, seed)
    _save_samples(folder / f"{method_name}.safetensors",
                  {f"nfe{nfe}": student.sample(n, nfe, label=label, seed=seed) for nfe in suite.nfe})
    return {"status": "capped" if result.stopped_early else "ok", "method_args": student.metadata["method_args"],
            "teacher_evals_per_sample": per_sample, "steps": steps, "steps_done": result.steps_done,
            "train_seconds": result.seconds, "teacher_evals": result.teacher_evals,
            "student_evals": result.student_evals, "auxiliary_evals": result.auxiliary_evals,
            "network_evals": result.network_evals,
            "rows": [row for row in report["results"] if row["role"] == "student"]}


# --- deriving: ratios and the JSON rows -------------------------------------------------------------------


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or not math.isfinite(value) or reference == 0:
        return None
    return value / reference


def best_teacher_row(suite: Suite, sweep: dict) -> dict | None:
    """The sweep's best row by the suite's quality metric (fewer NFE on a tie)."""
    metric = quality(suite)
    rows = [row for row in sweep["report"]["results"] if math.isfinite(row.get(metric, math.inf))]
    return min(rows, key=lambda row: (row[metric], row["nfe"])) if rows else None


def default_teacher_row(sweep: dict) -> dict | None:
    """The sweep's row of the teacher's default sampler (Heun at 35 NFE), the reference of ``speedup``."""
    name = f"teacher/heun@{DEFAULT_TEACHER_NFE}"
    return next((row for row in sweep["report"]["results"] if row["name"] == name), None)


def _derived(suite: Suite, sweep: dict, row: dict) -> dict:
    """Quality, its ratios to the noise floor and to the teacher's best, the excess NLL and the speedups
    against the teacher's default sampler and against its best-quality row."""
    report, best, default = sweep["report"], best_teacher_row(suite, sweep), default_teacher_row(sweep)
    metric = quality(suite)
    value = row.get(metric)
    floor = report["noise_floor"].get(metric)
    nll, reference_nll = row.get("nll"), report["reference"].get("nll")
    return {"quality_metric": metric, "quality": value, "noise_floor": floor,
            "floor_ratio": _ratio(value, floor), "teacher_ratio": _ratio(value, best and best[metric]),
            "excess_nll": nll - reference_nll if nll is not None and reference_nll is not None else None,
            "speedup": _ratio(default and default["sec_per_sample"], row.get("sec_per_sample")),
            "speedup_vs_best": _ratio(best and best["sec_per_sample"], row.get("sec_per_sample"))}


def cell_rows(suite: Suite, sweep: dict, cell: dict) -> list[dict]:
    """One JSON row per NFE of a cell (rows without metrics when the cell failed or was skipped)."""
    common = {"suite": suite.name, "method": cell["method"], "family": cell["family"], "status": cell["status"],
              "error": cell["error"], "train_seconds": cell.get("train_seconds"),
              "train_steps": cell.get("steps_done"), "teacher_evals": cell.get("teacher_evals"),
              "other_evals": _other_evals(cell), "student_evals": cell.get("student_evals"),
              "auxiliary_evals": cell.get("auxiliary_evals"), "teacher_eval_budget": cell["budget"]}
    measured = [_measured(row) for row in cell["rows"]]
    if not measured:  # the same keys as a measured row, without values
        measured = [{**dict.fromkeys(_measured(sweep["report"]["results"][0])), "nfe": nfe} for nfe in suite.nfe]
    return [{**common, **row, **_derived(suite, sweep, row)} for row in measured]


def _other_evals(cell: dict) -> int | None:
    """The evaluations of a cell's networks other than the teacher (student and auxiliary), or None for a cell
    saved before they were counted."""
    if cell.get("student_evals") is None or cell.get("auxiliary_evals") is None:
        return None
    return cell["student_evals"] + cell["auxiliary_evals"]


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
        metric = quality(suite)
        results = sweep["report"]["results"] + [
            {"name": f"{row['method']}@{row['nfe']}", "role": "student", "sampler": row["sampler"],
             "nfe": row["nfe"], metric: row["quality"]} for row in rows]
        quality_vs_nfe({"dataset": suite.name, "model": sweep["teacher"], "results": results},
                       out / f"{suite.name}_quality_vs_nfe.png", metric=metric,
                       floor=sweep["report"]["noise_floor"].get(metric))
        _sample_figure(suite, cells, out)
    quality_vs_train_time(measured, report, out / "quality_vs_train_time.png")


def _sample_figure(suite: Suite, cells: list[dict], out: Path) -> None:
    folder = out / "cells" / suite.name
    teacher_file = folder / "teacher_samples.safetensors"
    if not teacher_file.is_file():
        return
    # one row per method, one column per NFE; the teacher alone on the first row
    columns = len(suite.nfe)
    teacher_samples = load_file(teacher_file)[f"heun{DEFAULT_TEACHER_NFE}"]
    panels: dict[str, Tensor | None] = {f"teacher heun@{DEFAULT_TEACHER_NFE}": teacher_samples}
    panels |= {f"blank {i}": None for i in range(1, columns)}
    for cell in cells:
        path = folder / f"{cell['method']}.safetensors"
        if cell["rows"] and path.is_file():
            samples = load_file(path)
            panels |= {f"{cell['method']} @{nfe}": samples.get(f"nfe{nfe}") for nfe in suite.nfe}
    dataset = _dataset(suite.dataset)
    if dataset.kind == "images":
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
        best, metric = best_teacher_row(suite, sweep), quality(suite)
        if best is not None:
            ax.axhline(best[metric], ls="--", color="0.3")
        floor = sweep["report"]["noise_floor"].get(metric)
        if floor is not None:
            ax.axhline(floor, ls=":", color="0.5")
        ax.set_yscale("log")
        ax.set_xlabel("training seconds")
        ax.set_ylabel("FD-digits" if metric == "fd" else metric)
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
        "- Every method of a suite gets the same budget of *teacher evaluations* (one call of the teacher on one "
        "sample; a guided call counts once; teacher pairs a method trains on are paid from its budget first), "
        "converted to its training steps from the teacher evaluations it makes per training sample and step "
        "(measured, at its dearest step). Methods that never call the teacher get the steps of one making "
        f"{TEACHER_FREE_EVALS_PER_SAMPLE:g} calls per sample. `teacher evals` is what the run used: less than the "
        "budget when the wall-time cap stopped it (status `capped`), or when a method calls other networks than "
        "the teacher (its own earlier rounds, fake scores) in later steps.",
        "- `other network evals`: the run's evaluations, counted the same way (one forward pass of one network on "
        "one sample; a backward pass is not one), of every network but the teacher: the student and the copies of it "
        "a method evaluates (EMA targets, earlier rounds), and auxiliary networks (fake scores, discriminator "
        "heads, feature networks), which the budget does not limit. Its ratio to `teacher evals` is how much more "
        "network work than teacher calls a method does at the same budget (the JSON has `student_evals` and "
        "`auxiliary_evals`; the cell files the count of each network). `–` for a cell saved before these were "
        "counted.",
        "- Each method runs with its recipe's arguments (`configs/<suite>-<method>.yaml`, the tables' one source "
        "of truth; defaults where there is none), its schedule (curricula, stages, rounds, warm-ups) fitted by the "
        "method to the cell's steps. Learning rate, batch and the student network of an analytic teacher are the "
        "suite's. Per-method notes are in `docs/`.",
        "- Quality: lower is better (`swd`: sliced Wasserstein distance to held-out data; `fd`: FD-digits). "
        "`x noise floor`: quality over the same metric between two real sample sets of the same size (1 is as "
        "good as measurable). `vs teacher`: quality over the teacher's best quality at any solver and NFE. "
        f"`speedup`: seconds per sample of the teacher's default sampler (Heun, {DEFAULT_TEACHER_NFE} NFE) over "
        "this row's (the JSON also has `speedup_vs_best`, against the teacher's best-quality row).",
        "- Teacher rows: the best training-free solver (euler, heun, dpmpp_2m) at each NFE, on the same noise "
        "and labels as the students.",
        "- 2-D extras, where they tell rows apart: `excess NLL` is the samples' NLL under the true density minus "
        "that of held-out data (negative when samples crowd the modes' centres, so it cannot rank), `off "
        "support` the share of samples where the density is zero, `modes` covered, `spread` the in-mode spread "
        "over real data's (1 is right), `mode weights TV` the total variation between the share of in-mode "
        "samples each mode gets and its weight, `worst mode weight` the largest such gap of one mode.",
        "- Timings come from a shared CPU and are noisy.", ""]
    for suite, sweep, cells in measured:
        lines += _suite_section(suite, sweep, cells, report)
    lines += ["## Machine", "", *[f"- {k}: {v}" for k, v in report["machine"].items()], ""]
    return "\n".join(lines)


def _suite_section(suite: Suite, sweep: dict, cells: list[dict], report: dict) -> list[str]:
    metric = quality(suite)
    floor = sweep["report"]["noise_floor"].get(metric)
    best = best_teacher_row(suite, sweep)
    steps = ", ".join(f"{cell['method']} {cell['steps']:,} steps" for cell in cells if cell.get("steps"))
    cond = (f"class-conditional, guidance {suite.guidance_scale:g} ({suite.guidance_convention})"
            if suite.conditional else "unconditional")
    lines = [f"## {suite.name}", "",
             f"Dataset `{suite.dataset}`, teacher `{sweep['teacher']}`, {cond}; {sweep['report']['n_samples']} "
             f"samples, seed {report['seed']}. Budget {suite.teacher_eval_budget:,} teacher evaluations per "
             f"method ({steps or 'no method trained'}), batch {suite.batch_size}, lr {suite.lr:g}, wall-time cap "
             f"{'none' if suite.max_seconds is None else f'{suite.max_seconds:.0f} s'} per method.", ""]
    if floor is not None and best is not None:
        lines += [f"Quality `{metric}`; noise floor {floor:.4g}; teacher's best {best['name']} at "
                  f"{best[metric]:.4g}.", ""]
    rows = [row for row in report["cells"] if row["suite"] == suite.name]
    teachers = report["teachers"][suite.name]
    extras = _extra_columns(suite, teachers + rows)
    header = ["model", "nfe", metric, "x noise floor", "vs teacher", *[title for title, _ in extras], "train s",
              "teacher evals", "other network evals", "speedup", "status"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for nfe in sorted({row["nfe"] for row in teachers}):
        row = min((r for r in teachers if r["nfe"] == nfe), key=lambda r: (_finite(r["quality"]), r["name"]))
        lines.append(_table_row(f"teacher · {row['sampler']}", row, extras, "–", ("–", "–"), ""))
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
                evals = tuple(f"{row[key]:,}" if row.get(key) is not None else "–"
                              for key in ("teacher_evals", "other_evals"))
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
    if quality(suite) == "fd":
        columns = [("precision", "precision", _fmt("precision", "{:.3f}")),
                   ("recall", "recall", _fmt("recall", "{:.3f}")),
                   ("class acc", "class_accuracy", _fmt("class_accuracy", "{:.3f}"))]
    else:
        columns = [("excess NLL", "excess_nll", _fmt("excess_nll", "{:.3g}")),
                   ("off support", "off_support", _fmt("off_support", "{:.3f}")),
                   ("modes", "modes_covered", lambda r: f"{r['modes_covered']}/{r['modes_total']}"
                    if r.get("modes_covered") is not None else "–"),
                   ("spread", "spread_ratio", _fmt("spread_ratio", "{:.2f}")),
                   ("mode weights TV", "mode_balance", _fmt("mode_balance", "{:.3f}")),
                   ("worst mode weight", "mode_weight_worst", _fmt("mode_weight_worst", "{:.3f}"))]
    return [(title, show) for title, key, show in columns if _varies([row.get(key) for row in rows])]


def _varies(values: list) -> bool:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return bool(finite) and max(finite) - min(finite) > 1e-9 * max(1.0, abs(max(finite)))


def _fmt(key: str, spec: str) -> Callable[[dict], str]:
    def cell(row: dict) -> str:
        value = row.get(key)
        return spec.format(value) if value is not None and math.isfinite(value) else "–"
    return cell


def _table_row(label: str, row: dict, extras: list, train_s: str, evals: tuple[str, str], status: str) -> str:
    cells = [label, str(row["nfe"]), _fmt("quality", "{:.4g}")(row), _fmt("floor_ratio", "{:.3g}")(row),
             _fmt("teacher_ratio", "{:.3g}")(row), *[show(row) for _, show in extras], train_s, *evals,
             _fmt("speedup", "{:.1f}x")(row), status]
    return "| " + " | ".join(cells) + " |"
