"""The distillation: build the method, its training-signal source and the trainer, and return a
:class:`~fewstep.student.Student`. Every entry point calls :func:`distill`: the Python API (``fewstep.distill``),
recipes (``fewstep distill``, ``fewstep demo``) and the benchmark, which also sizes its runs here
(:func:`steps_for_budget`)."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from fewstep.cache import cache_dir
from fewstep.config import build_dataclass
from fewstep.data.sources import Source, TeacherPairs, make_source, pair_labels
from fewstep.data.spec import DatasetSpec
from fewstep.errors import ConfigError
from fewstep.methods import METHODS
from fewstep.methods.base import DistillationMethod
from fewstep.models.denoiser import Denoiser, max_level
from fewstep.models.io import one_line
from fewstep.nets import build_backbone
from fewstep.student import Student
from fewstep.teachers import Teacher, default_backbone_args
from fewstep.train.trainer import Monitor, TrainConfig, train

STUDENT_NFE = (1, 2, 4)  # a student always carries its sampling schedules at these NFE


def method_class(method: str | type[DistillationMethod]) -> type[DistillationMethod]:
    """A registered method by name (``fewstep methods`` lists them), or a method class as given."""
    if isinstance(method, str):
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
        return METHODS[method]
    return method


def method_args_for(method: str | type[DistillationMethod], method_args: dict | None, steps: int | None) -> dict:
    """``method_args`` with the fields that depend on the run's length (:meth:`DistillationMethod.run_schedule`)
    fitted to a run of ``steps`` steps, where ``method_args`` leaves them out."""
    args = dict(method_args or {})
    return args if steps is None else {**method_class(method).run_schedule(steps, args), **args}


def build_method(teacher: Teacher, method: str | type[DistillationMethod], method_args: dict | None = None,
                 student_backbone_args: dict | None = None, steps: int | None = None,
                 lora_rank: int | None = None) -> DistillationMethod:
    """Instantiate a method (a registered name, or a method class): validate its config (with its schedule fitted
    to a run of ``steps`` steps when given), build its student from the teacher, and hand it the guided teacher
    (which it counts). Levels above a diffusers VP teacher's highest one are brought down to it
    (:meth:`DistillationMethod.fit_to_teacher`). With ``lora_rank`` the student is its diffusers network frozen
    plus a peft LoRA adapter of that rank on the attention projections (:func:`fewstep.hub.add_lora`): only the
    adapter trains."""
    method_cls = method_class(method)
    args = method_args_for(method_cls, method_args, steps)
    top = max_level(teacher.denoiser)
    if top is not None:
        args = {**method_cls.fit_to_teacher(top, args), **args}
    config = build_dataclass(method_cls.Config, args, "method_args")
    dataset = teacher.dataset
    backbone_args = {**default_backbone_args(dataset), **(student_backbone_args or {})}

    def new_backbone() -> nn.Module:
        try:
            return build_backbone("mlp", **backbone_args)
        except (TypeError, ValueError) as error:  # a misspelt or out-of-range setting: the user's input
            raise ConfigError(f"student_backbone_args: {one_line(error)}") from error

    student = method_cls.build_student(teacher.guided, config, new_backbone, dataset.sigma_data)
    if lora_rank is not None:
        if lora_rank < 1:
            raise ConfigError(f"lora_rank must be a positive integer, got {lora_rank}")
        from fewstep.hub import add_lora  # imports diffusers and peft

        add_lora(student, rank=lora_rank)
    try:
        return method_cls(teacher.guided, student, config)
    except ValueError as error:  # a method refusing its hyper-parameters: the user's input, one line
        raise ConfigError(f"method_args for {method_cls.name}: {one_line(error)}") from error


class _StandInTeacher(Denoiser):
    """A teacher with nothing to copy, for checking a method's arguments before the real teacher exists."""

    def __init__(self, dataset: DatasetSpec):
        super().__init__()
        self.data_shape, self.num_classes = tuple(dataset.data_shape), dataset.num_classes

    def forward(self, x, s, cond=None):
        return torch.zeros_like(x)


def check_method(method: str | type[DistillationMethod], method_args: dict | None, dataset: DatasetSpec,
                 steps: int | None = None, device: str = "meta") -> DistillationMethod:
    """Refuse, naming the key, arguments a method would refuse: its config is validated and the method is built on
    a stand-in teacher and a tiny student, on the meta device by default (nothing allocated), so its own checks run
    before any teacher is trained or loaded. Returns that stand-in method; built on the CPU, its ``sampling``
    answers as the real one's."""
    method_cls = method_class(method)
    config = build_dataclass(method_cls.Config, method_args_for(method_cls, method_args, steps), "method_args")
    teacher = _StandInTeacher(dataset)
    tiny = {**default_backbone_args(dataset), "width": 8, "depth": 1}
    try:
        with torch.device(device):
            student = method_cls.build_student(teacher, config, lambda: build_backbone("mlp", **tiny),
                                               dataset.sigma_data)
            return method_cls(teacher, student, config)
    except ValueError as error:
        raise ConfigError(f"method_args for {method_cls.name}: {one_line(error)}") from None
    except (RuntimeError, MemoryError) as error:  # e.g. a buffer too large to allocate
        raise ConfigError(f"method_args for {method_cls.name}: cannot build it ({one_line(error)[:200]})") from None


def method_source(distiller: DistillationMethod, teacher: Teacher, progress: bool = True) -> Source:
    """The training-signal source for ``distiller``'s needs; teacher pairs are solved from the guided teacher as
    the method requests and cached by teacher and solver in ``cache_dir()/pairs``."""
    pairs = None
    if "teacher_pairs" in distiller.needs:
        request = distiller.pair_request()
        pairs = TeacherPairs(teacher.guided, request.num_pairs, cache_dir() / "pairs", request.solver, request.nfe,
                             labels=pair_labels(teacher.dataset, request.num_pairs), progress=progress)
    return make_source(distiller.needs, teacher.dataset, pairs)


def new_method(teacher: Teacher, method: str | type[DistillationMethod], method_args: dict | None,
               student_backbone_args: dict | None, config: TrainConfig,
               lora_rank: int | None = None) -> DistillationMethod:
    """The method a run of ``config`` trains: built as :func:`build_method` does, with its schedule fitted to
    ``config.steps`` and the student's new weights drawn from ``config.seed`` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return build_method(teacher, method, method_args, student_backbone_args, steps=config.steps,
                            lora_rank=lora_rank)


def distill(teacher: Teacher, method: str | type[DistillationMethod] | DistillationMethod = "cd", steps: int = 2000,
            batch_size: int = 256, lr: float = 2e-4, method_args: dict | None = None,
            train_config: TrainConfig | None = None, student_backbone_args: dict | None = None,
            run_dir: str | Path | None = None, nfe: tuple[int, ...] = STUDENT_NFE, progress: bool = True,
            device: str = "cpu", monitors: tuple[Monitor, ...] = (), allow_changes: bool = False,
            lora_rank: int | None = None) -> Student:
    """Distil ``teacher`` into a few-step student with a registered method (``fewstep methods`` lists them).

    ``train_config`` overrides ``steps``, ``batch_size``, ``lr`` and ``device`` when given. The method's schedule
    (curricula, stages, warm-ups) is fitted to the run's steps where ``method_args`` leaves it out. ``method``
    may also be a method :func:`new_method` built for this run (the caller checked it first), with no
    ``method_args`` or ``student_backbone_args`` beside it. The run trains on ``device`` (e.g. ``"cuda"``), and the
    teacher's denoiser is moved there too (the student comes back on it). With ``run_dir`` the run checkpoints
    there and resumes if interrupted (a checkpoint of other settings is refused unless ``allow_changes``);
    ``monitors`` run every so many steps on the student (see :mod:`fewstep.train.monitor`). ``lora_rank``: train
    a LoRA adapter of this rank on the student's diffusers network instead of all its weights."""
    config = train_config if train_config is not None else TrainConfig(steps=steps, batch_size=batch_size, lr=lr,
                                                                        device=device)
    if isinstance(method, DistillationMethod):
        if method_args or student_backbone_args or lora_rank:
            raise ConfigError("a method built beforehand carries its own arguments: pass method_args, "
                              "student_backbone_args and lora_rank to new_method instead")
        distiller = method
    else:
        distiller = new_method(teacher, method, method_args, student_backbone_args, config, lora_rank)
    source = method_source(distiller, teacher, progress)
    result = train(distiller, source, config, run_dir=run_dir, progress=progress, monitors=monitors,
                   allow_changes=allow_changes)
    sampling = {k: distiller.sampling(k) for k in sorted(set(nfe) | set(STUDENT_NFE))}
    metadata = {"teacher": teacher.name, "method_args": asdict(distiller.config),
                "guidance": {"convention": teacher.guidance_convention, "scale": teacher.guidance_scale}}
    return Student(result.ema_student, distiller.name, sampling, teacher.dataset, metadata, result)


def teacher_cost(teacher: Teacher, method: str | type[DistillationMethod], method_args: dict | None,
                 student_backbone_args: dict | None, batch_size: int, steps: int, step: int) -> tuple[float, int]:
    """``(teacher evaluations per training sample in trainer step step, evaluations its source cost to make)``
    for a run of ``steps`` steps. The first is counted by running the method's losses (one cycle over its phases)
    on one batch of ``batch_size`` from its own source, since a method may spend per step rather than per sample
    (TBCM's rollouts); the second is the source's cost (teacher pairs), paid once per run."""
    distiller = build_method(teacher, method, method_args, student_backbone_args, steps=steps)
    generator = torch.Generator().manual_seed(0)
    source = method_source(distiller, teacher, progress=False)
    batch = source.batch(batch_size, generator)
    for phase in distiller.phases():
        for _ in range(phase.updates):
            distiller.losses(phase.name, batch, step, generator)
    return distiller.teacher_evals / batch_size, int(source.teacher_evals)


def steps_for_budget(teacher: Teacher, method: str | type[DistillationMethod], budget: int, batch_size: int,
                     method_args: dict | None = None, student_backbone_args: dict | None = None,
                     teacher_free_evals: float = 2.0) -> tuple[int, float]:
    """``(steps, evaluations per sample)``: the training steps that spend ``budget`` teacher evaluations at
    ``batch_size``, for a method whose schedule is fitted to those steps, and what it spends per training sample.
    What its training signal cost to make (teacher pairs) comes off the budget first. A method that spends more
    after a warm-up (rCM's DMD term) is budgeted at its dearer step; a method that never calls the teacher gets
    the steps of one that spends ``teacher_free_evals`` per sample."""
    per_sample, fixed = teacher_cost(teacher, method, method_args, student_backbone_args, batch_size, 1, 0)
    if fixed >= budget:
        raise ConfigError(f"{method_class(method).name}'s teacher pairs cost {fixed:,} teacher evaluations, the whole "
                          f"budget of {budget:,}: give it a larger budget or fewer pairs")

    def steps_at(cost: float) -> int:
        return max(1, math.floor((budget - fixed) // ((cost or teacher_free_evals) * batch_size)))

    steps = steps_at(per_sample)
    late, _ = teacher_cost(teacher, method, method_args, student_backbone_args, batch_size, steps, steps - 1)
    if late > per_sample:
        per_sample, steps = late, steps_at(late)
    return steps, per_sample
