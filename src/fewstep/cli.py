"""``fewstep`` command line: parse, build, call the library. Bad input exits with status 2 and one line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fewstep.errors import FewstepError
from fewstep.teachers import TEACHER_TRAINING_STEPS

DEMO_OUT = "runs/demo"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and hasattr(args, "overrides") and all("=" in arg and not arg.startswith("-") for arg in unknown):
        args.overrides += unknown  # key=value overrides after an option: `distill RECIPE --quiet train.steps=9`
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        args.handler(args)
    except FewstepError as error:
        print(f"fewstep: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fewstep: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewstep", description="Distil diffusion/flow teachers into few-step "
                                     "students, measured against exact analytic teachers and real data.")
    commands = parser.add_subparsers(metavar="command")

    demo = commands.add_parser("demo", help="train or reuse the digits teacher, distil it, evaluate, report")
    demo.add_argument("--out", default=DEMO_OUT, help=f"output folder (default {DEMO_OUT})")
    demo.add_argument("overrides", nargs="*", help="recipe overrides key=value, e.g. train.steps=500")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=cmd_demo)

    teacher = commands.add_parser("teacher", help="teacher commands").add_subparsers(metavar="action")
    tt = teacher.add_parser("train", help="train a teacher on a built-in dataset")
    tt.add_argument("--dataset", default="digits")
    tt.add_argument("--backbone", default="mlp", choices=["mlp", "unet"])
    tt.add_argument("--backbone-args", type=json_object, default=None, metavar="JSON",
                    help="the backbone's constructor arguments as a recipe's teacher.backbone_args, e.g. "
                         "'{\"time_frequencies\": [0.1, 20]}' (the digits-scd teacher)")
    tt.add_argument("--steps", type=int, default=TEACHER_TRAINING_STEPS)
    tt.add_argument("--batch-size", type=int, default=256)
    tt.add_argument("--lr", type=float, default=1e-3)
    tt.add_argument("--label-dropout", type=float, default=0.1)
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--device", default="cpu", help="where to train, e.g. cuda (default cpu)")
    tt.add_argument("--out", default=None, help="model folder to write (default: the cache, reused by recipes)")
    tt.add_argument("--quiet", action="store_true")
    tt.set_defaults(handler=cmd_teacher_train)

    distill = commands.add_parser("distill", help="run a recipe: teacher -> student -> evaluation -> report")
    distill.add_argument("recipe", nargs="?", help="YAML recipe (see configs/); defaults give the demo job")
    distill.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method=pd train.steps=2000")
    distill.add_argument("--quiet", action="store_true")
    distill.add_argument("--num-processes", type=int, default=1, metavar="N",
                         help="train in N local processes (gloo on CPU, NCCL on GPU); train.batch_size is global")
    distill.set_defaults(handler=cmd_distill)

    sample = commands.add_parser("sample", help="draw samples from a saved teacher or student")
    sample.add_argument("--model", required=True, help="model folder (fewstep.json + model.safetensors)")
    sample.add_argument("--nfe", type=int, default=None, help="steps (students: one their fewstep.json lists)")
    sample.add_argument("-n", type=int, default=64)
    sample.add_argument("--label", type=int, default=None, help="class label (default: cycle through classes)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default="cpu", help="where to sample, e.g. cuda (default cpu)")
    sample.add_argument("--out", default="samples.png", help=".png (grid or scatter) or .pt (tensor)")
    sample.set_defaults(handler=cmd_sample)

    ev = commands.add_parser("eval", help="evaluate a teacher (NFE sweep) and students side by side")
    ev.add_argument("--dataset", default="digits")
    ev.add_argument("--teacher", default="train", help="'analytic', 'train' (cached) or a model folder")
    ev.add_argument("--student", action="append", default=[], help="student folder (repeatable)")
    ev.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4], help="student NFEs")
    ev.add_argument("--teacher-nfe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ev.add_argument("--n-samples", type=int, default=None)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="cpu", help="where the models sample and are timed, e.g. cuda")
    ev.add_argument("--json", default=None, help="write the report as JSON here")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(handler=cmd_eval)

    bench = commands.add_parser("bench", help="leaderboard: every method on the same teachers and budget")
    bench.add_argument("--suite", default="quick", choices=["quick", "full"],
                       help="quick (< 20 min on 2 cores) or full (< 3 h)")
    bench.add_argument("--methods", nargs="+", default=None, metavar="NAME", help="only these methods")
    bench.add_argument("--out", default="benchmarks", help="output folder (default benchmarks)")
    bench.add_argument("--json", default=None, help="JSON results path (default OUT/benchmarks.json)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.set_defaults(handler=cmd_bench)

    export = commands.add_parser("export", help="export a student: fewstep folder, diffusers pipeline or LoRA")
    export.add_argument("folder", help="a run folder (its student/) or a student folder")
    export.add_argument("--format", default="fewstep", choices=["fewstep", "diffusers", "lora"])
    export.add_argument("--out", required=True, help="output folder")
    export.set_defaults(handler=cmd_export)

    levels = commands.add_parser("levels", help="choose a consistency student's intermediate levels on the "
                                 "training split and save them with the student")
    levels.add_argument("folder", help="a run folder (its student/) or a student folder")
    levels.add_argument("--nfe", type=int, nargs="+", default=[2, 4], help="NFEs to choose levels for")
    levels.add_argument("--n-samples", type=int, default=None, help="samples per trial (default: the training "
                        "split, at most 5000)")
    levels.add_argument("--seed", type=int, default=101)
    levels.add_argument("--quiet", action="store_true")
    levels.set_defaults(handler=cmd_levels)

    methods = commands.add_parser("methods", help="list the registered methods")
    methods.set_defaults(handler=cmd_methods)
    return parser


def cmd_demo(args) -> None:
    from fewstep.config import load_recipe
    from fewstep.run import run_recipe

    recipe = load_recipe(None, [f"out={args.out}", *args.overrides])
    report = run_recipe(recipe, progress=not args.quiet)
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

        check_recipe(recipe)  # refuse a bad recipe once, before starting processes
        launch(_distill_process, (recipe, not args.quiet), args.num_processes)
        return
    _distill_process(recipe, not args.quiet)


def _distill_process(recipe, progress: bool) -> None:
    """One process of ``fewstep distill``; in a multi-process run only rank 0 gets a report to print."""
    from fewstep.run import run_recipe

    report = run_recipe(recipe, progress=progress)
    if report:
        _print_report(report, Path(recipe.out))


def _print_report(report: dict, out: Path) -> None:
    from fewstep.eval.evaluate import format_table

    print(format_table(report))
    print(f"\nwrote {out}/report.md, report.json, samples.png, quality_vs_nfe.png and the student in {out}/student")


def cmd_teacher_train(args) -> None:
    from fewstep.api import Teacher

    if args.out is None:
        teacher = Teacher.cached(args.dataset, args.backbone, args.backbone_args, args.steps, args.batch_size, args.lr,
                                 args.label_dropout, args.seed, progress=not args.quiet, device=args.device)
        print(f"teacher ready: {teacher.name}")
        return
    out = Path(args.out)
    teacher = Teacher.train(args.dataset, args.backbone, args.backbone_args, args.steps, args.batch_size, args.lr,
                            args.label_dropout, args.seed, run_dir=out.with_name(out.name + ".run"),
                            progress=not args.quiet, device=args.device)
    teacher.save(out)
    print(f"wrote teacher to {out}")


def cmd_sample(args) -> None:
    from fewstep.api import Student, Teacher
    from fewstep.errors import ConfigError
    from fewstep.eval.plots import sample_grid, scatter_2d
    from fewstep.models.io import load_model
    from fewstep.solvers import DEFAULT_TEACHER_NFE

    _, meta = load_model(args.model)
    if meta.get("role") == "student":
        model = Student.load(args.model)
        nfe = args.nfe if args.nfe is not None else min(model.sampling)
        dataset = model.dataset
    else:
        model = Teacher.load(args.model)
        nfe = args.nfe if args.nfe is not None else DEFAULT_TEACHER_NFE
        dataset = model.dataset
    if args.n < 1:
        raise ConfigError(f"-n must be at least 1, got {args.n}")
    model.denoiser.to(torch_device(args.device))
    label = None
    if dataset.num_classes:
        if args.label is not None and not 0 <= args.label < dataset.num_classes:
            raise ConfigError(f"--label must be in [0, {dataset.num_classes}), got {args.label}")
        label = torch.full((args.n,), args.label) if args.label is not None else torch.arange(args.n) % \
            dataset.num_classes
    if meta.get("role") == "student":
        x = model.sample(args.n, nfe, label=label, seed=args.seed)
    else:
        x = model.sample(args.n, "heun", nfe, label=label, seed=args.seed)
    x = x.cpu()
    out = Path(args.out)
    if out.suffix == ".pt":
        torch.save(x, out)
    elif dataset.kind == "images":
        sample_grid(x, out)
    else:
        scatter_2d({f"{Path(args.model).name} @{nfe}": x}, out, reference=dataset.ref_x[: args.n])
    print(f"wrote {args.n} samples ({nfe} NFE) to {out}")


def json_object(text: str) -> dict:
    """An argparse type: a JSON object (its keys name arguments)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error.msg} at character {error.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"needs a JSON object such as '{{\"key\": 1}}', got {text!r}")
    return value


def torch_device(name: str) -> torch.device:
    """A ``--device`` value: a device this machine has, else one ConfigError naming the flag."""
    from fewstep.errors import ConfigError

    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"--device {name!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: CUDA is not available here (torch {torch.__version__})")
    return device


def cmd_eval(args) -> None:
    from fewstep.api import Student, Teacher, evaluate_models
    from fewstep.eval.evaluate import best_teacher, finest_teacher, format_table, ratios_to_teacher, write_json

    if args.teacher == "analytic":
        teacher = Teacher.analytic(args.dataset)
    elif args.teacher == "train":
        teacher = Teacher.cached(args.dataset, progress=not args.quiet)
    else:
        teacher = Teacher.load(args.teacher, args.dataset)
    students = [Student.load(folder) for folder in args.student]
    device = torch_device(args.device)
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
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")


def cmd_bench(args) -> None:
    from fewstep.bench import SUITES, run_bench, select_methods

    methods = select_methods(args.methods)
    command = f"fewstep bench --suite {args.suite}" + (f" --methods {' '.join(args.methods)}" if args.methods
                                                       else "") + (f" --seed {args.seed}" if args.seed else "")
    report = run_bench(SUITES[args.suite], args.out, methods, name=args.suite, json_path=args.json,
                       seed=args.seed, progress=not args.quiet, command=command)
    json_path = args.json or f"{args.out}/benchmarks.json"
    print(f"wrote {args.out}/BENCHMARKS.md, {json_path} and plots in {report['wall_seconds']:.0f} s")


def cmd_export(args) -> None:
    from fewstep.api import Student
    from fewstep.hub.export import export_student

    folder = Path(args.folder)
    student = Student.load(folder if (folder / "fewstep.json").is_file() else folder / "student")
    export_student(student, args.out, args.format)
    print(f"wrote {args.format} export to {args.out}")


def cmd_levels(args) -> None:
    from fewstep.api import Student
    from fewstep.eval.levels import tune_levels

    folder = Path(args.folder)
    folder = folder if (folder / "fewstep.json").is_file() else folder / "student"
    student = Student.load(folder)
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
