"""The public API: :class:`Teacher`, :func:`distill`, :class:`Student`, :func:`evaluate_models`.

A ten-line session::

    import fewstep
    teacher = fewstep.Teacher.cached("digits")             # train once (a few minutes on 2 cores), then reuse
    student = fewstep.distill(teacher, method="cd", steps=3000)
    images = student.sample(16, nfe=2, label=torch.arange(16) % 10)
    student.save("runs/digits-cd/student")
    report = fewstep.evaluate_models(teacher, [student])
    print(fewstep.format_table(report))
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from fewstep.cache import cache_dir
from fewstep.data import DATASETS, load_dataset
from fewstep.data.sources import make_source
from fewstep.data.spec import DatasetSpec
from fewstep.errors import ConfigError
from fewstep.eval.evaluate import Candidate, evaluate
from fewstep.guidance import GuidedDenoiser
from fewstep.methods import METHODS
from fewstep.methods.base import Sampling
from fewstep.models.analytic import GaussianMixture
from fewstep.models.denoiser import Denoiser
from fewstep.models.io import load_model, one_line, save_model
from fewstep.nets import build_backbone
from fewstep.solvers import ode_endpoint, sample, solver_sigmas
from fewstep.train.teacher import TeacherConfig, train_teacher
from fewstep.train.trainer import TrainConfig, TrainResult, train

# Default teacher training length: on digits, 4000 steps (about 5 minutes on 2 CPU cores) reach an FD-digits
# about 2x the noise floor, which leaves the demo inside 15 minutes.
TEACHER_STEPS = 4000

# The teacher's default sampler, against which student speedups are reported: Heun with 18 levels, EDM's
# default budget. Reports also give the speedup against the best-measured teacher row (``speedup_vs_best``).
BEST_TEACHER_NFE = 35


def default_backbone_args(dataset: DatasetSpec) -> dict:
    """The MLP that fewstep uses for a dataset unless told otherwise (flattened digits, 2-D points)."""
    wide = len(dataset.data_shape) > 1
    return {"data_shape": list(dataset.data_shape), "width": 512 if wide else 256, "depth": 4,
            "num_classes": dataset.num_classes}


def _as_dataset(dataset: str | DatasetSpec) -> DatasetSpec:
    return load_dataset(dataset) if isinstance(dataset, str) else dataset


@dataclass
class TeacherRecipeKey:
    """What identifies a trained teacher in the cache."""

    dataset: str
    backbone: str
    backbone_args: dict
    steps: int
    batch_size: int
    lr: float
    label_dropout: float
    seed: int

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


class Teacher:
    """A teacher: a denoiser, the dataset it models and how it is guided.

    ``denoiser`` answers ``x0 = D(x, s, label)``; :attr:`guided` adds classifier-free guidance when
    ``guidance_scale`` is not the plain conditional model (see :mod:`fewstep.guidance`)."""

    def __init__(self, denoiser: Denoiser, dataset: DatasetSpec, name: str, guidance_scale: float = 1.0,
                 guidance_convention: str = "cfg"):
        self.denoiser, self.dataset, self.name = denoiser.eval(), dataset, name
        self.guidance_scale, self.guidance_convention = guidance_scale, guidance_convention
        plain = (guidance_convention == "cfg" and guidance_scale == 1.0) or (
            guidance_convention == "cfg_plus_one" and guidance_scale == 0.0)
        self.guided: Denoiser = self.denoiser if plain or denoiser.num_classes == 0 else GuidedDenoiser(
            self.denoiser, guidance_scale, guidance_convention)

    @property
    def is_analytic(self) -> bool:
        return isinstance(self.denoiser, GaussianMixture)

    @classmethod
    def analytic(cls, dataset: str | DatasetSpec) -> Teacher:
        """The exact teacher of a Gaussian-mixture dataset (``ring8``, ``grid25``, ...): its own copy of the
        mixture, so moving the teacher (to a GPU, say) leaves the dataset's metrics where they are."""
        dataset = _as_dataset(dataset)
        if dataset.analytic is None:
            raise ConfigError(f"dataset {dataset.name!r} has no analytic teacher; use a Gaussian-mixture "
                              "dataset (ring8, grid25, grid25_imbalanced) or a trained teacher")
        return cls(copy.deepcopy(dataset.analytic), dataset, f"analytic:{dataset.name}")

    @classmethod
    def load(cls, folder: str | Path, dataset: str | DatasetSpec | None = None) -> Teacher:
        """A teacher saved by :meth:`save` or ``fewstep teacher train``."""
        denoiser, meta = load_model(folder)
        dataset = _as_dataset(dataset if dataset is not None else meta.get("dataset", ""))
        guidance = meta.get("guidance", {})
        return cls(denoiser, dataset, str(folder), guidance.get("scale", 1.0), guidance.get("convention", "cfg"))

    @classmethod
    def from_diffusers(cls, path_or_id: str | Path, subfolder: str | None = None,
                       dataset: str | DatasetSpec | None = None, **kwargs) -> Teacher:
        """A diffusers model (pipeline or model folder, or hub id) with path, prediction and time convention read
        from its scheduler config; ``kwargs`` go to :func:`fewstep.hub.teachers.load_diffusers_teacher`
        (``encoder_hidden_states``, ``pooled_projections``, ``data_shape``, ``num_classes``, ...)."""
        from fewstep.hub.teachers import load_diffusers_teacher

        spec = _as_dataset(dataset) if dataset is not None else None
        return load_diffusers_teacher(path_or_id, subfolder, dataset=spec, **kwargs)

    @classmethod
    def train(cls, dataset: str | DatasetSpec, backbone: str = "mlp", backbone_args: dict | None = None,
              steps: int = TEACHER_STEPS, batch_size: int = 256, lr: float = 1e-3, label_dropout: float = 0.1,
              seed: int = 0, run_dir: str | Path | None = None, progress: bool = True,
              device: str = "cpu") -> Teacher:
        """Train a teacher with EDM's denoising loss on the dataset's train split, on ``device``."""
        dataset = _as_dataset(dataset)
        args = {**default_backbone_args(dataset), **(backbone_args or {})} if backbone == "mlp" else {
            "data_shape": list(dataset.data_shape), "num_classes": dataset.num_classes, **(backbone_args or {})}
        config = TeacherConfig(sigma_data=dataset.sigma_data, p_uncond=label_dropout,
                               train=TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=100,
                                                 seed=seed, checkpoint_every=max(500, steps // 4), device=device))
        denoiser = train_teacher(dataset.train_x, dataset.train_y, backbone, args, config, run_dir, progress)
        return cls(denoiser, dataset, f"trained:{dataset.name}:{backbone}")

    @classmethod
    def cached(cls, dataset: str | DatasetSpec, backbone: str = "mlp", backbone_args: dict | None = None,
               steps: int = TEACHER_STEPS, batch_size: int = 256, lr: float = 1e-3, label_dropout: float = 0.1,
               seed: int = 0, progress: bool = True, device: str = "cpu") -> Teacher:
        """Load the teacher trained with exactly this recipe from the cache, training it first if needed (on
        ``device``; a GPU draws other random numbers than a CPU, so teachers trained on one are cached apart)."""
        dataset = _as_dataset(dataset)
        key = TeacherRecipeKey(dataset.name, backbone, backbone_args or {}, steps, batch_size, lr, label_dropout,
                               seed)
        device_type = torch.device(device).type
        suffix = "" if device_type == "cpu" else f"-{device_type}"
        folder = cache_dir() / "teachers" / f"{dataset.name}-{backbone}-{key.digest()}{suffix}"
        if (folder / "fewstep.json").is_file():
            return cls.load(folder, dataset)
        teacher = cls.train(dataset, backbone, backbone_args, steps, batch_size, lr, label_dropout, seed,
                            run_dir=folder.with_name(folder.name + ".run"), progress=progress, device=device)
        teacher.save(folder, recipe=asdict(key))
        return cls.load(folder, dataset)

    def save(self, folder: str | Path, **extra) -> None:
        if self.is_analytic:
            raise ConfigError("an analytic teacher is defined by its dataset; there is nothing to save")
        save_model(folder, self.denoiser, {
            "role": "teacher", "dataset": self.dataset.name, "data_shape": list(self.dataset.data_shape),
            "normalisation": self.dataset.normalisation,
            "guidance": {"convention": self.guidance_convention, "scale": self.guidance_scale},
            "sampling": {str(BEST_TEACHER_NFE): {"sampler": "heun",
                                                  "sigmas": solver_sigmas("heun", BEST_TEACHER_NFE).tolist()}},
            **extra})

    def with_guidance(self, scale: float, convention: str = "cfg") -> Teacher:
        return Teacher(self.denoiser, self.dataset, self.name, scale, convention)

    @torch.no_grad()
    def sample(self, n: int, solver: str = "heun", nfe: int = BEST_TEACHER_NFE, label: Tensor | None = None,
               seed: int = 0, noise: Tensor | None = None) -> Tensor:
        """``n`` samples from the teacher's ODE with a training-free solver at ``nfe`` evaluations, on the
        teacher's device (``noise`` and ``label`` are moved there)."""
        if noise is None:
            noise = torch.randn((n, *self.dataset.data_shape), generator=torch.Generator().manual_seed(seed))
        noise, label = _on_device(self.denoiser.device, noise, label)
        return sample(lambda x, s: self.guided(x, s, label), noise, solver, solver_sigmas(solver, nfe))


class Student:
    """A distilled few-step generator: its denoiser and, per NFE, how it samples."""

    def __init__(self, denoiser: Denoiser, method: str, sampling: dict[int, Sampling], dataset: DatasetSpec,
                 metadata: dict | None = None, train_result: TrainResult | None = None):
        self.denoiser, self.method, self.sampling = denoiser.eval(), method, sampling
        self.dataset, self.metadata, self.train_result = dataset, metadata or {}, train_result

    @property
    def name(self) -> str:
        return f"student/{self.method}"

    @torch.no_grad()
    def sample(self, n: int, nfe: int = 1, label: Tensor | None = None, seed: int = 0,
               noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples at ``nfe`` evaluations, on the student's device (``noise`` and ``label`` are moved
        there; a stochastic sampler draws from ``generator``, by default one on that device seeded ``seed + 1``)."""
        if nfe not in self.sampling:
            raise ConfigError(f"this {self.method} student has no sampling schedule for nfe={nfe}; "
                              f"available: {sorted(self.sampling)}")
        if noise is None:
            noise = torch.randn((n, *self.dataset.data_shape), generator=torch.Generator().manual_seed(seed))
        device = self.denoiser.device
        generator = generator if generator is not None else torch.Generator(device).manual_seed(seed + 1)
        return self.sample_with(self.sampling[nfe], noise, label, generator)

    @torch.no_grad()
    def sample_with(self, spec: Sampling, noise: Tensor, label: Tensor | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
        """Samples from ``noise`` with the sampler and levels of ``spec`` (e.g. levels under trial), on the
        student's device."""
        noise, label = _on_device(self.denoiser.device, noise, label)
        sigmas = torch.tensor(spec.sigmas, dtype=noise.dtype)
        return sample(lambda x, s, *target: self.denoiser(x, s, label, *target), noise, spec.sampler, sigmas, generator)

    def save(self, folder: str | Path) -> None:
        save_model(folder, self.denoiser, {
            "role": "student", "method": self.method, "dataset": self.dataset.name,
            "data_shape": list(self.dataset.data_shape), "normalisation": self.dataset.normalisation,
            "sampling": {str(nfe): asdict(spec) for nfe, spec in sorted(self.sampling.items())},
            **self.metadata})

    @classmethod
    def load(cls, folder: str | Path) -> Student:
        denoiser, meta = load_model(folder)
        if meta.get("role") != "student" or "sampling" not in meta:
            raise ConfigError(f"{folder} is not a fewstep student (role={meta.get('role')!r}); "
                              "use fewstep.Teacher.load for teachers")
        sampling = {int(nfe): Sampling(**spec) for nfe, spec in meta["sampling"].items()}
        extra = {k: v for k, v in meta.items() if k in ("teacher", "guidance")}
        return cls(denoiser, meta.get("method", "?"), sampling, _dataset_of(meta, denoiser), extra)


def _on_device(device: torch.device, noise: Tensor, label: Tensor | None) -> tuple[Tensor, Tensor | None]:
    return noise.to(device), None if label is None else label.to(device)


def _dataset_of(meta: dict, denoiser: Denoiser) -> DatasetSpec:
    """The built-in dataset a saved model names, or (a model distilled from an outside teacher, e.g. a diffusers
    one) an empty dataset with the model's shape and the saved normalisation."""
    if meta.get("dataset") in DATASETS:
        return load_dataset(meta["dataset"])
    empty = torch.empty(0, *denoiser.data_shape)
    return DatasetSpec(str(meta.get("dataset", "external")), tuple(denoiser.data_shape), empty, empty,
                       denoiser.num_classes, normalisation=meta.get("normalisation") or {})


def build_method(teacher: Teacher, method: str | type, method_args: dict | None = None,
                 student_backbone_args: dict | None = None, steps: int | None = None):
    """Instantiate a method (a registered name, or a method class): validate its config, build its student
    from the teacher. A method whose schedule spans the run (a curriculum, stages) has a ``total_steps``
    config field; it is set to ``steps`` unless ``method_args`` gives it."""
    from fewstep.config import build_dataclass

    if isinstance(method, str) and method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    method_cls = METHODS[method] if isinstance(method, str) else method
    method_args = dict(method_args or {})
    if steps is not None and "total_steps" in {f.name for f in fields(method_cls.Config)}:
        method_args.setdefault("total_steps", steps)
    config = build_dataclass(method_cls.Config, method_args, "method_args")
    dataset = teacher.dataset
    backbone_args = {**default_backbone_args(dataset), **(student_backbone_args or {})}

    def new_backbone() -> nn.Module:
        try:
            return build_backbone("mlp", **backbone_args)
        except (TypeError, ValueError) as error:  # a misspelt or out-of-range setting: the user's input
            raise ConfigError(f"student_backbone_args: {one_line(error)}") from error

    student = method_cls.build_student(teacher.guided, config, new_backbone, dataset.sigma_data)
    try:
        return method_cls(teacher.guided, student, config)
    except ValueError as error:  # a method refusing its hyper-parameters: the user's input, one line
        raise ConfigError(f"method_args for {method_cls.name}: {one_line(error)}") from error


def distill(teacher: Teacher, method: str = "cd", steps: int = 2000, batch_size: int = 256, lr: float = 2e-4,
            method_args: dict | None = None, train_config: TrainConfig | None = None,
            student_backbone_args: dict | None = None, run_dir: str | Path | None = None,
            nfe: tuple[int, ...] = (1, 2, 4), progress: bool = True, device: str = "cpu") -> Student:
    """Distil ``teacher`` into a few-step student with a registered method (``fewstep methods`` lists them).

    ``train_config`` overrides ``steps``, ``batch_size``, ``lr`` and ``device`` when given. The run trains on
    ``device`` (e.g. ``"cuda"``), and the teacher's denoiser is moved there too (the student comes back on it).
    With ``run_dir`` the run checkpoints there and resumes if interrupted."""
    config = train_config if train_config is not None else TrainConfig(steps=steps, batch_size=batch_size, lr=lr,
                                                                        device=device)
    with torch.random.fork_rng(devices=[]):  # a new student's initial weights depend on the seed alone
        torch.manual_seed(config.seed)
        distiller = build_method(teacher, method, method_args, student_backbone_args, steps=config.steps)
    source = make_source(distiller.needs, teacher.dataset, **pair_source_args(distiller, teacher, run_dir))
    result = train(distiller, source, config, run_dir=run_dir, progress=progress)
    nfes = sorted(set(nfe) | {1, 2, 4})
    sampling = {k: distiller.sampling(k) for k in nfes}
    metadata = {"teacher": teacher.name,
                "guidance": {"convention": teacher.guidance_convention, "scale": teacher.guidance_scale}}
    return Student(result.ema_student, method, sampling, teacher.dataset, metadata, result)


def pair_source_args(distiller, teacher: Teacher, run_dir: str | Path | None) -> dict:
    """Arguments for a ``teacher_pairs`` source: a cached high-accuracy teacher ODE solve."""
    if distiller.needs != "teacher_pairs":
        return {}
    folder = Path(run_dir) if run_dir is not None else cache_dir() / "pairs"
    return {"teacher_sample_fn": lambda noise, label: teacher.sample(0, label=label, noise=noise),
            "num_pairs": getattr(distiller.config, "num_pairs", 20000),
            "cache_path": folder / f"pairs-{teacher.dataset.name}.safetensors",
            "key": f"{teacher.name}|{teacher.guidance_convention}={teacher.guidance_scale}"}


def evaluate_models(teacher: Teacher, students: list[Student], student_nfe: tuple[int, ...] = (1, 2, 4),
                    teacher_nfe: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
                    teacher_solvers: tuple[str, ...] = ("euler", "heun", "dpmpp_2m"),
                    n_samples: int | None = None, conditional: bool | None = None, seed: int = 0,
                    progress: bool = True, device: str | torch.device | None = None) -> dict:
    """One report: the teacher under each training-free solver and NFE, then each student at each NFE,
    all from the same noise. For an analytic teacher it also reports each row's exact flow-map error.

    ``device`` is where the noise is drawn onto and timed (default: the teacher's); each model samples on
    its own device, so put the teacher and students where they should be timed."""
    dataset = teacher.dataset
    device = teacher.denoiser.device if device is None else torch.device(device)
    conditional = dataset.num_classes > 0 if conditional is None else conditional
    candidates = [
        Candidate(f"teacher/{solver}@{nfe}", "teacher", solver, nfe,
                  lambda noise, label, gen, solver=solver, nfe=nfe: teacher.sample(
                      0, solver, nfe, label=label, noise=noise))
        for solver in teacher_solvers for nfe in teacher_nfe]
    candidates.append(Candidate(f"teacher/heun@{BEST_TEACHER_NFE}", "teacher", "heun", BEST_TEACHER_NFE,
                                lambda noise, label, gen: teacher.sample(0, "heun", BEST_TEACHER_NFE, label=label,
                                                                         noise=noise)))
    for student in students:
        candidates += [Candidate(f"{student.name}@{nfe}", "student", student.sampling[nfe].sampler, nfe,
                                 lambda noise, label, gen, student=student, nfe=nfe: student.sample(
                                     0, nfe, label=label, noise=noise, generator=gen))
                       for nfe in student_nfe if nfe in student.sampling]
    exact, tolerance = None, None
    if teacher.is_analytic:
        def exact(noise: Tensor, label: Tensor | None) -> Tensor:
            noise, label = _on_device(teacher.denoiser.device, noise, label)
            return ode_endpoint(lambda x, s: teacher.guided(x, s, label), noise.double(), steps=256).float()

        probe = torch.randn((256, *dataset.data_shape), dtype=torch.float64,
                            generator=torch.Generator().manual_seed(seed + 7)).to(teacher.denoiser.device)
        coarse = ode_endpoint(teacher.guided, probe, steps=256)
        fine = ode_endpoint(teacher.guided, probe, steps=512)
        tolerance = float((coarse - fine).flatten(1).norm(dim=1).mean())
    report = evaluate(dataset, candidates, n_samples=n_samples, seed=seed, exact_endpoint=exact,
                      conditional=conditional, progress=progress, model=teacher.name,
                      endpoint_tolerance=tolerance, speedup_reference=f"teacher/heun@{BEST_TEACHER_NFE}",
                      device=device)
    for student in students:
        if student.train_result is not None:
            report.setdefault("training", {})[student.name] = {
                "seconds": student.train_result.seconds, "steps": student.train_result.steps_done,
                "teacher_evals": student.train_result.teacher_evals}
    return report

