"""The :class:`Teacher`: a denoiser, the dataset it models and how it is guided; made analytic, trained here
(and cached by recipe), loaded from a model folder, or read from a diffusers model."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from fewstep.cache import cache_dir
from fewstep.conditions import Condition, TextCondition
from fewstep.data import DATASETS, load_dataset
from fewstep.data.images import check_images
from fewstep.data.prompts import read_prompts
from fewstep.data.spec import DatasetSpec
from fewstep.errors import CheckpointError, ConfigError, DataError
from fewstep.guidance import GuidedDenoiser
from fewstep.models.analytic import GaussianMixture
from fewstep.models.denoiser import Denoiser, start_level
from fewstep.models.io import load_model, one_line, read_description, save_model
from fewstep.nets import build_backbone
from fewstep.solvers import DEFAULT_TEACHER_NFE, solve, solver_sigmas
from fewstep.train.teacher import TeacherConfig, train_teacher
from fewstep.train.trainer import TrainConfig

# Default teacher training length: on digits, 4000 steps (about 5 minutes on 2 CPU cores) reach an FD-digits
# about 2x the noise floor, which leaves the demo inside 15 minutes.
TEACHER_TRAINING_STEPS = 4000


def as_dataset(dataset: str | DatasetSpec) -> DatasetSpec:
    """A built-in dataset by name, or the given spec."""
    return load_dataset(dataset) if isinstance(dataset, str) else dataset


def default_backbone_args(dataset: DatasetSpec) -> dict:
    """The MLP that fewstep uses for a dataset unless told otherwise (flattened images are wider than points)."""
    return {"data_shape": list(dataset.data_shape), "width": 512 if dataset.kind == "images" else 256, "depth": 4,
            "num_classes": dataset.num_classes}


def check_backbone_args(dataset: DatasetSpec, backbone: str, backbone_args: dict | None, key: str) -> None:
    """Refuse, naming ``key``, backbone arguments that do not build a network for ``dataset`` (checked on the meta
    device, so nothing is allocated)."""
    args = {**default_backbone_args(dataset), **(backbone_args or {})} if backbone == "mlp" else {
        "data_shape": list(dataset.data_shape), "num_classes": dataset.num_classes, **(backbone_args or {})}
    try:
        with torch.device("meta"):
            build_backbone(backbone, **args)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ConfigError(f"{key} for {backbone!r}: {one_line(error)}") from None


def model_role(folder: str | Path) -> str:
    """``"teacher"`` or ``"student"``: what the model folder holds (read from its ``fewstep.json``)."""
    role = read_description(folder).get("role")
    if role not in ("teacher", "student"):
        raise CheckpointError(f"{folder}: fewstep.json has role {role!r}, neither teacher nor student")
    return role


def check_dataset(meta: dict, dataset: DatasetSpec, folder: str | Path) -> None:
    """Refuse a model trained on another dataset than ``dataset``: another name, sample shape or normalisation."""
    saved = {"dataset": meta.get("dataset"), "data_shape": meta.get("data_shape"),
             "normalisation": meta.get("normalisation")}  # what a folder does not record is not compared
    expected = {"dataset": dataset.name, "data_shape": list(dataset.data_shape),
                "normalisation": dataset.normalisation}
    differ = [key for key in saved if saved[key] is not None and saved[key] != expected[key]]
    if differ:
        raise DataError(f"{folder} was trained on {saved['dataset']} ({', '.join(f'{k} {saved[k]}' for k in differ)})"
                        f", not on {dataset.name} ({', '.join(f'{k} {expected[k]}' for k in differ)})")


def dataset_of(meta: dict, denoiser: Denoiser) -> DatasetSpec:
    """The built-in dataset a saved model names, or (a model distilled from an outside teacher, e.g. a diffusers
    one) an empty dataset with the model's shape and the saved kind and normalisation."""
    if meta.get("dataset") in DATASETS:
        return load_dataset(meta["dataset"])
    return empty_dataset(str(meta.get("dataset", "external")), denoiser, meta.get("dataset_kind", "images"),
                         meta.get("normalisation") or {})


def empty_dataset(name: str, denoiser: Denoiser, kind: str, normalisation: dict | None = None) -> DatasetSpec:
    """A dataset of ``kind`` with no samples, of the denoiser's shape: what a teacher from outside fewstep
    models."""
    empty = torch.zeros((0, *denoiser.data_shape))
    return DatasetSpec(name, tuple(denoiser.data_shape), empty, empty, denoiser.num_classes,
                       normalisation=normalisation or {}, kind=kind)


def on_device(device: torch.device, noise: Tensor, cond: Condition | None) -> tuple[Tensor, Condition | None]:
    return noise.to(device), None if cond is None else cond.to(device)


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

    ``denoiser`` answers ``x0 = D(x, s, cond)``; :attr:`guided` is the same with classifier-free guidance at
    ``guidance_scale`` (read in ``guidance_convention``, see :mod:`fewstep.guidance`), the plain model at the
    scale that means "no guidance". ``null`` is the null condition of a text-conditioned teacher (the empty
    prompt's encoding); class-conditional teachers need none. ``pipeline`` is the diffusers pipeline a
    text-to-image teacher comes from (its VAE decodes samples, and exports reuse its other components)."""

    def __init__(self, denoiser: Denoiser, dataset: DatasetSpec, name: str, guidance_scale: float = 1.0,
                 guidance_convention: str = "cfg", null: TextCondition | None = None, pipeline=None):
        self.denoiser, self.dataset, self.name = denoiser.eval(), dataset, name
        self.guidance_scale, self.guidance_convention, self.null = guidance_scale, guidance_convention, null
        self.pipeline = pipeline
        self.guided = GuidedDenoiser(self.denoiser, guidance_scale, guidance_convention, null)

    @property
    def is_analytic(self) -> bool:
        return isinstance(self.denoiser, GaussianMixture)

    @classmethod
    def analytic(cls, dataset: str | DatasetSpec) -> Teacher:
        """The exact teacher of a Gaussian-mixture dataset (``ring8``, ``grid25``, ...): its own copy of the
        mixture, so moving the teacher (to a GPU, say) leaves the dataset's metrics where they are."""
        dataset = as_dataset(dataset)
        if dataset.analytic is None:
            raise ConfigError(f"dataset {dataset.name!r} has no analytic teacher; use a Gaussian-mixture "
                              "dataset (ring8, grid25, grid25_imbalanced) or a trained teacher")
        return cls(copy.deepcopy(dataset.analytic), dataset, f"analytic:{dataset.name}")

    @classmethod
    def load(cls, folder: str | Path, dataset: str | DatasetSpec | None = None) -> Teacher:
        """A teacher saved by :meth:`save` or ``fewstep teacher train``; with ``dataset``, one trained on it."""
        if model_role(folder) != "teacher":
            raise CheckpointError(f"{folder} holds a fewstep student, not a teacher: use fewstep.Student.load")
        denoiser, meta = load_model(folder)
        if dataset is not None:
            dataset = as_dataset(dataset)
            check_dataset(meta, dataset, folder)
        else:
            dataset = dataset_of(meta, denoiser)
        guidance = meta.get("guidance", {})
        return cls(denoiser, dataset, str(folder), guidance.get("scale", 1.0), guidance.get("convention", "cfg"))

    @classmethod
    def from_diffusers(cls, path_or_id: str | Path, subfolder: str | None = None,
                       dataset: str | DatasetSpec | None = None, **kwargs) -> Teacher:
        """A diffusers model (pipeline or model folder, or hub id) with path, prediction and time convention read
        from its scheduler config; ``kwargs`` go to :func:`fewstep.hub.teachers.load_diffusers_denoiser`
        (``encoder_hidden_states``, ``pooled_projections``, ``data_shape``, ``num_classes``, ...). ``dataset``
        supplies training data for data-driven methods; without one the teacher has an empty dataset of the
        model's shape."""
        from fewstep.hub.teachers import load_diffusers_denoiser  # imports diffusers, an optional dependency

        denoiser = load_diffusers_denoiser(path_or_id, subfolder, **kwargs)
        name = f"diffusers:{path_or_id}"
        return cls(denoiser, as_dataset(dataset) if dataset is not None else empty_dataset(name, denoiser, "images"),
                   name)

    @classmethod
    def from_pipeline(cls, folder: str | Path, prompts: str | Path | list[str] | None = None,
                      images: str | Path | None = None, negative_prompt: str = "", guidance_scale: float = 1.0,
                      resolution: int | None = None, torch_dtype: torch.dtype | None = None) -> Teacher:
        """A text-to-image teacher: the network of the diffusers pipeline in ``folder`` on its VAE's latents.
        ``prompts`` (a prompt file, see :func:`fewstep.data.prompts.read_prompts`, or a list) are what data-free
        methods draw; ``images`` (an image folder with optional captions, see :mod:`fewstep.data.images`) are real
        data for the methods that need it (their captions are the prompts when ``prompts`` is not given). Both are
        encoded by the pipeline's own encoders and cached on disk. ``negative_prompt`` is guidance's null condition;
        ``resolution`` is in pixels (default: the network's own size)."""
        from fewstep.hub.pipelines import (
            encode_images,
            encode_prompts,
            load_pipeline,
            pipeline_denoiser,
            pixel_resolution,
            prompt_dataset,
        )

        if prompts is None and images is None:
            raise ConfigError("give prompts (a prompt file or list) or images (a captioned image folder), or both")
        texts = None if prompts is None else prompts if isinstance(prompts, list) else read_prompts(prompts)
        if texts is not None and (not texts or not all(isinstance(text, str) for text in texts)):
            raise DataError("prompts must be a prompt file or a non-empty list of strings")
        if images is not None:
            check_images(images)  # an empty or missing folder is refused before the pipeline loads
        pipe = load_pipeline(folder, torch_dtype)
        pixels = pixel_resolution(pipe, resolution)
        latents = captions = names = None
        if images is not None:  # first: a corrupt image stops the job before any prompt is encoded
            latents, names = encode_images(pipe, images, pixels)
            captions, null = encode_prompts(pipe, folder, names, negative_prompt, f"captions of {images}")
        conditions = captions
        if texts is not None:
            conditions, null = encode_prompts(pipe, folder, texts, negative_prompt,
                                              "prompt list" if isinstance(prompts, list) else str(prompts))
        denoiser = pipeline_denoiser(pipe, pixels, null)
        source = "list" if isinstance(prompts, list) else prompts if prompts is not None else images
        dataset = prompt_dataset(f"prompts:{source}", denoiser.data_shape, conditions,
                                 texts if texts is not None else names, latents, captions)
        return cls(denoiser, dataset, f"pipeline:{Path(folder).resolve()}", guidance_scale, "cfg", null, pipe)

    @classmethod
    def train(cls, dataset: str | DatasetSpec, backbone: str = "mlp", backbone_args: dict | None = None,
              steps: int = TEACHER_TRAINING_STEPS, batch_size: int = 256, lr: float = 1e-3,
              label_dropout: float = 0.1, seed: int = 0, run_dir: str | Path | None = None, progress: bool = True,
              device: str = "cpu") -> Teacher:
        """Train a teacher with EDM's denoising loss on the dataset's train split, on ``device``."""
        dataset = as_dataset(dataset)
        args = {**default_backbone_args(dataset), **(backbone_args or {})} if backbone == "mlp" else {
            "data_shape": list(dataset.data_shape), "num_classes": dataset.num_classes, **(backbone_args or {})}
        config = TeacherConfig(sigma_data=dataset.sigma_data, p_uncond=label_dropout,
                               train=TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=100,
                                                 seed=seed, checkpoint_every=max(500, steps // 4), device=device))
        denoiser = train_teacher(dataset.train_x, dataset.train_y, backbone, args, config, run_dir, progress)
        return cls(denoiser, dataset, f"trained:{dataset.name}:{backbone}")

    @classmethod
    def cached(cls, dataset: str | DatasetSpec, backbone: str = "mlp", backbone_args: dict | None = None,
               steps: int = TEACHER_TRAINING_STEPS, batch_size: int = 256, lr: float = 1e-3,
               label_dropout: float = 0.1, seed: int = 0, progress: bool = True, device: str = "cpu") -> Teacher:
        """Load the teacher trained with exactly this recipe from the cache, training it first if needed (on
        ``device``; a GPU draws other random numbers than a CPU, so teachers trained on one are cached apart)."""
        dataset = as_dataset(dataset)
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
            "role": "teacher", "dataset": self.dataset.name, "dataset_kind": self.dataset.kind,
            "data_shape": list(self.dataset.data_shape),
            "normalisation": self.dataset.normalisation,
            "guidance": {"convention": self.guidance_convention, "scale": self.guidance_scale},
            "sampling": {str(DEFAULT_TEACHER_NFE): {
                "sampler": "heun", "sigmas": solver_sigmas("heun", DEFAULT_TEACHER_NFE).tolist()}},
            **extra})

    def with_guidance(self, scale: float, convention: str = "cfg") -> Teacher:
        return Teacher(self.denoiser, self.dataset, self.name, scale, convention, self.null, self.pipeline)

    @torch.no_grad()
    def sample(self, n: int, solver: str = "heun", nfe: int = DEFAULT_TEACHER_NFE, label: Tensor | None = None,
               seed: int = 0, noise: Tensor | None = None, cond: Condition | None = None) -> Tensor:
        """``n`` samples from the teacher's ODE with a training-free solver at ``nfe`` evaluations, on the
        teacher's device (``noise`` and the condition are moved there). ``label`` is a shorthand for ``cond``
        when the condition is class labels."""
        cond = one_condition(label, cond)
        if noise is None:
            noise = torch.randn((n, *self.dataset.data_shape), generator=torch.Generator().manual_seed(seed))
        noise, cond = on_device(self.denoiser.device, noise, cond)
        return solve(lambda x, s: self.guided(x, s, cond), noise, solver, nfe, sigma_max=start_level(self.denoiser))


def one_condition(label: Tensor | None, cond: Condition | None) -> Condition | None:
    if label is not None and cond is not None:
        raise ConfigError("give the condition once: label= (class labels) or cond=, not both")
    return cond if cond is not None else label
