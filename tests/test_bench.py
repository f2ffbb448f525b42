import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fewstep.bench import SUITES, Suite, run_bench, select_methods
from fewstep.bench.runner import _cell_key, cell_args, teacher_spec
from fewstep.cli import main
from fewstep.config import load_recipe
from fewstep.errors import ConfigError
from fewstep.methods import METHODS
from fewstep.methods.consistency.consistency_distillation import CDConfig, ConsistencyDistillation
from fewstep.methods.trajectory.progressive_distillation import ProgressiveDistillation
from fewstep.outputs import claim
from fewstep.teachers import TEACHER_TRAINING_STEPS

STEPS, BATCH = 30, 64
REQUIRED_CELL_KEYS = {"suite", "method", "family", "nfe", "quality_metric", "quality", "swd", "nll", "excess_nll",
                      "modes_covered", "spread_ratio", "noise_floor", "teacher_ratio", "train_seconds",
                      "teacher_evals", "other_evals", "student_evals", "auxiliary_evals", "speedup",
                      "peak_memory_bytes", "status"}
SRC = Path(__file__).parent.parent / "src" / "fewstep"


class BrokenMethod(ConsistencyDistillation):
    name = "broken"

    def losses(self, phase, batch, step, generator):
        raise RuntimeError("boom\nat the first step")


class LabelsMethod(ConsistencyDistillation):
    name = "labels_only"
    needs = frozenset({"labels"})


@dataclass
class TeacherFreeConfig(CDConfig):
    total_steps: int = 0


class TeacherFreeCD(ConsistencyDistillation):
    """A stand-in for consistency training: CD's loss with a target step that never calls the teacher, and a
    schedule field (``total_steps``) that its run_schedule fits to the cell's length."""

    name = "teacher_free"
    Config = TeacherFreeConfig

    @classmethod
    def run_schedule(cls, steps, args):
        return {"total_steps": steps}

    def teacher_step(self, x, s, s_next, cond):
        return x * (s_next / s)[:, None]


class ExplodingCD(ConsistencyDistillation):
    def __init__(self, *args, **kwargs):
        raise AssertionError("a finished cell was trained again")


class ExplodingPD(ProgressiveDistillation):
    def __init__(self, *args, **kwargs):
        raise AssertionError("a finished cell was trained again")


def write_recipe(folder: Path, method: str, method_args: dict, dataset: str = "ring8") -> Path:
    path = folder / f"tiny-{method}.yaml"
    path.write_text(json.dumps({"dataset": dataset, "method": method, "method_args": method_args,
                                "teacher": {"source": "analytic"}}))
    return path


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory) -> Path:
    """The tiny suite's recipes: PD from 8 steps (one round), with a schedule field the bench must refit."""
    folder = tmp_path_factory.mktemp("recipes")
    write_recipe(folder, "pd", {"start_steps": 8, "final_steps": 4, "steps_per_round": 1000})
    return folder


def tiny_suite(recipe_dir: Path) -> Suite:
    return Suite("ring8", "ring8", "analytic", teacher_eval_budget=STEPS * 2 * BATCH, max_seconds=60,
                 recipes="tiny", recipe_dir=str(recipe_dir), teacher_nfe=(1, 2), n_samples=500, batch_size=BATCH,
                 student_backbone_args={"width": 32, "depth": 2})


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, recipe_dir):
    """One tiny benchmark: cd and pd train, a broken method fails, a labels-only method is skipped."""
    out = tmp_path_factory.mktemp("bench")
    methods = {"cd": ConsistencyDistillation, "pd": ProgressiveDistillation, "broken": BrokenMethod,
               "labels_only": LabelsMethod, "teacher_free": TeacherFreeCD}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEWSTEP_CACHE", str(tmp_path_factory.getbasetemp() / "fewstep-cache"))
        report = run_bench([tiny_suite(recipe_dir)], out, methods, name="tiny", progress=False, command="test")
    return out, report


def rows_of(report: dict, method: str) -> list[dict]:
    return [row for row in report["cells"] if row["method"] == method]


def test_bench_writes_json_with_required_keys(bench_run):
    out, _ = bench_run
    saved = json.loads((out / "benchmarks.json").read_text())
    assert saved["suite"] == "tiny"
    assert {"cells", "machine", "wall_seconds"} <= set(saved)
    assert {"python", "torch", "platform", "threads"} <= set(saved["machine"])
    assert len(saved["cells"]) == 5 * 3
    for row in saved["cells"]:
        assert set(row) >= REQUIRED_CELL_KEYS, REQUIRED_CELL_KEYS - set(row)
    for method in ("cd", "pd"):
        rows = rows_of(saved, method)
        assert [row["nfe"] for row in rows] == [1, 2, 4]
        for row in rows:
            assert row["status"] == "ok"
            assert row["teacher_evals"] == STEPS * 2 * BATCH  # the same budget, spent in full by both
            assert row["other_evals"] == row["student_evals"] + row["auxiliary_evals"] > 0
            assert row["quality"] == row["swd"] and math.isfinite(row["quality"])
            assert row["teacher_ratio"] == pytest.approx(row["quality"] / min(
                r["swd"] for r in saved["teachers"]["ring8"]))
            reference_nll = saved["teachers"]["ring8"][0]["nll"] - saved["teachers"]["ring8"][0]["excess_nll"]
            assert row["excess_nll"] == pytest.approx(row["nll"] - reference_nll)
            heun35 = next(r for r in saved["teachers"]["ring8"] if r["name"] == "teacher/heun@35")
            assert row["speedup"] == pytest.approx(heun35["sec_per_sample"] / row["sec_per_sample"])
            assert row["train_seconds"] > 0
    assert all(row["student_evals"] == row["other_evals"] == STEPS * BATCH * 2 and row["auxiliary_evals"] == 0
               for row in rows_of(saved, "cd"))  # the student and its target, once per sample and step
    assert rows_of(saved, "cd")[0]["family"] == "consistency"
    assert rows_of(saved, "pd")[0]["family"] == "trajectory"
    pd_cell = json.loads((out / "cells" / "ring8" / "pd.json").read_text())
    assert pd_cell["method_args"]["start_steps"] == 8  # from the recipe, its schedule refitted to the cell
    assert pd_cell["method_args"]["steps_per_round"] == STEPS


def test_failing_method_is_recorded_and_others_complete(bench_run):
    _, report = bench_run
    broken = rows_of(report, "broken")
    assert [row["status"] for row in broken] == ["failed"] * 3
    assert broken[0]["error"] == "RuntimeError: boom at the first step"
    assert all(row["quality"] is None for row in broken)
    assert [row["status"] for row in rows_of(report, "labels_only")] == ["skipped"] * 3
    assert all(row["status"] == "ok" for row in rows_of(report, "cd") + rows_of(report, "pd"))


def test_benchmarks_markdown_has_each_suite_table_and_plots(bench_run):
    out, _ = bench_run
    text = (out / "BENCHMARKS.md").read_text()
    assert "## ring8" in text
    assert "| model | nfe | swd | x noise floor | vs teacher |" in text
    assert "| teacher evals | other network evals | speedup | status |" in text
    assert "- `other network evals`:" in text
    cd_budget = f"{STEPS * 2 * BATCH:,}"
    assert re.search(rf"\| cd \| 1 \|.* \| {cd_budget} \| {cd_budget} \| [0-9.]+x \| ok \|", text)
    assert "| teacher · " in text and "| cd | 1 |" in text and "| pd | 4 |" in text
    assert "| broken | – |" in text and "failed: RuntimeError: boom at the first step |" in text
    assert "skipped: needs class labels; ring8 is unconditional |" in text
    assert "## Machine" in text
    for name in ("ring8_quality_vs_nfe.png", "ring8_samples.png", "quality_vs_train_time.png"):
        assert (out / name).stat().st_size > 0


def test_second_run_reuses_finished_cells_and_retries_failed(bench_run, recipe_dir, tmp_path):
    first, report = bench_run
    out = tmp_path / "bench"
    shutil.copytree(first, out)
    cells = out / "cells" / "ring8"
    mtimes = {path.name: path.stat().st_mtime_ns for path in cells.glob("*.json")}
    methods = {"cd": ExplodingCD, "pd": ExplodingPD, "broken": BrokenMethod, "labels_only": LabelsMethod,
               "teacher_free": TeacherFreeCD}
    again = run_bench([tiny_suite(recipe_dir)], out, methods, name="tiny", progress=False)
    assert all(row["status"] == "ok" for row in rows_of(again, "cd") + rows_of(again, "pd"))
    assert [row["quality"] for row in again["cells"]] == [row["quality"] for row in report["cells"]]
    for name in ("cd.json", "pd.json", "labels_only.json", "teacher_free.json", "teacher_sweep.json"):
        assert (cells / name).stat().st_mtime_ns == mtimes[name], name
    assert (cells / "broken.json").stat().st_mtime_ns != mtimes["broken.json"]


def test_a_cell_saved_before_network_calls_were_counted_loads_and_shows_a_dash(bench_run, recipe_dir, tmp_path):
    out = tmp_path / "bench"
    shutil.copytree(bench_run[0], out)
    path = out / "cells" / "ring8" / "cd.json"
    cell = json.loads(path.read_text())
    for key in ("student_evals", "auxiliary_evals", "network_evals"):
        del cell[key]
    path.write_text(json.dumps(cell))
    report = run_bench([tiny_suite(recipe_dir)], out, {"cd": ExplodingCD}, progress=False)
    assert [row["other_evals"] for row in report["cells"]] == [None] * 3
    assert [row["teacher_evals"] for row in report["cells"]] == [STEPS * 2 * BATCH] * 3
    assert re.search(rf"\| cd \| 1 \|.* \| {STEPS * 2 * BATCH:,} \| – \| [0-9.]+x \| ok \|",
                     (out / "BENCHMARKS.md").read_text())


def test_changed_settings_rerun_the_cell(bench_run, recipe_dir, tmp_path):
    out = tmp_path / "bench"
    shutil.copytree(bench_run[0], out)
    suite = tiny_suite(recipe_dir)
    suite.teacher_eval_budget = 10 * 2 * BATCH
    report = run_bench([suite], out, {"cd": ConsistencyDistillation}, progress=False)
    assert [row["teacher_evals"] for row in report["cells"]] == [10 * 2 * BATCH] * 3


def test_a_teacher_free_method_gets_cds_steps_and_its_schedule_fits_them(bench_run):
    out, report = bench_run
    rows = rows_of(report, "teacher_free")
    assert [row["status"] for row in rows] == ["ok"] * 3 and all(row["teacher_evals"] == 0 for row in rows)
    cells = {name: json.loads((out / "cells" / "ring8" / f"{name}.json").read_text()) for name in ("cd",
                                                                                                   "teacher_free")}
    assert cells["teacher_free"]["steps"] == cells["cd"]["steps"] == STEPS
    assert cells["teacher_free"]["method_args"]["total_steps"] == STEPS


def test_a_changed_recipe_re_measures_only_that_methods_cells(tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    suite = tiny_suite(folder)
    names = ("ect", "hyper_sd", "cd")
    write_recipe(folder, "ect", {"start_stage": 0})
    before = {name: _cell_key(suite, name, METHODS[name], 0) for name in names}
    write_recipe(folder, "ect", {"start_stage": 2, "steps_per_stage": 77})
    after = {name: _cell_key(suite, name, METHODS[name], 0) for name in names}
    assert [after[name] == before[name] for name in names] == [False, True, True]
    assert cell_args(suite, "ect", METHODS["ect"])[0] == {"start_stage": 2}  # the method fits its schedule
    write_recipe(folder, "ect", {"start_stage": 2, "steps_per_stage": 12})
    assert _cell_key(suite, "ect", METHODS["ect"], 0) == after["ect"]


def test_the_bench_reads_every_methods_arguments_from_its_recipes():
    """The ring table's sCT / sCD / rCM get their recipes' student (time features up to 20) and noise levels and
    sCD its tangent normalisation; the grid reads its own recipes, which keep the default noise levels; digits
    students copy the teacher's network, so only method arguments come from the recipes."""
    full = {suite.name: suite for suite in SUITES["full"]}
    for table in ("ring8", "grid25_imbalanced"):
        for name in ("sct", "scd", "rcm"):
            recipe = load_recipe(full[table].recipe_path(name))
            args, student = cell_args(full[table], name, METHODS[name])
            assert student == {"width": 128, "depth": 3, "time_frequencies": [0.1, 20]}
            assert args["jvp"] == "finite_difference" and "tangent_warmup" not in args
            assert args == {k: v for k, v in recipe.method_args.items() if k != "tangent_warmup"}
            assert ("p_mean" in args) == (table == "ring8")
        assert cell_args(full[table], "scd", METHODS["scd"])[0]["tangent_norm_c"] == 0.01
    assert cell_args(full["ring8"], "cd", METHODS["cd"]) == ({}, {"width": 128, "depth": 3})
    assert cell_args(full["checkerboard"], "cd", METHODS["cd"]) == ({}, {"width": 128, "depth": 3})  # no recipe
    assert cell_args(full["digits"], "ct", METHODS["ct"])[0] == {"final_scales": 40}


def test_the_bench_names_no_method():
    """What a method needs lives in its recipe and its class: no registered name appears in bench/, in code or
    prose, in any case (``CD``, ``sCD``, ...)."""
    for path in (SRC / "bench").glob("*.py"):
        text = path.read_text()
        named = [name for name in METHODS if re.search(rf"\b{name}\b", text, re.IGNORECASE)]
        assert not named, (path.name, named)


def test_a_recipe_for_another_method_or_dataset_is_refused_before_anything_runs(tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    write_recipe(folder, "cd", {}, dataset="moons")
    with pytest.raises(ConfigError, match=r"tiny-cd\.yaml is for cd on moons"):
        run_bench([tiny_suite(folder)], tmp_path / "out", {"cd": ConsistencyDistillation}, progress=False)
    assert not (tmp_path / "out").exists()


def test_suites_cover_the_issue():
    full = {suite.name: suite for suite in SUITES["full"]}
    assert set(full) == {"ring8", "grid25_imbalanced", "checkerboard", "digits", "digits_cfg"}
    assert full["digits"].teacher_args == {}  # the default cached teacher, shared with `fewstep demo`
    assert full["digits_cfg"].guidance_scale == 2.0 and full["digits_cfg"].conditional
    quick = {suite.name: suite for suite in SUITES["quick"]}
    assert set(quick) == {"ring8", "digits"}  # one exact-teacher table and one real-data table
    for name in quick:
        assert quick[name].teacher_eval_budget < full[name].teacher_eval_budget
        assert quick[name].max_seconds < full[name].max_seconds
    for suite in [*quick.values(), *full.values()]:
        assert suite.nfe == (1, 2, 4)
        for name in METHODS:  # every recipe a suite reads is valid
            cell_args(suite, name, METHODS[name])


def test_select_methods():
    assert list(select_methods(["pd", "cd", "pd"])) == ["pd", "cd"]
    assert select_methods(None) == dict(METHODS)
    with pytest.raises(ConfigError, match="nope"):
        select_methods(["nope"])


def test_cli_bench_refuses_bad_input(capsys, tmp_path):
    assert main(["bench", "--methods", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["bench", "--suite", "huge"]) == 2
    assert not any(tmp_path.iterdir())


def test_the_suites_teachers_are_recipe_teacher_sections_with_fewsteps_defaults(recipe_dir):
    suites = {suite.name: suite for suite in SUITES["full"]}
    digits = teacher_spec(suites["digits"])
    assert digits.source == "train" and digits.steps == TEACHER_TRAINING_STEPS
    assert teacher_spec(suites["checkerboard"]).steps == 3000
    assert teacher_spec(suites["digits_cfg"]).guidance_scale == 2.0
    assert teacher_spec(tiny_suite(recipe_dir)).source == "analytic"


def test_run_bench_refuses_bad_suites(tmp_path, recipe_dir):
    trained = Suite("bad", "checkerboard", "train", 1000, 10, recipes="none", teacher_args={"step": 5})
    with pytest.raises(ConfigError, match="step"):
        run_bench([trained], tmp_path, {"cd": ConsistencyDistillation}, progress=False)
    suite = tiny_suite(recipe_dir)
    with pytest.raises(ConfigError, match="unique"):
        run_bench([suite, suite], tmp_path, {"cd": ConsistencyDistillation}, progress=False)
    assert not any(tmp_path.iterdir())


def test_cells_are_reproducible_from_the_seed(bench_run, recipe_dir, tmp_path):
    torch.randn(100)  # whatever ran before must not change a cell
    again = run_bench([tiny_suite(recipe_dir)], tmp_path, {"cd": ConsistencyDistillation}, progress=False)
    assert [row["quality"] for row in again["cells"]] == [row["quality"] for row in rows_of(bench_run[1], "cd")]


def test_diagnostic_columns_only_where_they_tell_rows_apart():
    from fewstep.bench.runner import _extra_columns

    rows = [{"excess_nll": 0.0, "off_support": 0.1, "modes_covered": None},
            {"excess_nll": 4e-16, "off_support": 0.3, "modes_covered": None}]
    assert [title for title, _ in _extra_columns(SUITES["quick"][0], rows)] == ["off support"]


def test_mixture_tables_show_each_methods_per_mode_weight_error(bench_run):
    """The ring's rows carry the total variation of the mode weights and the worst mode's gap, and the table shows
    them where they differ."""
    out, report = bench_run
    rows = [row for row in report["cells"] if row["status"] == "ok"] + report["teachers"]["ring8"]
    assert all(0 <= row["mode_balance"] <= 1 and 0 <= row["mode_weight_worst"] <= row["mode_balance"] + 1e-12
               for row in rows if row.get("mode_balance") is not None)
    text = (out / "BENCHMARKS.md").read_text()
    assert "| mode weights TV | worst mode weight |" in text


def test_an_interrupted_bench_resumes_into_its_folder(recipe_dir, tmp_path, monkeypatch):
    """The folder is marked as a bench before its first cell, so a bench killed mid-way is resumed, not refused."""
    import fewstep.bench.runner as runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runner, "run_cell", interrupted)
    out = tmp_path / "bench"
    with pytest.raises(KeyboardInterrupt):
        run_bench([tiny_suite(recipe_dir)], out, {"cd": ConsistencyDistillation}, progress=False)
    assert (out / "cells" / "ring8" / "teacher_sweep.json").is_file()
    assert claim(out, "bench") == out
    with pytest.raises(ConfigError, match="fewstep bench, not a run"):
        claim(out, "run")
