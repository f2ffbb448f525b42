"""``FewstepScheduler``: a diffusers scheduler that samples exactly as a fewstep student does.

It holds the student's preconditioner config (``denoiser.config()``) and its sampling schedules per NFE,
and rebuilds the preconditioner around a stand-in backbone: :meth:`scale_model_input` and the timesteps are
what the student's network receives, and :meth:`step` reads the network output through the same code as
the student (so ``x0`` is bit-for-bit fewstep's) and then takes the student's own sampler step (``euler``
or multistep ``consistency``). States are in fewstep's VE coordinate ``x = x0 + s eps``, so the pipeline's
initial noise is scaled by ``init_noise_sigma = s_0``.

Load a pipeline that uses it after ``import fewstep.hub`` (diffusers resolves the scheduler's module from
the running process).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from torch import Tensor, nn

from fewstep.models.denoiser import denoiser_from_config


class NetworkStandIn(nn.Module):
    """A backbone that records what it is given and returns a preset output."""

    data_shape: tuple[int, ...] = ()
    num_classes = 0

    def __init__(self):
        super().__init__()
        self.inputs: tuple[Tensor, Tensor] | None = None
        self.output: Tensor | None = None

    def forward(self, x, t_model, label=None, extra=None):
        self.inputs = (x, t_model)
        return self.output if self.output is not None else torch.zeros_like(x)


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """Samples with a fewstep student's preconditioner and schedule. ``sampling`` maps an NFE (as a string)
    to ``{"sampler": "euler" | "consistency", "sigmas": [...]}``; ``set_timesteps(n)`` picks NFE ``n``."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, denoiser: dict, sampling: dict, default_nfe: int = 1):
        for nfe, spec in sampling.items():
            if spec["sampler"] not in ("euler", "consistency"):
                raise ValueError(f"FewstepScheduler samples with 'euler' or 'consistency', NFE {nfe} uses "
                                 f"{spec['sampler']!r}")
        self.stand_in = NetworkStandIn()
        self.reader = denoiser_from_config(self.stand_in, denoiser)
        self.set_timesteps(default_nfe)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        key = str(num_inference_steps)
        if key not in self.config.sampling:
            raise ValueError(f"this student samples at NFE {sorted(self.config.sampling, key=int)}; "
                             f"got num_inference_steps={num_inference_steps}")
        spec = self.config.sampling[key]
        self.sampler = spec["sampler"]
        sigmas = torch.tensor(spec["sigmas"], dtype=torch.float32)
        if self.sampler == "consistency":
            self.levels = [float(s) for s in sigmas if s > 0]
            self.sigmas = torch.tensor([*self.levels, 0.0], dtype=torch.float32)
        else:
            self.sigmas = sigmas
            self.levels = [float(s) for s in sigmas[:-1]]
        self.num_inference_steps = len(self.levels)
        self.timesteps = torch.stack([self._network_inputs(torch.zeros(1, 1), s)[1][0] for s in self.levels])
        if device is not None:
            self.timesteps = self.timesteps.to(device)
        self.step_index = 0

    @property
    def init_noise_sigma(self) -> Tensor:
        return self.sigmas[0]

    def _network_inputs(self, sample: Tensor, s: float) -> tuple[Tensor, Tensor]:
        self.stand_in.output = None
        self.reader(sample, torch.full((sample.shape[0],), s, dtype=sample.dtype, device=sample.device))
        return self.stand_in.inputs

    def scale_model_input(self, sample: Tensor, timestep: Tensor | None = None) -> Tensor:
        return self._network_inputs(sample, self.levels[self.step_index])[0]

    def step(self, model_output: Tensor, timestep: Tensor, sample: Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple[Tensor]:
        i = self.step_index
        s = self.levels[i]
        self.stand_in.output = model_output
        x0 = self.reader(sample, torch.full((sample.shape[0],), s, dtype=sample.dtype, device=sample.device))
        self.stand_in.output = None
        if self.sampler == "euler":
            s_now, s_next = self.sigmas[i].to(sample), self.sigmas[i + 1].to(sample)
            prev = x0 + (s_next / s_now) * (sample - x0)
        elif i + 1 < len(self.levels):
            z = torch.randn(sample.shape, generator=generator, dtype=sample.dtype, device=sample.device)
            prev = x0 + self.levels[i + 1] * z
        else:
            prev = x0
        self.step_index += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
