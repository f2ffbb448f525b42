"""Every CLI command against malformed recipes, overrides, model folders and paths: each must exit 2 with one line
naming what to fix, no traceback, and nothing written or removed in the working folder (the cache may be)."""

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fewstep
from fewstep.cli import main
from fewstep.outputs import mark
from fewstep.solvers import Sampling
from fewstep.student import Student

ROOT = Path(__file__).parent.parent
TINY = {"width": 16, "depth": 1}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A working folder with fewstep's outputs and a user's own files in it."""
    ws = tmp_path_factory.mktemp("workspace")
    ring = fewstep.Teacher.analytic("ring8")
    student = fewstep.distill(ring, "cd", steps=2, batch_size=16, student_backbone_args=TINY, progress=False)
    student.save(ws / "student")
    Student(student.denoiser, "pd", {1: Sampling("euler", [80.0, 0.0]), 2: Sampling("euler", [80.0, 1.0, 0.0])},
            ring.dataset).save(ws / "euler_student")
    fewstep.Teacher.train("ring8", backbone_args=TINY, steps=2, batch_size=16, progress=False).save(ws / "teacher")
    moons = fewstep.Teacher.train("moons", backbone_args=TINY, steps=2, batch_size=16, progress=False)
    moons.save(ws / "moons_teacher")
    fewstep.distill(moons, "cd", steps=2, batch_size=16, progress=False).save(ws / "moons_student")
    for name, change in {"bad_json": "{not json", "bad_sampling": {"sampling": {"2": {"sampler": "warp"}}},
                         "bad_dataset": {"dataset": ["ring8"]}, "bad_role": {"role": "critic"},
                         "bad_width": {"backbone": {"name": "mlp", "hparams": {**student.denoiser.backbone.hparams,
                                                                               "width": 4096}}}}.items():
        shutil.copytree(ws / "student", ws / name)
        config = ws / name / "fewstep.json"
        config.write_text(change if isinstance(change, str) else json.dumps(json.loads(config.read_text()) | change))
    (ws / "foreign").mkdir()
    (ws / "foreign" / "notes.txt").write_text("mine")
    (ws / "thesis.txt").write_text("mine")
    (ws / "thesis.png").write_bytes(b"mine")
    (ws / "existing.json").write_text("{}")
    (ws / "empty.yaml").write_text("")
    (ws / "dup.yaml").write_text("dataset: ring8\nmethod: cd\ntrain:\n  steps: 5\n  steps: 6\n")
    (ws / "broken.yaml").write_text("dataset: [ring8\n")
    (ws / "list.yaml").write_text("- dataset\n- ring8\n")
    (ws / "oldrun").mkdir()
    mark(ws / "oldrun", "run")
    recipe = json.loads(json.dumps(fewstep.config.recipe_to_dict(fewstep.config.load_recipe(
        ROOT / "configs" / "ring8-cd.yaml", ["train.lr=0.01", f"out={ws / 'oldrun'}"]))))
    (ws / "oldrun" / "recipe.json").write_text(json.dumps(recipe))
    return ws


def snapshot(folder: Path) -> dict:
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*"))}


def refused(argv: list[str], ws: Path, capsys, monkeypatch) -> str:
    """Run ``fewstep argv`` in ``ws``; assert exit 2, one error line, no traceback, nothing changed in ``ws``."""
    monkeypatch.chdir(ws)
    before = snapshot(ws)
    capsys.readouterr()
    code = main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, code, err)
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, (argv, err)
    assert snapshot(ws) == before, (argv, "the working folder changed")
    return lines[0]


RING_CD = str(ROOT / "configs" / "ring8-cd.yaml")
DEMO_CASES = {  # fewstep demo: every override checked before the digits teacher trains
    "steps 0": (["train.steps=0"], "train.steps"),
    "lr inf": (["train.lr=.inf"], "train.lr"),
    "lr huge": (["train.lr=1e39"], "train.lr"),
    "lr negative": (["train.lr=-1"], "lr"),
    "lr text": (["train.lr=fast"], "train.lr"),
    "device gpu": (["train.device=gpu"], "train.device"),
    "device cuda": (["train.device=cuda"], "train.device"),
    "batch 0": (["train.batch_size=0"], "batch_size"),
    "mixed fp8": (["train.mixed_precision=fp8"], "mixed_precision"),
    "distributed": (["train.distributed=zero"], "distributed"),
    "schedule": (["train.lr_schedule=step"], "lr_schedule"),
    "ema": (["train.ema_decay=2"], "ema_decay"),
    "samples 0": (["eval.n_samples=0"], "eval.n_samples"),
    "samples huge": (["eval.n_samples=1000000000"], "eval.n_samples"),
    "nfe 0": (["eval.student_nfe=[0]"], "student_nfe"),
    "nfe none": (["eval.student_nfe=[]"], "student_nfe"),
    "teacher nfe": (["eval.teacher_nfe=[1, -2]"], "teacher_nfe"),
    "solver": (["eval.teacher_solvers=[rk4]"], "teacher_solvers"),
    "monitor": (["eval.monitor_every=-1"], "monitor"),
    "levels on pd": (["method=pd", "eval.tune_levels=true"], "tune_levels"),
    "guidance nan": (["teacher.guidance_scale=.nan"], "guidance_scale"),
    "guidance unclassed": (["dataset=moons", "teacher.guidance_scale=2"], "no classes"),
    "conditional unclassed": (["dataset=moons", "eval.conditional=true"], "eval.conditional"),
    "convention": (["teacher.guidance_convention=w+1"], "guidance_convention"),
    "teacher source": (["teacher.source=/nope"], "teacher.source"),
    "teacher backbone": (["teacher.backbone=transformer"], "backbone"),
    "teacher width": (["teacher.backbone_args={width: 0}"], "backbone_args"),
    "teacher args typo": (["teacher.backbone_args={widht: 3}"], "backbone_args"),
    "unknown method": (["method=nope"], "nope"),
    "method arg": (["method=cd", "method_args.num_scales=1"], "num_scales"),
    "method arg typo": (["method_args.alfa=1.2"], "alfa"),
    "method arg type": (["method_args.alpha=many"], "alpha"),
    "distance": (["method=cd", "method_args.distance=l1"], "distance"),
    "unknown key": (["nokey=1"], "nokey"),
    "unknown section key": (["train.stepz=5"], "train.stepz"),
    "key twice": (["train.steps=5", "train.steps=6"], "twice"),
    "student width": (["student_backbone_args={width: -3}"], "student_backbone_args"),
    "student typo": (["student_backbone_args={nope: 1}"], "student_backbone_args"),
    "not key=value": (["train"], "key=value"),
    "unknown dataset": (["dataset=imagenet"], "imagenet"),
    "analytic digits": (["teacher.source=analytic"], "analytic"),
    "section not mapping": (["train=5"], "train"),
}


@pytest.mark.parametrize("case", sorted(DEMO_CASES))
def test_demo_refuses(case, workspace, capsys, monkeypatch):
    overrides, named = DEMO_CASES[case]
    assert named in refused(["demo", "--out", "fresh", *overrides], workspace, capsys, monkeypatch)


DISTILL_CASES = {
    "no file": (["/nope.yaml"], "not found"),
    "empty": (["empty.yaml"], "empty"),
    "key twice in yaml": (["dup.yaml"], "twice"),
    "broken yaml": (["broken.yaml"], "YAML"),
    "not a mapping": (["list.yaml"], "mapping"),
    "out is a file": ([RING_CD, "out=thesis.txt"], "thesis.txt"),
    "out holds user files": ([RING_CD, "out=foreign"], "foreign"),
    "out holds a student": ([RING_CD, "out=student"], "student"),
    "out holds another recipe's run": ([RING_CD, "out=oldrun"], "train.lr"),
    "processes 0": ([RING_CD, "--num-processes", "0", "out=fresh"], "num-processes"),
    "no analytic digits": ([RING_CD, "dataset=digits", "out=fresh"], "analytic"),
    "teacher of another dataset": ([RING_CD, "teacher.source=moons_teacher", "out=fresh"], "moons"),
    "teacher is a student": ([RING_CD, "teacher.source=student", "out=fresh"], "student"),
    "teacher folder broken": ([RING_CD, "teacher.source=bad_json", "out=fresh"], "JSON"),
    "conditional ring": ([RING_CD, "eval.conditional=true", "out=fresh"], "eval.conditional"),
    "jvp": ([str(ROOT / "configs" / "ring8-sct.yaml"), "method_args.jvp=backward", "out=fresh"], "jvp"),
    "guidance on ring": ([RING_CD, "teacher.guidance_scale=3", "out=fresh"], "no classes"),
    "unknown option": ([RING_CD, "--fast"], "unrecognized"),
}


@pytest.mark.parametrize("case", sorted(DISTILL_CASES))
def test_distill_refuses(case, workspace, capsys, monkeypatch):
    args, named = DISTILL_CASES[case]
    assert named in refused(["distill", *args], workspace, capsys, monkeypatch)


TEACHER_TRAIN_CASES = {
    "dataset": (["--dataset", "nope"], "dataset"),
    "steps 0": (["--steps", "0"], "steps"),
    "steps negative": (["--steps", "-5"], "steps"),
    "steps text": (["--steps", "many"], "steps"),
    "batch 0": (["--batch-size", "0"], "batch-size"),
    "lr 0": (["--lr", "0"], "lr"),
    "lr inf": (["--lr", "inf"], "lr"),
    "lr nan": (["--lr", "nan"], "lr"),
    "lr huge": (["--lr", "1e39"], "lr"),
    "dropout 1": (["--label-dropout", "1"], "label-dropout"),
    "dropout negative": (["--label-dropout", "-0.1"], "label-dropout"),
    "seed negative": (["--seed", "-1"], "seed"),
    "backbone": (["--backbone", "vit"], "backbone"),
    "args not json": (["--backbone-args", "width=3"], "backbone-args"),
    "args not object": (["--backbone-args", "[1]"], "backbone-args"),
    "args typo": (["--backbone-args", '{"widht": 3}'], "--backbone-args"),
    "args width": (["--backbone-args", '{"width": -1}'], "--backbone-args"),
    "device gpu": (["--device", "gpu"], "--device"),
    "device cuda": (["--device", "cuda"], "--device"),
    "out is a file": (["--out", "thesis.txt"], "thesis.txt"),
    "out holds user files": (["--out", "foreign"], "foreign"),
    "out holds a student": (["--out", "student"], "student"),
    "out holds a teacher": (["--out", "teacher"], "--overwrite"),
}


@pytest.mark.parametrize("case", sorted(TEACHER_TRAIN_CASES))
def test_teacher_train_refuses(case, workspace, capsys, monkeypatch):
    args, named = TEACHER_TRAIN_CASES[case]
    assert named in refused(["teacher", "train", "--steps", "2", *args], workspace, capsys, monkeypatch)


SAMPLE_CASES = {
    "no model": (["--model", "/nope"], "/nope"),
    "user folder": (["--model", "foreign"], "foreign"),
    "model is a file": (["--model", "thesis.txt"], "thesis.txt"),
    "broken json": (["--model", "bad_json"], "JSON"),
    "bad sampling": (["--model", "bad_sampling"], "sampling"),
    "bad dataset": (["--model", "bad_dataset"], "dataset"),
    "bad role": (["--model", "bad_role"], "role"),
    "width not the weights": (["--model", "bad_width"], "does not match"),
    "n 0": (["--model", "student", "-n", "0"], "-n"),
    "n negative": (["--model", "student", "-n", "-1"], "-n"),
    "n huge": (["--model", "student", "-n", "1000000000000"], "-n"),
    "nfe 0": (["--model", "teacher", "--nfe", "0"], "--nfe"),
    "nfe missing": (["--model", "student", "--nfe", "3"], "--nfe 3"),
    "label unconditional": (["--model", "student", "--label", "5"], "unconditional"),
    "label negative": (["--model", "student", "--label", "-1"], "--label"),
    "seed": (["--model", "student", "--seed", "-1"], "--seed"),
    "device": (["--model", "student", "--device", "gpu"], "--device"),
    "out suffix": (["--model", "student", "--out", "x.txt"], "x.txt"),
    "out is a folder": (["--model", "student", "--out", "foreign"], "foreign"),
    "out without folder": (["--model", "student", "--out", "nodir/x.pt"], "nodir"),
    "out exists": (["--model", "student", "--out", "thesis.png"], "--overwrite"),
    "no model given": ([], "--model"),
}


@pytest.mark.parametrize("case", sorted(SAMPLE_CASES))
def test_sample_refuses(case, workspace, capsys, monkeypatch):
    args, named = SAMPLE_CASES[case]
    assert named in refused(["sample", *args], workspace, capsys, monkeypatch)


EVAL_CASES = {  # all checked before the cached digits teacher would train
    "dataset": (["--dataset", "nope"], "dataset"),
    "no student": (["--student", "/nope"], "/nope"),
    "student is a teacher": (["--student", "teacher", "--dataset", "ring8"], "teacher"),
    "student of another dataset": (["--student", "moons_student", "--dataset", "ring8"], "moons"),
    "student broken": (["--student", "bad_sampling", "--dataset", "ring8"], "sampling"),
    "nfe 0": (["--nfe", "0"], "--nfe"),
    "nfe missing": (["--student", "student", "--dataset", "ring8", "--nfe", "3"], "--nfe 3"),
    "teacher nfe 0": (["--teacher-nfe", "0"], "--teacher-nfe"),
    "samples 0": (["--n-samples", "0"], "--n-samples"),
    "samples 1": (["--n-samples", "1"], "--n-samples"),
    "samples huge": (["--n-samples", "1000000000"], "--n-samples"),
    "teacher missing": (["--teacher", "/nope", "--dataset", "ring8"], "/nope"),
    "teacher is a student": (["--teacher", "student", "--dataset", "ring8"], "student"),
    "teacher of another dataset": (["--teacher", "moons_teacher", "--dataset", "ring8"], "moons"),
    "no analytic digits": (["--teacher", "analytic"], "analytic"),
    "json suffix": (["--json", "x.txt"], "x.txt"),
    "json exists": (["--json", "existing.json"], "--overwrite"),
    "json without folder": (["--json", "nodir/x.json"], "nodir"),
    "device": (["--device", "gpu"], "--device"),
    "seed": (["--seed", "-1"], "--seed"),
}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_eval_refuses(case, workspace, capsys, monkeypatch):
    args, named = EVAL_CASES[case]
    assert named in refused(["eval", *args], workspace, capsys, monkeypatch)


BENCH_CASES = {
    "suite": (["--suite", "huge"], "suite"),
    "method": (["--methods", "nope"], "nope"),
    "out is a file": (["--out", "thesis.txt"], "thesis.txt"),
    "out holds user files": (["--out", "foreign"], "foreign"),
    "out holds a student": (["--out", "student"], "student"),
    "json suffix": (["--json", "x.txt"], "x.txt"),
    "json exists": (["--json", "existing.json"], "--overwrite"),
    "seed": (["--seed", "-1"], "--seed"),
}


@pytest.mark.parametrize("case", sorted(BENCH_CASES))
def test_bench_refuses(case, workspace, capsys, monkeypatch):
    args, named = BENCH_CASES[case]
    assert named in refused(["bench", *args], workspace, capsys, monkeypatch)


EXPORT_CASES = {
    "no folder": (["/nope", "--out", "new"], "/nope"),
    "user folder": (["foreign", "--out", "new"], "foreign"),
    "format": (["student", "--format", "onnx", "--out", "new"], "format"),
    "out is a file": (["student", "--out", "thesis.txt"], "thesis.txt"),
    "out holds user files": (["student", "--out", "foreign"], "foreign"),
    "out holds the student": (["student", "--out", "student"], "--overwrite"),
    "out holds a teacher": (["student", "--out", "teacher"], "teacher"),
    "diffusers of an mlp": (["student", "--format", "diffusers", "--out", "new"], "diffusers"),
    "lora of an mlp": (["student", "--format", "lora", "--out", "new"], "diffusers"),
    "no out": (["student"], "--out"),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_refuses(case, workspace, capsys, monkeypatch):
    args, named = EXPORT_CASES[case]
    assert named in refused(["export", *args], workspace, capsys, monkeypatch)


LEVELS_CASES = {
    "no folder": (["/nope"], "/nope"),
    "user folder": (["foreign"], "foreign"),
    "nfe 1": (["student", "--nfe", "1"], "--nfe"),
    "nfe missing": (["student", "--nfe", "3"], "--nfe 3"),
    "euler student": (["euler_student", "--nfe", "2"], "--nfe"),
    "samples 1": (["student", "--n-samples", "1"], "--n-samples"),
    "seed": (["student", "--seed", "-1"], "--seed"),
}


@pytest.mark.parametrize("case", sorted(LEVELS_CASES))
def test_levels_refuses(case, workspace, capsys, monkeypatch):
    args, named = LEVELS_CASES[case]
    assert named in refused(["levels", *args], workspace, capsys, monkeypatch)


@pytest.mark.parametrize("argv", [["nope"], ["methods", "extra"], ["teacher", "fly"], ["--nope"]])
def test_unknown_commands_are_one_line(argv, workspace, capsys, monkeypatch):
    refused(argv, workspace, capsys, monkeypatch)


@pytest.mark.parametrize("value", ["0", "two", "-3"])
def test_a_bad_thread_count_is_refused_before_any_work(value, workspace, capsys, monkeypatch):
    monkeypatch.setenv("FEWSTEP_THREADS", value)
    assert "FEWSTEP_THREADS" in refused(["distill", RING_CD, "out=fresh"], workspace, capsys, monkeypatch)


KEYS = ["train.steps", "train.lr", "train.batch_size", "train.ema_decay", "train.grad_clip", "train.warmup_steps",
        "eval.n_samples", "eval.seed", "teacher.guidance_scale", "method_args.num_scales", "method_args.target_ema"]
BAD_VALUES = st.one_of(st.sampled_from(["-1", "0.0.1", ".nan", "-.inf", "[1, 2]", "{a: 1}", "'text'", "1e400",
                                        "-1e-9", "null"]),
                       st.integers(max_value=-1).map(str))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=BAD_VALUES)
def test_random_bad_overrides_are_refused_before_any_work(key, value, workspace, capsys, monkeypatch):
    """Property: a malformed value for any of these keys is refused with one line naming the key; nothing runs."""
    if key == "eval.n_samples" and value == "null":
        return  # null is eval.n_samples's default: the dataset's own sample count
    line = refused(["distill", RING_CD, f"{key}={value}", "out=fresh"], workspace, capsys, monkeypatch)
    assert key.split(".")[-1] in line, line


def test_the_suite_covers_every_command_with_over_a_hundred_cases():
    counts = {"demo": len(DEMO_CASES), "distill": len(DISTILL_CASES), "teacher train": len(TEACHER_TRAIN_CASES),
              "sample": len(SAMPLE_CASES), "eval": len(EVAL_CASES), "bench": len(BENCH_CASES),
              "export": len(EXPORT_CASES), "levels": len(LEVELS_CASES), "unknown command": 4,
              "FEWSTEP_THREADS": 3}
    assert sum(counts.values()) >= 100 and all(counts.values())
