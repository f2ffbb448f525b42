"""One distillation job from a recipe: teacher -> distil -> evaluate -> report, with files written to ``out``.

This is what ``fewstep distill`` and ``fewstep demo`` run. Everything a user can get wrong in the recipe is
checked by :func:`check_recipe` before any file is written.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import torch

from fewstep.config import (
    DataRecipe,
    Recipe,
    StudentRecipe,
    TeacherRecipe,
    build_dataclass,
    check_device,
    recipe_to_dict,
)
from fewstep.data import load_dataset
from fewstep.data.batch import NEEDS
from fewstep.data.images import check_images
from fewstep.data.prompts import read_prompts
from fewstep.data.spec import DatasetSpec
from fewstep.errors import ConfigError
from fewstep.eval.clip import ClipFeatures, clip_frechet_distance, clip_score
from fewstep.eval.evaluate import (
    best_at_nfe,
    best_teacher,
    evaluate_models,
    finest_teacher,
    format_table,
    ratios_to_teacher,
    write_json,
)
from fewstep.eval.levels import check_tunable, tune_levels
from fewstep.eval.plots import compare_grids, quality_vs_nfe, scatter_2d
from fewstep.guidance import CONVENTIONS, cfg_weight
from fewstep.methods import METHODS
from fewstep.models.io import check_model_files
from fewstep.outputs import claim, mark
from fewstep.pipeline import check_method, distill, method_args_for, method_class, new_method
from fewstep.solvers import DEFAULT_TEACHER_NFE, TEACHER_SOLVERS
from fewstep.student import Student
from fewstep.teachers import Teacher, check_backbone_args, check_dataset, model_role
from fewstep.train.monitor import MIN_SAMPLES, SampleMonitor
from fewstep.train.trainer import accelerator_for

# What may change between the legs of one run (rerunning into the same `out` resumes it): train longer, log or
# checkpoint at another pace, evaluate differently. Any other change would continue one run under another recipe.
RESUMABLE_CHANGES = ("train.steps", "train.max_seconds", "train.log_every", "train.checkpoint_every", "eval.", "out")
MAX_EVAL_SAMPLES = 200_000
RECIPE_FILE = "recipe.json"


def is_pipeline_folder(source: str) -> bool:
    """Whether a teacher source is a diffusers pipeline folder (a text-to-image job)."""
    return (Path(source) / "model_index.json").is_file()


def check_recipe(recipe: Recipe, resume_changed: bool = False) -> None:
    """Refuse a recipe that cannot run, naming the key to fix, before any teacher is trained and before anything is
    written: dataset, method and its arguments (checked by the method itself), teacher, guidance, training and
    evaluation settings, the student network, and the output folder (new, empty, or this recipe's earlier run;
    an earlier run of another recipe only with ``resume_changed``). A diffusers pipeline folder as teacher makes a
    text-to-image job (:func:`check_text_job`)."""
    if is_pipeline_folder(recipe.teacher.source):
        check_text_job(recipe)
        _check_train(recipe)
        _check_same_recipe(recipe, claim(recipe.out, "run"), resume_changed)
        return
    if recipe.data != DataRecipe() or recipe.student != StudentRecipe() or recipe.eval.encoder is not None:
        raise ConfigError("data.*, student.lora_rank and eval.encoder are for text-to-image jobs: set teacher.source "
                          "to a diffusers pipeline folder (one with model_index.json)")
    dataset = load_dataset(recipe.dataset)
    try:
        check_method(recipe.method, recipe.method_args, dataset, recipe.train.steps)
    except ConfigError as error:
        raise ConfigError(f"method: {error}" if not str(error).startswith("method_args") else str(error)) from None
    _check_teacher(recipe, dataset)
    _check_train(recipe)
    _check_eval(recipe, dataset)
    if recipe.student_backbone_args:
        check_backbone_args(dataset, "mlp", recipe.student_backbone_args, "student_backbone_args")
    out = claim(recipe.out, "run")
    _check_same_recipe(recipe, out, resume_changed)


def _check_teacher(recipe: Recipe, dataset: DatasetSpec) -> None:
    spec = recipe.teacher
    if spec.source == "analytic" and dataset.analytic is None:
        raise ConfigError(f"teacher.source: dataset {dataset.name!r} has no analytic teacher; use 'train' or a "
                          "model folder")
    if spec.source == "train":
        check_backbone_args(dataset, spec.backbone, spec.backbone_args, "teacher.backbone_args")
    elif spec.source != "analytic":
        if not Path(spec.source).exists():
            raise ConfigError(f"teacher.source: no model folder at {spec.source!r} (or use 'analytic' / 'train')")
        if model_role(spec.source) != "teacher":
            raise ConfigError(f"teacher.source: {spec.source} holds a fewstep student, not a teacher")
        check_dataset(check_model_files(spec.source), dataset, spec.source)
    if spec.guidance_convention not in CONVENTIONS:
        raise ConfigError(f"teacher.guidance_convention must be one of {CONVENTIONS}")
    if not math.isfinite(spec.guidance_scale):
        raise ConfigError(f"teacher.guidance_scale must be a finite number, got {spec.guidance_scale}")
    if dataset.num_classes == 0 and cfg_weight(spec.guidance_scale, spec.guidance_convention) != 1.0:
        raise ConfigError(f"teacher.guidance_scale: dataset {dataset.name!r} has no classes to guide with; leave "
                          "the scale at its plain value (1 for 'cfg', 0 for 'cfg_plus_one')")


def _check_train(recipe: Recipe) -> None:
    train = recipe.train
    if train.steps < 1:
        raise ConfigError(f"train.steps must be at least 1, got {train.steps}")
    if not 0 < train.lr <= 1:
        raise ConfigError(f"train.lr must be a number in (0, 1], got {train.lr}")
    if train.seed < 0 or recipe.eval.seed < 0:
        raise ConfigError(f"train.seed and eval.seed must be >= 0, got {train.seed} and {recipe.eval.seed}")
    check_device(train.device, "train.device")


def _check_eval(recipe: Recipe, dataset: DatasetSpec) -> None:
    ev = recipe.eval
    unknown = [s for s in ev.teacher_solvers if s not in TEACHER_SOLVERS]
    if unknown:
        raise ConfigError(f"eval.teacher_solvers: unknown solver {unknown[0]!r}; choose from {TEACHER_SOLVERS}")
    if not ev.student_nfe or any(n < 1 for n in ev.student_nfe + ev.teacher_nfe):
        raise ConfigError("eval.student_nfe (at least one) and eval.teacher_nfe must be positive integers")
    if ev.n_samples is not None and not 2 <= ev.n_samples <= MAX_EVAL_SAMPLES:
        raise ConfigError(f"eval.n_samples must be in [2, {MAX_EVAL_SAMPLES}], got {ev.n_samples}")
    if ev.conditional and dataset.num_classes == 0:
        raise ConfigError(f"eval.conditional: dataset {dataset.name!r} has no classes")
    if ev.monitor_every < 0 or ev.monitor_samples < MIN_SAMPLES:
        raise ConfigError(f"eval.monitor_every must be >= 0 (0: no monitor) and eval.monitor_samples >= "
                          f"{MIN_SAMPLES}")
    if ev.tune_levels:  # the samplers a method uses, from a stand-in of it on the CPU
        method = check_method(recipe.method, recipe.method_args, dataset, recipe.train.steps, device="cpu")
        for nfe in (nfe for nfe in ev.student_nfe if nfe > 1):
            check_tunable(method.sampling(nfe), recipe.method, nfe, "eval.tune_levels")


def _check_same_recipe(recipe: Recipe, out: Path, resume_changed: bool) -> None:
    """Refuse to continue the run in ``out`` under a changed recipe (listing the changes) unless asked to."""
    try:
        earlier = json.loads((out / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return
    now = _flatten(json.loads(json.dumps(recipe_to_dict(recipe))))
    before = _flatten(earlier)
    changed = [key for key in sorted(set(now) | set(before)) if now.get(key) != before.get(key)
               and not key.startswith(RESUMABLE_CHANGES)]
    if changed and not resume_changed:
        shown = ", ".join(f"{key} {before.get(key)!r} -> {now.get(key)!r}" for key in changed[:4])
        raise ConfigError(f"{out} holds a run of another recipe ({shown}{', ...' if len(changed) > 4 else ''}): "
                          "use another out, or pass --resume-changed to continue it under this one")


def _flatten(tree: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (a method's arguments stay one value per key)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key in ("teacher", "train", "eval", "method_args", "data", "student"):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resolve_teacher(spec: TeacherRecipe, dataset: str, seed: int = 0, device: str = "cpu",
                    progress: bool = True) -> Teacher:
    """A recipe's teacher (its ``teacher`` section) for ``dataset``: analytic, trained with ``seed`` on ``device``
    (cached by recipe), or loaded from a folder; with its guidance."""
    if spec.source == "analytic":
        teacher = Teacher.analytic(dataset)
    elif spec.source == "train":
        teacher = Teacher.cached(dataset, spec.backbone, spec.backbone_args, spec.steps, spec.batch_size, spec.lr,
                                 spec.label_dropout, seed, progress=progress, device=device)
    else:
        teacher = Teacher.load(spec.source, dataset)
    return teacher.with_guidance(spec.guidance_scale, spec.guidance_convention)


def check_text_job(recipe: Recipe) -> None:
    """A text-to-image job's own checks: the pipeline folder and its components, the prompt file or image folder,
    the method and its arguments, the LoRA rank and the resolution (nothing is loaded or written)."""
    from fewstep.hub.pipelines import pipeline_kind  # imports diffusers

    pipeline_kind(recipe.teacher.source)
    data = recipe.data
    if data.prompts is None and data.images is None:
        raise ConfigError("a text-to-image job needs data.prompts (a .txt, .csv or .jsonl prompt file, or a saved "
                          "dataset) or data.images (a folder of captioned images, or a saved dataset)")
    if data.prompts is not None:
        read_prompts(data.prompts)
    if data.images is not None:
        check_images(data.images)
    if recipe.student.lora_rank is not None and recipe.student.lora_rank < 1:
        raise ConfigError(f"student.lora_rank must be a positive integer, got {recipe.student.lora_rank}")
    if data.resolution is not None and data.resolution < 1:
        raise ConfigError(f"data.resolution must be a positive number of pixels, got {data.resolution}")
    method = method_class(recipe.method)
    if "data" in method.needs and data.images is None:
        raise ConfigError(f"method {method.name} trains on real data: give data.images (a folder of captioned "
                          "images), or choose a data-free method (fewstep methods lists their needs)")
    build_dataclass(method.Config, method_args_for(method, recipe.method_args, recipe.train.steps), "method_args")
    if recipe.eval.encoder is not None and not (Path(recipe.eval.encoder) / "config.json").is_file():
        raise ConfigError(f"eval.encoder: {recipe.eval.encoder} is not a saved CLIP model folder (no config.json)")
    if recipe.eval.n_samples is not None and recipe.eval.n_samples < 1:
        raise ConfigError(f"eval.n_samples must be positive, got {recipe.eval.n_samples}")


def run_text_job(recipe: Recipe, progress: bool = True, resume_changed: bool = False) -> dict:
    """A text-to-image job (:func:`run_recipe` with a pipeline folder as teacher): distil on the pipeline's latents,
    export the student (``out/lora`` with a LoRA student, else ``out/student``; ``out/pipeline`` always), and
    compare it with the teacher on the same prompts and noise (``report.json``, ``report.md``, ``samples.png``)."""
    started = time.perf_counter()
    data, out = recipe.data, Path(recipe.out)
    teacher = Teacher.from_pipeline(recipe.teacher.source, data.prompts, data.images, data.negative_prompt,
                                    recipe.teacher.guidance_scale, data.resolution)
    method = new_method(teacher, recipe.method, recipe.method_args, None, recipe.train, recipe.student.lora_rank)
    mark(out, "run")
    (out / RECIPE_FILE).write_text(json.dumps(recipe_to_dict(recipe), indent=2) + "\n")
    student = distill(teacher, method, train_config=recipe.train, run_dir=out / "run",
                      nfe=tuple(recipe.eval.student_nfe), progress=progress, allow_changes=resume_changed)
    from fewstep.hub import export_student

    exports = ["lora" if recipe.student.lora_rank else "fewstep", "diffusers"]
    folders = {"lora": "lora", "fewstep": "student", "diffusers": "pipeline"}
    for kind in exports:
        export_student(student, out / folders[kind], kind, overwrite=True)
    report = compare_with_teacher(teacher, student, recipe, out)
    report["exports"] = {kind: str(out / folders[kind]) for kind in exports}
    report["wall_seconds"] = {"total": time.perf_counter() - started}
    report["training"] = {"steps": student.train_result.steps_done, "seconds": student.train_result.seconds,
                          **student.train_result.evals()}
    write_json(report, out / "report.json")
    (out / "report.md").write_text(text_job_markdown(report))
    return report


@torch.no_grad()
def compare_with_teacher(teacher: Teacher, student: Student, recipe: Recipe, out: Path) -> dict:
    """The student against the teacher's finely solved ODE (Heun at the largest ``eval.teacher_nfe``) on the same
    prompts and noise: root-mean-square distance of latents and of decoded pixels (in [-1, 1]) per student NFE,
    and ``samples.png`` (teacher's row, then one row per NFE)."""
    from fewstep.hub.pipelines import PIPELINES, LatentCodec

    conditions = teacher.dataset.conditions
    n = min(recipe.eval.n_samples or 8, len(conditions))
    cond = conditions[:n]
    noise = torch.randn((n, *teacher.dataset.data_shape), generator=torch.Generator().manual_seed(recipe.eval.seed))
    reference_nfe = max(recipe.eval.teacher_nfe)
    reference = teacher.sample(n, "heun", reference_nfe, noise=noise, cond=cond).cpu()
    codec = LatentCodec(teacher.pipeline.vae)
    panels = {f"teacher heun@{reference_nfe}": codec.decode(reference).float()}
    rows = []
    for nfe in recipe.eval.student_nfe:
        latents = student.sample(n, nfe, noise=noise, cond=cond, seed=recipe.eval.seed).cpu()
        pixels = codec.decode(latents).float()
        panels[f"{student.method} @{nfe}"] = pixels
        rows.append({"nfe": nfe, "latent_rmse": float((latents - reference).pow(2).mean().sqrt()),
                     "pixel_rmse": float((pixels - panels[f"teacher heun@{reference_nfe}"]).pow(2).mean().sqrt())})
    compare_grids({name: images.clamp(-1, 1) for name, images in panels.items()}, out / "samples.png")
    pipeline = type(teacher.pipeline).__name__
    report = {"kind": "text_to_image", "model": teacher.name, "pipeline": pipeline,
              "pipeline_scales_noise": PIPELINES[pipeline].scales_input, "method": student.method,
              "reference": f"heun@{reference_nfe}", "prompts": n, "results": rows}
    if recipe.eval.encoder is not None:
        clip = ClipFeatures(recipe.eval.encoder)
        texts = clip.texts(teacher.dataset.prompts[:n])
        features = {name: clip.images(pixels) for name, pixels in panels.items()}
        reference_features = features.pop(f"teacher heun@{reference_nfe}")
        report["clip_score_teacher"] = clip_score(reference_features, texts)
        for row, image_features in zip(rows, features.values(), strict=True):
            row["clip_score"] = clip_score(image_features, texts)
            row["clip_fd"] = clip_frechet_distance(image_features, reference_features)
    return report


def text_job_markdown(report: dict) -> str:
    lines = [f"# fewstep report: {report['method']} from `{report['model']}`", "",
             f"Student against the teacher's {report['reference']} on the same {report['prompts']} prompts and noise "
             "(root-mean-square distances; 0 means identical).", "", "| NFE | latent RMSE | pixel RMSE |",
             "|---|---|---|"]
    lines += [f"| {row['nfe']} | {row['latent_rmse']:.4g} | {row['pixel_rmse']:.4g} |" for row in report["results"]]
    if "clip_score_teacher" in report:
        lines += ["", f"CLIP score (local encoder): teacher {report['clip_score_teacher']:.2f}; "
                  + "; ".join(f"student @{row['nfe']} {row['clip_score']:.2f} (Fréchet distance to the teacher's "
                              f"images {row['clip_fd']:.4g})" for row in report["results"])
                  + f". With {report['prompts']} images the Fréchet distance is only indicative: raise eval.n_samples."]
    training = report["training"]
    lines += ["", f"Training: {training['steps']} steps in {training['seconds']:.0f} s, "
              f"{training['teacher_evals'] or 0:,} teacher evaluations, {other_evals(training)}.", "",
              f"Exports: {', '.join(f'{kind} in `{path}`' for kind, path in report['exports'].items())}.", "",
              *([] if report["pipeline_scales_noise"] else [
                  f"A {report['pipeline']} does not scale its initial noise: for the student's own samples pass "
                  "`latents=fewstep.hub.pipelines.pipeline_latents(pipe, noise, nfe)` (see docs/diffusers.md).", ""]),
              "![samples](samples.png)", ""]
    return "\n".join(lines)


def run_recipe(recipe: Recipe, progress: bool = True, resume_changed: bool = False) -> dict:
    """Run the whole job and write ``out/``: ``student/`` (the exported model), ``report.json``,
    ``report.md``, ``samples.png`` (teacher vs student) and ``quality_vs_nfe.png``. Returns the report.
    In a multi-process run every process trains; rank 0 alone evaluates and writes, the others return ``{}``.
    Rerunning into the same ``out`` resumes the run; a changed recipe is refused unless ``resume_changed``."""
    check_recipe(recipe, resume_changed)
    if is_pipeline_folder(recipe.teacher.source):
        return run_text_job(recipe, progress, resume_changed)
    out = Path(recipe.out)
    started = time.perf_counter()
    process = accelerator_for(recipe.train.device)  # one of several when launched multi-process
    with process.main_process_first():  # rank 0 trains or caches the teacher before the others load it
        teacher = resolve_teacher(recipe.teacher, recipe.dataset, recipe.train.seed, recipe.train.device,
                                  progress and process.is_main_process)
    teacher_seconds = time.perf_counter() - started
    if process.is_main_process:
        mark(out, "run")
        (out / RECIPE_FILE).write_text(json.dumps(recipe_to_dict(recipe), indent=2) + "\n")
    method = new_method(teacher, recipe.method, recipe.method_args, recipe.student_backbone_args, recipe.train)
    level_nfes = [nfe for nfe in recipe.eval.student_nfe if nfe > 1] if recipe.eval.tune_levels else []
    monitors = (SampleMonitor(teacher.dataset, method.sampling(min(recipe.eval.student_nfe)),
                              recipe.eval.monitor_every, recipe.eval.monitor_samples, recipe.eval.seed),
                ) if recipe.eval.monitor_every else ()
    student = distill(teacher, method, train_config=recipe.train, run_dir=out / "run",
                      nfe=tuple(recipe.eval.student_nfe), progress=progress, monitors=monitors,
                      allow_changes=resume_changed)
    if not process.is_main_process:  # rank 0 evaluates and writes the files
        return {}
    ev = recipe.eval
    level_search = tune_levels(student, level_nfes, seed=ev.seed + 101, progress=progress) if level_nfes else {}
    student.save(out / "student")
    report = evaluate_models(teacher, [student], tuple(ev.student_nfe), tuple(ev.teacher_nfe),
                             tuple(ev.teacher_solvers), ev.n_samples, ev.conditional or None, ev.seed, progress)
    report["recipe"] = recipe_to_dict(recipe)
    if level_search:
        report["level_search"] = {str(nfe): found for nfe, found in level_search.items()}
    report["wall_seconds"] = {"teacher": teacher_seconds, "total": time.perf_counter() - started}
    report["machine"] = machine()
    write_json(report, out / "report.json")
    write_plots(report, teacher, student, out)
    (out / "report.md").write_text(report_markdown(report, student))
    return report


def write_plots(report: dict, teacher: Teacher, student: Student, out: Path) -> None:
    dataset = teacher.dataset
    metric = report["quality_metric"]
    floor = report["noise_floor"].get(metric)
    quality_vs_nfe(report, out / "quality_vs_nfe.png", metric=metric, floor=floor)
    n = 64 if dataset.kind == "images" else 2000
    label = torch.arange(n) % dataset.num_classes if dataset.num_classes else None
    panels = {f"teacher heun@{DEFAULT_TEACHER_NFE}": teacher.sample(n, label=label)}
    for nfe in sorted(student.sampling)[:3]:
        panels[f"{student.method} student @{nfe}"] = student.sample(n, nfe, label=label)
    if dataset.kind == "images":
        compare_grids(panels, out / "samples.png")
    else:
        scatter_2d(panels, out / "samples.png", reference=dataset.ref_x[:n])


def report_markdown(report: dict, student: Student) -> str:
    """A short human summary with the headline comparison, then the full table."""
    results = report["results"]
    metric = report["quality_metric"]
    best = best_teacher(results, metric)
    lines = [f"# fewstep report: {student.method} on {report['dataset']}", "",
             f"Teacher: `{report['model']}`. Quality metric: `{metric}` (lower is better); noise floor "
             f"{report['noise_floor'].get(metric, float('nan')):.4g} (the same metric between two real sets).", ""]
    finest = finest_teacher(results, metric)
    if best is not None:
        lines.append(f"Teacher's best: {best['name']} with {metric} = {best[metric]:.4g} at "
                     f"{best['sec_per_sample']:.3g} s/sample.")
    if finest is not None and finest is not best:
        lines.append(f"Teacher's ODE solved most finely: {finest['name']} with {metric} = {finest[metric]:.4g}. A "
                     "student distilled from the ODE aims at this reading; a best below it comes from a coarser "
                     "solve.")
    for nfe in sorted({r["nfe"] for r in results if r["role"] == "student"}):
        stu = best_at_nfe(results, "student", nfe, metric)
        base = best_at_nfe(results, "teacher", nfe, metric)
        if stu is None:
            continue
        text = f"- Student @ {nfe} NFE: {metric} = {stu[metric]:.4g}{ratios_to_teacher(stu, results, metric)}"
        if base is not None:
            text += f" vs best training-free solver at {nfe} NFE ({base['name']}) {base[metric]:.4g}"
        if stu.get("speedup"):
            text += (f"; {stu['speedup']:.1f}x faster than the teacher's default sampler "
                     f"({report['speedup_reference']}), {stu['speedup_vs_best']:.1f}x faster than its "
                     f"best-measured setting ({report['best_teacher']})")
        lines.append(text + ".")
    for nfe, found in report.get("level_search", {}).items():
        lines.append(f"- Levels at {nfe} NFE chosen on the training split: "
                     f"{', '.join(f'{s:.3g}' for s in found['levels'])} (method default "
                     f"{', '.join(f'{s:.3g}' for s in found['default_levels'])}; training-split {found['metric']} "
                     f"{found['default_score']:.4g} -> {found['score']:.4g}).")
    training = report.get("training", {}).get(student.name, {})
    if training:
        lines.append(f"\nTraining: {training['steps']} steps in {training['seconds']:.0f} s, "
                     f"{training.get('teacher_evals') or 0:,} teacher evaluations, {other_evals(training)}.")
    lines += ["", "```", format_table(report), "```", "",
              "![samples](samples.png)", "", "![quality vs NFE](quality_vs_nfe.png)", ""]
    return "\n".join(lines)


def other_evals(training: dict) -> str:
    """The evaluations of a run's networks other than the teacher, in words (by role, then by network)."""
    student, auxiliary = training.get("student_evals") or 0, training.get("auxiliary_evals") or 0
    networks = ", ".join(f"{name} {n:,}" for name, n in training.get("network_evals", {}).items())
    return (f"{student + auxiliary:,} evaluations of its other networks (student {student:,}, auxiliary "
            f"{auxiliary:,}{'; by network: ' + networks if networks else ''})")


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "threads": torch.get_num_threads()}


def describe_methods() -> str:
    """The table printed by ``fewstep methods``."""
    rows = [f"{'name':<9} {'family':<12} {'needs':<14} paper"]
    rows += [f"{m.name:<9} {m.family:<12} {'+'.join(sorted(m.needs)):<14} {m.paper}" for m in METHODS.values()]
    rows += ["", "needs:"] + [f"  {k:<14} {v}" for k, v in NEEDS.items()]
    return "\n".join(rows)
