"""Recipes: YAML files of typed sections, with ``key=value`` overrides, validated before anything runs.

A recipe (see ``configs/``) has the sections of :class:`Recipe`. Every section is a dataclass, so an unknown
key, a value of the wrong type or a missing file is refused with one :class:`~fewstep.errors.ConfigError`
that names the key, before any file is written.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from fewstep.errors import ConfigError
from fewstep.teachers import TEACHER_TRAINING_STEPS
from fewstep.train.trainer import TrainConfig


@dataclass
class TeacherRecipe:
    """Where the teacher comes from: ``"analytic"`` (the dataset's exact mixture), ``"train"`` (train or reuse
    the cached one for the dataset), or the path of a saved model folder."""

    source: str = "train"
    backbone: str = "mlp"
    backbone_args: dict = field(default_factory=dict)
    steps: int = TEACHER_TRAINING_STEPS
    batch_size: int = 256
    lr: float = 1e-3
    label_dropout: float = 0.1
    guidance_scale: float = 1.0
    guidance_convention: str = "cfg"


@dataclass
class EvalRecipe:
    """What to measure: the student at ``student_nfe``, the teacher's solvers at ``teacher_nfe``. With
    ``tune_levels`` a consistency student's intermediate levels are first chosen on the training split
    (:func:`fewstep.eval.levels.tune_levels`). With ``monitor_every`` > 0 the student is also measured while it
    trains, every that many steps, at its smallest ``student_nfe`` on ``monitor_samples`` samples
    (:class:`fewstep.train.monitor.SampleMonitor`: modes covered, mode weights and recall, logged to
    ``run/log.csv``). ``encoder``: a local CLIP model folder, with which a text-to-image job also reports CLIP
    scores and the Fréchet distance between student and teacher images in CLIP's features."""

    student_nfe: list[int] = field(default_factory=lambda: [1, 2, 4])
    teacher_nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    teacher_solvers: list[str] = field(default_factory=lambda: ["euler", "heun", "dpmpp_2m"])
    n_samples: int | None = None
    conditional: bool = False
    seed: int = 0
    tune_levels: bool = False
    monitor_every: int = 0
    monitor_samples: int = 500
    encoder: str | None = None


@dataclass
class DataRecipe:
    """A text-to-image job's data, read when ``teacher.source`` is a diffusers pipeline folder: ``prompts`` (a
    ``.txt``, ``.csv`` or ``.jsonl`` prompt file, or a dataset saved with the ``datasets`` library) are what data-free
    methods draw; ``images`` (a folder of images with optional same-name ``.txt`` captions, or a saved dataset with an
    ``image`` column) are real data for the methods that train on it;
    ``negative_prompt`` is guidance's null condition; ``resolution`` is in pixels (default: the pipeline
    network's own size)."""

    prompts: str | None = None
    images: str | None = None
    negative_prompt: str = ""
    resolution: int | None = None


@dataclass
class StudentRecipe:
    """The student of a diffusers teacher: with ``lora_rank`` a peft LoRA adapter of that rank trains on its frozen
    network (the default for a text-to-image job is all weights)."""

    lora_rank: int | None = None


def _demo_train_config() -> TrainConfig:
    return TrainConfig(steps=2000, lr=1e-4)


@dataclass
class Recipe:
    """A whole job. The defaults are the demo: score identity distillation (SiD) of the cached digits teacher,
    the method that led at every NFE within the demo's time (docs/distribution.md)."""

    dataset: str = "digits"
    method: str = "sid"
    method_args: dict = field(default_factory=dict)
    teacher: TeacherRecipe = field(default_factory=TeacherRecipe)
    train: TrainConfig = field(default_factory=_demo_train_config)
    eval: EvalRecipe = field(default_factory=EvalRecipe)
    student_backbone_args: dict = field(default_factory=dict)
    data: DataRecipe = field(default_factory=DataRecipe)
    student: StudentRecipe = field(default_factory=StudentRecipe)
    out: str = "runs/default"


SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only ``true`` and ``false`` are booleans, so a value such as
    ``train.mixed_precision=no`` (accelerate's word) stays the string it reads as (YAML 1.1 makes yes, no, on and
    off booleans)."""


BOOL_TAG = "tag:yaml.org,2002:bool"
RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
RecipeLoader.add_implicit_resolver(BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _mapping_without_repeats(loader: RecipeLoader, node: yaml.MappingNode) -> dict:
    """A YAML mapping, refusing a key given twice (PyYAML would silently keep the last)."""
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise ConfigError(f"key {key!r} is given twice (line {key_node.start_mark.line + 1}): keep one")
        seen.add(key)
    return loader.construct_mapping(node)


RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Return ``value`` converted to ``annotation`` where that is lossless (int -> float, "2e-4" -> float), else
    raise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        converted = [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return converted if origin is list else tuple(converted)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__} {value!r}")
        return value
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 (PyYAML) reads 2e-4 as a string; only 2.0e-4 is a float there
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if annotation in (int, float, str, bool) and (type(value) is not annotation):
        raise ConfigError(f"{key} must be {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def build_dataclass(cls: type, values: dict, where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values``, refusing unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'recipe'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown key {name!r}; valid keys: {', '.join(sorted(fields))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build_dataclass(hint, value, name)
        else:
            kwargs[key] = _check_type(value, hint, name)
    return cls(**kwargs)


def apply_override(tree: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value (e.g. train.steps=500)")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.load(raw, Loader=RecipeLoader) if raw else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {one_line(error)}") from None
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe (or start from defaults when ``path`` is None), apply overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        try:
            tree = yaml.load(path.read_text(), Loader=RecipeLoader)
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ConfigError(f"recipe {path} is not valid YAML: {one_line(error)}") from None
        if tree is None:
            raise ConfigError(f"recipe {path} is empty: give at least its dataset and method (see configs/)")
        if not isinstance(tree, dict):
            raise ConfigError(f"recipe {path} must be a mapping of sections")
    keys = [assignment.split("=", 1)[0].strip() for assignment in overrides]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ConfigError(f"override {repeated[0]!r} is given twice: keep one")
    for assignment in overrides:
        apply_override(tree, assignment)
    recipe = build_dataclass(Recipe, tree, "")
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def check_device(name: str, key: str) -> torch.device:
    """The device ``name`` (``cpu``, ``cuda``, ``cuda:1``, ...) if this machine has it, else one ConfigError naming
    ``key``."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"{key} {name!r} is not a device ({one_line(error)}); use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} {name!r}: CUDA is not available here (torch {torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{key} {name!r}: fewstep runs on cpu or cuda")
    return device


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
