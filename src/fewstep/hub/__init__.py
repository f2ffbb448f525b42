"""Diffusers in and out: diffusers models as teachers (:func:`load_diffusers_denoiser`, used by
``fewstep.Teacher.from_diffusers``), and students exported as a fewstep folder, a diffusers pipeline folder
or diffusers-format LoRA weights (:func:`export_student`). Importing this module imports diffusers."""

from fewstep.hub.export import (
    FORMATS,
    ConsistencyModelLoraPipeline,
    add_lora,
    export_diffusers,
    export_fewstep,
    export_lora,
    export_student,
)
from fewstep.hub.scheduler import FewstepScheduler
from fewstep.hub.teachers import diffusers_denoiser, load_diffusers_denoiser, scheduler_reading

__all__ = ["FORMATS", "ConsistencyModelLoraPipeline", "FewstepScheduler", "add_lora", "diffusers_denoiser",
           "export_diffusers", "export_fewstep", "export_lora", "export_student", "load_diffusers_denoiser",
           "scheduler_reading"]
