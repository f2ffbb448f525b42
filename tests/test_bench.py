import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch

from fewstep.api import Teacher, build_method
from fewstep.bench import SUITES, Suite, run_bench, select_methods
from fewstep.bench.runner import _cell_key, teacher_evals_per_sample
from fewstep.bench.suites import SCHEDULE_RULES, method_args, steps_for_budget, student_backbone_args
from fewstep.cli import main
from fewstep.config import load_recipe
from fewstep.errors import ConfigError
from fewstep.methods import METHODS
from fewstep.methods.consistency_distillation import CDConfig, ConsistencyDistillation
from fewstep.methods.progressive_distillation import ProgressiveDistillation

STEPS, BATCH = 30, 64
REQUIRED_CELL_KEYS = {"suite", "method", "family", "nfe", "quality_metric", "quality", "swd", "nll", "excess_nll",
                      "modes_covered", "spread_ratio", "noise_floor", "teacher_ratio", "train_seconds",
                      "teacher_evals", "speedup", "peak_memory_bytes", "status"}


class BrokenMethod(ConsistencyDistillation):
    name = "broken"

    def losses(self, phase, batch, step, generator):
        raise RuntimeError("boom\nat the first step")


class LabelsMethod(ConsistencyDistillation):
    name = "labels_only"
    needs = "labels"


@dataclass
class TeacherFreeConfig(CDConfig):
    total_steps: int = 0


class TeacherFreeCD(ConsistencyDistillation):
    """A stand-in for consistency training: CD's loss with a target step that never calls the teacher, and a
    schedule field (``total_steps``) that the bench must fit to the cell's length."""

    name = "teacher_free"
    Config = TeacherFreeConfig

    def heun_step(self, x, s, s_next, label):
        return x * (s_next / s)[:, None]

    def losses(self, phase, batch, step, generator):
        losses = super().losses(phase, batch, step, generator)
        self.teacher_evals = 0
        return losses


class ExplodingCD(ConsistencyDistillation):
    def __init__(self, *args, **kwargs):
        raise AssertionError("a finished cell was trained again")


class ExplodingPD(ProgressiveDistillation):
    def __init__(self, *args, **kwargs):
        raise AssertionError("a finished cell was trained again")


def tiny_suite() -> Suite:
    return Suite("ring8", "ring8", "analytic", teacher_eval_budget=STEPS * 2 * BATCH, quality="swd", max_seconds=60,
                 teacher_nfe=(1, 2), n_samples=500, batch_size=BATCH, student_backbone_args={"width": 32, "depth": 2},
                 method_args={"pd": {"start_steps": 8, "final_steps": 4}})


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One tiny benchmark: cd and pd train, a broken method fails, a labels-only method is skipped."""
    out = tmp_path_factory.mktemp("bench")
    methods = {"cd": ConsistencyDistillation, "pd": ProgressiveDistillation, "broken": BrokenMethod,
               "labels_only": LabelsMethod, "teacher_free": TeacherFreeCD}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEWSTEP_CACHE", str(tmp_path_factory.getbasetemp() / "fewstep-cache"))
        report = run_bench([tiny_suite()], out, methods, name="tiny", progress=False, command="test")
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
            assert row["quality"] == row["swd"] and math.isfinite(row["quality"])
            assert row["teacher_ratio"] == pytest.approx(row["quality"] / min(
                r["swd"] for r in saved["teachers"]["ring8"]))
            reference_nll = saved["teachers"]["ring8"][0]["nll"] - saved["teachers"]["ring8"][0]["excess_nll"]
            assert row["excess_nll"] == pytest.approx(row["nll"] - reference_nll)
            heun35 = next(r for r in saved["teachers"]["ring8"] if r["name"] == "teacher/heun@35")
            assert row["speedup"] == pytest.approx(heun35["sec_per_sample"] / row["sec_per_sample"])
            assert row["train_seconds"] > 0
    assert rows_of(saved, "cd")[0]["family"] == "consistency"
    assert rows_of(saved, "pd")[0]["family"] == "trajectory"


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
    assert "| teacher · " in text and "| cd | 1 |" in text and "| pd | 4 |" in text
    assert "| broken | – |" in text and "failed: RuntimeError: boom at the first step |" in text
    assert "skipped: needs class labels; ring8 is unconditional |" in text
    assert "## Machine" in text
    for name in ("ring8_quality_vs_nfe.png", "ring8_samples.png", "quality_vs_train_time.png"):
        assert (out / name).stat().st_size > 0


def test_second_run_reuses_finished_cells_and_retries_failed(bench_run, tmp_path):
    first, report = bench_run
    out = tmp_path / "bench"
    shutil.copytree(first, out)
    cells = out / "cells" / "ring8"
    mtimes = {path.name: path.stat().st_mtime_ns for path in cells.glob("*.json")}
    methods = {"cd": ExplodingCD, "pd": ExplodingPD, "broken": BrokenMethod, "labels_only": LabelsMethod,
               "teacher_free": TeacherFreeCD}
    again = run_bench([tiny_suite()], out, methods, name="tiny", progress=False)
    assert all(row["status"] == "ok" for row in rows_of(again, "cd") + rows_of(again, "pd"))
    assert [row["quality"] for row in again["cells"]] == [row["quality"] for row in report["cells"]]
    for name in ("cd.json", "pd.json", "labels_only.json", "teacher_free.json", "teacher_sweep.json"):
        assert (cells / name).stat().st_mtime_ns == mtimes[name], name
    assert (cells / "broken.json").stat().st_mtime_ns != mtimes["broken.json"]


def test_changed_settings_rerun_the_cell(bench_run, tmp_path):
    out = tmp_path / "bench"
    shutil.copytree(bench_run[0], out)
    suite = tiny_suite()
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


def test_teacher_evals_per_sample_is_measured_per_method():
    teacher = Teacher.analytic("ring8")
    suite = tiny_suite()
    for name in ("cd", "pd"):
        distiller = build_method(teacher, METHODS[name], method_args(suite, name, 1), {"width": 8, "depth": 1})
        assert teacher_evals_per_sample(distiller, teacher.dataset) == 2.0
    # TBCM rolls out 32 trajectories of 2 (N - 1) = 34 evaluations per step, whatever the batch: per sample
    # that is 34 at a batch of 4 but 4.25 at the bench's 256 (the probe must use the training batch size)
    tbcm = build_method(teacher, METHODS["tbcm"], {"num_scales": 18}, {"width": 8, "depth": 1})
    assert teacher_evals_per_sample(tbcm, teacher.dataset, 4) == 34.0
    assert teacher_evals_per_sample(tbcm, teacher.dataset, 256) == 32 * 34 / 256


def test_method_without_teacher_eval_counter_is_refused():
    teacher = Teacher.analytic("ring8")
    distiller = build_method(teacher, ConsistencyDistillation, {}, {"width": 8, "depth": 1})
    del distiller.teacher_evals
    with pytest.raises(ConfigError, match="teacher_evals"):
        teacher_evals_per_sample(distiller, teacher.dataset)


def test_staged_methods_spread_their_stages_over_the_cells_steps():
    suite = SUITES["quick"][0]
    assert method_args(suite, "hyper_sd", 1000)["steps_per_stage"] == 250
    assert method_args(suite, "ect", 1000)["steps_per_stage"] == 125
    assert method_args(suite, "ect", 3)["steps_per_stage"] == 1
    for name in ("hyper_sd", "ect"):  # the argument the bench fills is one the method takes
        assert "steps_per_stage" in {f.name for f in fields(METHODS[name].Config)}


def test_a_changed_schedule_rule_re_measures_only_that_methods_cells(monkeypatch):
    suite = SUITES["quick"][0]
    names = ("ect", "hyper_sd", "scd", "cd")
    before = {name: _cell_key(suite, name, 0) for name in names}
    monkeypatch.setitem(SCHEDULE_RULES, "ect", {"stages_per_run": 4})
    assert method_args(suite, "ect", 1000)["steps_per_stage"] == 250
    after = {name: _cell_key(suite, name, 0) for name in names}
    assert [after[name] == before[name] for name in names] == [False, True, True, True]


def test_tangent_warm_ups_are_a_share_of_the_cell_and_rcm_regularises_after_it():
    suite = SUITES["full"][3]  # digits: the cells are shorter than the methods' default 1000-step warm-up
    teacher = Teacher.analytic("ring8")
    for name in ("sct", "scd", "rcm"):
        args = method_args(suite, name, 292)
        assert args["tangent_warmup"] == 29 and args["jvp"] == "finite_difference"
        distiller = build_method(teacher, METHODS[name], args, {"width": 8, "depth": 1})
        assert distiller.config.tangent_warmup == 29
    assert build_method(teacher, METHODS["rcm"], method_args(suite, "rcm", 292),
                        {"width": 8, "depth": 1}).dmd_start == 29
    assert method_args(suite, "scd", 5)["tangent_warmup"] == 1


def test_budget_conversion_and_pd_rounds():
    assert steps_for_budget(1000, 2.0, 10) == 50
    assert steps_for_budget(5, 2.0, 10) == 1
    with pytest.raises(ValueError, match="positive"):
        steps_for_budget(1000, 0.0, 10)
    for suites in SUITES.values():
        for suite in suites:
            args = method_args(suite, "pd", 999)
            rounds = int(math.log2(args["start_steps"] // args["final_steps"]))
            assert args["final_steps"] == 4 and args["steps_per_round"] * rounds <= 999
            assert args["steps_per_round"] * (rounds + 1) > 999


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
        assert suite.method_args["sct"]["jvp"] == suite.method_args["scd"]["jvp"] == "finite_difference"


def test_continuous_time_methods_get_their_ring_recipes_student_on_the_analytic_2d_tables():
    """sCT / sCD / rCM train new students on the ring and grid with their ring recipes' time features (up to 20)
    and sCD's tangent normalisation (0.01); on the ring also with the recipes' training noise (N(-0.5, 1.6^2) in
    log sigma). Every other method, and every table with a trained teacher, is unchanged."""
    full = {suite.name: suite for suite in SUITES["full"]}
    for table in ("ring8", "grid25_imbalanced"):
        suite = full[table]
        for name in ("sct", "scd", "rcm"):
            recipe = load_recipe(Path(__file__).parent.parent / "configs" / f"ring8-{name}.yaml")
            assert student_backbone_args(suite, name) == recipe.student_backbone_args
            assert suite.method_args[name].get("tangent_norm_c") == recipe.method_args.get("tangent_norm_c")
            for key in ("p_mean", "p_std"):
                expected = recipe.method_args[key] if table == "ring8" else None
                assert suite.method_args[name].get(key) == expected, (table, name, key)
        assert student_backbone_args(suite, "cd") == suite.student_backbone_args == {"width": 128, "depth": 3}
        plain = dataclasses.replace(suite, method_student_args={}, method_args=full["checkerboard"].method_args)
        changed = [name for name in METHODS if _cell_key(plain, name, 0) != _cell_key(suite, name, 0)]
        assert changed == ["sct", "scd", "rcm"]
    for table in ("checkerboard", "digits", "digits_cfg"):  # students copy the teacher's network
        assert full[table].method_student_args == {}
        assert all(full[table].method_args[name] == {"jvp": "finite_difference"} for name in ("sct", "scd", "rcm"))


def test_select_methods():
    assert list(select_methods(["pd", "cd", "pd"])) == ["pd", "cd"]
    assert select_methods(None) == dict(METHODS)
    with pytest.raises(ConfigError, match="nope"):
        select_methods(["nope"])


def test_cli_bench_refuses_bad_input(capsys, tmp_path):
    assert main(["bench", "--methods", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--suite", "huge"])
    assert exit_info.value.code == 2
    assert not any(tmp_path.iterdir())


def test_trained_teacher_recipe_includes_fewstep_defaults():
    from fewstep.api import TEACHER_STEPS
    from fewstep.bench.runner import teacher_recipe

    suites = {suite.name: suite for suite in SUITES["full"]}
    recipe = teacher_recipe(suites["digits"])
    assert recipe["steps"] == TEACHER_STEPS and recipe["dataset"] == "digits" and recipe["seed"] == 0
    assert "device" not in recipe and "progress" not in recipe  # saved cells stay valid; the bench trains on a CPU
    assert teacher_recipe(suites["checkerboard"])["steps"] == 3000
    assert teacher_recipe(suites["ring8"]) == {"analytic": "ring8"}


def test_run_bench_refuses_bad_suites(tmp_path):
    trained = Suite("bad", "checkerboard", "train", 1000, "swd", 10, teacher_args={"step": 5})
    with pytest.raises(ConfigError, match="teacher_args"):
        run_bench([trained], tmp_path, {"cd": ConsistencyDistillation}, progress=False)
    suite = tiny_suite()
    with pytest.raises(ConfigError, match="unique"):
        run_bench([suite, suite], tmp_path, {"cd": ConsistencyDistillation}, progress=False)
    suite.quality = "nll"
    with pytest.raises(ConfigError, match="quality"):
        run_bench([suite], tmp_path, {"cd": ConsistencyDistillation}, progress=False)
    assert not any(tmp_path.iterdir())


def test_cells_are_reproducible_from_the_seed(bench_run, tmp_path):
    torch.randn(100)  # whatever ran before must not change a cell
    again = run_bench([tiny_suite()], tmp_path, {"cd": ConsistencyDistillation}, progress=False)
    assert [row["quality"] for row in again["cells"]] == [row["quality"] for row in rows_of(bench_run[1], "cd")]


def test_diagnostic_columns_only_where_they_tell_rows_apart():
    from fewstep.bench.runner import _extra_columns

    rows = [{"excess_nll": 0.0, "off_support": 0.1, "modes_covered": None},
            {"excess_nll": 4e-16, "off_support": 0.3, "modes_covered": None}]
    assert [title for title, _ in _extra_columns(tiny_suite(), rows)] == ["off support"]
