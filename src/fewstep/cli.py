"""``fewstep`` command line: parse, check, then build and call the library.

Every check that needs no training runs before any work and before anything is written; a bad input exits with
status 2 and one line naming what to fix (argparse's own errors included), never a traceback."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from fewstep.data import DATASETS
from fewstep.errors import ConfigError, FewstepError
from fewstep.teachers import TEACHER_TRAINING_STEPS
from fewstep.threads import start_sharing

DEMO_OUT = "runs/demo"
MAX_SAMPLES = 200_000  # the most samples one command draws at once


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: ``fewstep <command>: error: <what>`` (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    if unknown and hasattr(args, "overrides") and all("=" in arg and not arg.startswith("-") for arg in unknown):
        args.overrides += unknown  # key=value overrides after an option: `distill RECIPE --quiet train.steps=9`
    elif unknown:
        print(f"fewstep: error: unrecognized arguments: {' '.join(unknown)} (see fewstep --help)", file=sys.stderr)
        return 2
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        start_sharing()  # FEWSTEP_THREADS applied (a bad value refused) before any work
        args.handler(args)
    except FewstepError as error:
        print(f"fewstep: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fewstep: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[low, high]``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


def number(low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be a number in {'(' if low_open else '['}{low:g}, {high:g}], "
                                             f"got {text}")
        return value
    return parse


def json_object(text: str) -> dict:
    """An argparse type: a JSON object (its keys name arguments)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error.msg} at character {error.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"needs a JSON object such as '{{\"key\": 1}}', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fewstep", description="Distil diffusion/flow teachers into few-step "
                    "students, measured against exact analytic teachers and real data.")
    commands = parser.add_subparsers(metavar="command", parser_class=Parser)
    count = integer(1, MAX_SAMPLES)

    demo = commands.add_parser("demo", help="train or reuse the digits teacher, distil it, evaluate, report")
    demo.add_argument("--out", default=DEMO_OUT, help=f"output folder (default {DEMO_OUT})")
    demo.add_argument("overrides", nargs="*", help="recipe overrides key=value, e.g. train.steps=500")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--resume-changed", action="store_true",
                      help="resume a run in --out even though its recipe has changed since it started")
    demo.set_defaults(handler=cmd_demo)

    teacher = commands.add_parser("teacher", help="teacher commands").add_subparsers(metavar="action",
                                                                                      parser_class=Parser)
    tt = teacher.add_parser("train", help="train a teacher on a built-in dataset")
    tt.add_argument("--dataset", default="digits", choices=sorted(DATASETS))
    tt.add_argument("--backbone", default="mlp", choices=["mlp", "unet"])
    tt.add_argument("--backbone-args", type=json_object, default=None, metavar="JSON",
                    help="the backbone's constructor arguments as a recipe's teacher.backbone_args, e.g. "
                         "'{\"time_frequencies\": [0.1, 20]}' (the digits-scd teacher)")
    tt.add_argument("--steps", type=integer(1, 10_000_000), default=TEACHER_TRAINING_STEPS)
    tt.add_argument("--batch-size", type=integer(1, 1_000_000), default=256)
    tt.add_argument("--lr", type=number(0.0, 1.0, low_open=True), default=1e-3)
    tt.add_argument("--label-dropout", type=number(0.0, 0.999), default=0.1)
    tt.add_argument("--seed", type=integer(0), default=0)
    tt.add_argument("--device", default="cpu", help="where to train, e.g. cuda (default cpu)")
    tt.add_argument("--out", default=None, help="model folder to write (default: the cache, reused by recipes)")
    tt.add_argument("--overwrite", action="store_true", help="replace a teacher fewstep wrote in --out before")
    tt.add_argument("--quiet", action="store_true")
    tt.set_defaults(handler=cmd_teacher_train)

    distill = commands.add_parser("distill", help="run a recipe: teacher -> student -> evaluation -> report")
    distill.add_argument("recipe", nargs="?", help="YAML recipe (see configs/); defaults give the demo job")
    distill.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method=pd train.steps=2000")
    distill.add_argument("--quiet", action="store_true")
    distill.add_argument("--num-processes", type=integer(1, 1024), default=1, metavar="N",
                         help="train in N local processes (gloo on CPU, NCCL on GPU); train.batch_size is global")
    distill.add_argument("--resume-changed", action="store_true",
                         help="resume a run in `out` even though its recipe has changed since it started")
    distill.set_defaults(handler=cmd_distill)

    sample = commands.add_parser("sample", help="draw samples from a saved teacher or student")
    sample.add_argument("--model", required=True, help="model folder (fewstep.json + model.safetensors)")
    sample.add_argument("--nfe", type=integer(1, 10_000), default=None,
                        help="steps (students: one their fewstep.json lists)")
    sample.add_argument("-n", type=count, default=64)
    sample.add_argument("--label", type=integer(0), default=None,
                        help="class label (default: cycle through classes)")
    sample.add_argument("--seed", type=integer(0), default=0)
    sample.add_argument("--device", default="cpu", help="where to sample, e.g. cuda (default cpu)")
    sample.add_argument("--out", default="samples.png", help=".png (grid or scatter) or .pt (tensor)")
    sample.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    sample.set_defaults(handler=cmd_sample)

    ev = commands.add_parser("eval", help="evaluate a teacher (NFE sweep) and students side by side")
    ev.add_argument("--dataset", default="digits", choices=sorted(DATASETS))
    ev.add_argument("--teacher", default="train", help="'analytic', 'train' (cached) or a model folder")
    ev.add_argument("--student", action="append", default=[], help="student folder (repeatable)")
    ev.add_argument("--nfe", type=integer(1, 10_000), nargs="+", default=[1, 2, 4], help="student NFEs")
    ev.add_argument("--teacher-nfe", type=integer(1, 10_000), nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ev.add_argument("--n-samples", type=integer(2, MAX_SAMPLES), default=None)
    ev.add_argument("--seed", type=integer(0), default=0)
    ev.add_argument("--device", default="cpu", help="where the models sample and are timed, e.g. cuda")
    ev.add_argument("--json", default=None, help="write the report as JSON here")
    ev.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(handler=cmd_eval)

    bench = commands.add_parser("bench", help="leaderboard: every method on the same teachers and budget")
    bench.add_argument("--suite", default="quick", choices=["quick", "full"],
                       help="quick (< 20 min on 2 cores) or full (< 3 h)")
    bench.add_argument("--methods", nargs="+", default=None, metavar="NAME", help="only these methods")
    bench.add_argument("--out", default="benchmarks", help="output folder (default benchmarks)")
    bench.add_argument("--json", default=None, help="JSON results path (default OUT/benchmarks.json)")
    bench.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    bench.add_argument("--seed", type=integer(0), default=0)
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.set_defaults(handler=cmd_bench)

    export = commands.add_parser("export", help="export a student: fewstep folder, diffusers pipeline or LoRA")
    export.add_argument("folder", help="a run folder (its student/) or a student folder")
    export.add_argument("--format", default="fewstep", choices=["fewstep", "diffusers", "lora"])
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--overwrite", action="store_true", help="replace an export of this format in --out")
    export.set_defaults(handler=cmd_export)

    levels = commands.add_parser("levels", help="choose a consistency student's intermediate levels on the "
                                 "training split and save them with the student")
    levels.add_argument("folder", help="a run folder (its student/) or a student folder")
    levels.add_argument("--nfe", type=integer(2, 64), nargs="+", default=[2, 4], help="NFEs to choose levels for")
    levels.add_argument("--n-samples", type=integer(2, MAX_SAMPLES), default=None,
                        help="samples per trial (default: the training split, at most 5000)")
    levels.add_argument("--seed", type=integer(0), default=101)
    levels.add_argument("--quiet", action="store_true")
    levels.set_defaults(handler=cmd_levels)

    methods = commands.add_parser("methods", help="list the registered methods")
    methods.set_defaults(handler=cmd_methods)
    return parser


def cmd_demo(args) -> None:
    from fewstep.config import load_recipe
    from fewstep.run import run_recipe

    recipe = load_recipe(None, [*args.overrides, f"out={args.out}"])
    report = run_recipe(recipe, progress=not args.quiet, resume_changed=args.resume_changed)
    _print_report(report, Path(recipe.out))


def cmd_distill(args) -> None:
    from fewstep.config import load_recipe
    from fewstep.run import check_recipe

    recipe_path, overrides = args.recipe, list(args.overrides)
    if recipe_path is not None and "=" in recipe_path and not Path(recipe_path).exists():
        recipe_path, overrides = None, [recipe_path, *overrides]
    recipe = load_recipe(recipe_path, overrides)
    if args.num_processes != 1:
        from fewstep.train.parallel import launch

        check_recipe(recipe, args.resume_changed)  # refuse a bad recipe once, before starting processes
        launch(_distill_process, (recipe, not args.quiet, args.resume_changed), args.num_processes)
        return
    _distill_process(recipe, not args.quiet, args.resume_changed)


def _distill_process(recipe, progress: bool, resume_changed: bool) -> None:
    """One process of ``fewstep distill``; in a multi-process run only rank 0 gets a report to print."""
    from fewstep.run import run_recipe

    report = run_recipe(recipe, progress=progress, resume_changed=resume_changed)
    if report:
        _print_report(report, Path(recipe.out))


def _print_report(report: dict, out: Path) -> None:
    from fewstep.eval.evaluate import format_table

    if report.get("kind") == "text_to_image":
        print((out / "report.md").read_text())
        return
    print(format_table(report))
    print(f"\nwrote {out}/report.md, report.json, samples.png, quality_vs_nfe.png and the student in {out}/student")


def cmd_teacher_train(args) -> None:
    from fewstep.outputs import claim, sibling
    from fewstep.teachers import Teacher, as_dataset, check_backbone_args

    device = torch_device(args.device)
    check_backbone_args(as_dataset(args.dataset), args.backbone, args.backbone_args, "--backbone-args")
    if args.out is None:
        teacher = Teacher.cached(args.dataset, args.backbone, args.backbone_args, args.steps, args.batch_size, args.lr,
                                 args.label_dropout, args.seed, progress=not args.quiet, device=str(device))
        print(f"teacher ready: {teacher.name}")
        return
    out = claim(args.out, "teacher", args.overwrite)
    teacher = Teacher.train(args.dataset, args.backbone, args.backbone_args, args.steps, args.batch_size, args.lr,
                            args.label_dropout, args.seed, run_dir=claim(sibling(out, "run"), "run"),
                            progress=not args.quiet, device=str(device))
    teacher.save(out)
    print(f"wrote teacher to {out}")


def cmd_sample(args) -> None:
    from fewstep.eval.plots import sample_grid, scatter_2d
    from fewstep.outputs import claim_file
    from fewstep.solvers import DEFAULT_TEACHER_NFE
    from fewstep.student import Student
    from fewstep.teachers import Teacher, model_role

    out = claim_file(args.out, (".png", ".pt"), args.overwrite)
    device = torch_device(args.device)
    is_student = model_role(args.model) == "student"
    model = Student.load(args.model) if is_student else Teacher.load(args.model)
    dataset = model.dataset
    if is_student:
        nfe = args.nfe if args.nfe is not None else min(model.sampling)
        if nfe not in model.sampling:
            raise ConfigError(f"--nfe {nfe}: this {model.method} student samples at {sorted(model.sampling)}")
    else:
        nfe = args.nfe if args.nfe is not None else DEFAULT_TEACHER_NFE
    label = None
    if args.label is not None and not dataset.num_classes:
        raise ConfigError(f"--label: {args.model} is unconditional (its dataset {dataset.name} has no classes)")
    if dataset.num_classes:
        if args.label is not None and args.label >= dataset.num_classes:
            raise ConfigError(f"--label must be in [0, {dataset.num_classes}), got {args.label}")
        label = torch.full((args.n,), args.label) if args.label is not None else torch.arange(args.n) % \
            dataset.num_classes
    model.denoiser.to(device)
    if is_student:
        x = model.sample(args.n, nfe, label=label, seed=args.seed)
    else:
        x = model.sample(args.n, "heun", nfe, label=label, seed=args.seed)
    x = x.cpu()
    if out.suffix.lower() == ".pt":
        torch.save(x, out)
    elif dataset.kind == "images":
        sample_grid(x, out)
    else:
        scatter_2d({f"{Path(args.model).name} @{nfe}": x}, out, reference=dataset.ref_x[: args.n])
    print(f"wrote {args.n} samples ({nfe} NFE) to {out}")


def torch_device(name: str) -> torch.device:
    """A ``--device`` value: a device this machine has, else one ConfigError naming the flag."""
    from fewstep.config import check_device

    return check_device(name, "--device")


def cmd_eval(args) -> None:
    from fewstep.eval.evaluate import (
        best_teacher,
        evaluate_models,
        finest_teacher,
        format_table,
        ratios_to_teacher,
        write_json,
    )
    from fewstep.outputs import claim_file
    from fewstep.student import Student
    from fewstep.teachers import Teacher, as_dataset

    dataset = as_dataset(args.dataset)
    json_path = claim_file(args.json, (".json",), args.overwrite) if args.json else None
    device = torch_device(args.device)
    students = [Student.load(folder, dataset) for folder in args.student]  # checked before a teacher trains
    for folder, student in zip(args.student, students, strict=True):
        missing = sorted(set(args.nfe) - set(student.sampling))
        if missing:
            raise ConfigError(f"--nfe {missing[0]}: student {folder} samples at {sorted(student.sampling)}")
    if args.teacher == "analytic":
        teacher = Teacher.analytic(dataset)
    elif args.teacher == "train":
        teacher = Teacher.cached(dataset, progress=not args.quiet)
    else:
        teacher = Teacher.load(args.teacher, dataset)
    for model in (teacher, *students):
        model.denoiser.to(device)
    report = evaluate_models(teacher, students, tuple(args.nfe), tuple(args.teacher_nfe),
                             n_samples=args.n_samples, seed=args.seed, progress=not args.quiet, device=device)
    print(format_table(report))
    results, metric = report["results"], report["quality_metric"]
    student_rows = [row for row in results if row["role"] == "student"]
    best, finest = best_teacher(results, metric), finest_teacher(results, metric)
    if student_rows and best is not None:
        print(f"\nteacher's best: {best['name']}; its finest solve: {finest['name']}")
        for row in student_rows:
            print(f"{row['name']}{ratios_to_teacher(row, results, metric)}")
    if json_path is not None:
        write_json(report, json_path)
        print(f"wrote {json_path}")


def cmd_bench(args) -> None:
    from fewstep.bench import SUITES, run_bench, select_methods
    from fewstep.outputs import claim, claim_file

    methods = select_methods(args.methods)
    out = claim(args.out, "bench")
    if args.json is not None:
        claim_file(args.json, (".json",), args.overwrite)
    command = f"fewstep bench --suite {args.suite}" + (f" --methods {' '.join(args.methods)}" if args.methods
                                                       else "") + (f" --seed {args.seed}" if args.seed else "")
    report = run_bench(SUITES[args.suite], out, methods, name=args.suite, json_path=args.json,
                       seed=args.seed, progress=not args.quiet, command=command)
    json_path = args.json or f"{out}/benchmarks.json"
    print(f"wrote {out}/BENCHMARKS.md, {json_path} and plots in {report['wall_seconds']:.0f} s")


def student_folder(folder: str) -> Path:
    """A student folder: ``folder`` itself, or the ``student/`` of a run folder; one error naming ``folder``."""
    path = Path(folder)
    if (path / "fewstep.json").is_file():
        return path
    if (path / "student" / "fewstep.json").is_file():
        return path / "student"
    raise ConfigError(f"{folder} is neither a student folder nor a run folder with a student/ in it")


def cmd_export(args) -> None:
    from fewstep.outputs import EXPORT_KINDS, claim
    from fewstep.student import Student

    folder = student_folder(args.folder)
    claim(args.out, EXPORT_KINDS[args.format], args.overwrite)
    student = Student.load(folder)
    if args.format == "fewstep":
        student.save(args.out)  # a fewstep folder needs no diffusers
    else:
        from fewstep.hub.export import export_student

        export_student(student, args.out, args.format, args.overwrite)
    print(f"wrote {args.format} export to {args.out}")


def cmd_levels(args) -> None:
    from fewstep.eval.levels import check_tunable, tune_levels
    from fewstep.student import Student

    folder = student_folder(args.folder)
    student = Student.load(folder)
    for nfe in args.nfe:
        if nfe not in student.sampling:
            raise ConfigError(f"--nfe {nfe}: this {student.method} student samples at {sorted(student.sampling)}")
        check_tunable(student.sampling[nfe], student.method, nfe, "--nfe")
    trace = tune_levels(student, args.nfe, args.n_samples, args.seed, progress=not args.quiet)
    student.save(folder)
    for nfe, found in trace.items():
        print(f"{nfe} NFE: levels {_levels_text(found['default_levels'])} -> {_levels_text(found['levels'])}; "
              f"{found['metric']} on the training split {found['default_score']:.4g} -> {found['score']:.4g}")
    print(f"saved the chosen levels in {folder}")


def _levels_text(levels: list[float]) -> str:
    return "[" + ", ".join(f"{s:.3g}" for s in levels) + "]"


def cmd_methods(args) -> None:
    from fewstep.run import describe_methods

    print(describe_methods())


if __name__ == "__main__":
    raise SystemExit(main())
