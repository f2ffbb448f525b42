"""``FewstepScheduler``: a diffusers scheduler that samples exactly as a fewstep student does.

It holds the student's preconditioner config (``denoiser.config()``) and its sampling schedules per NFE,
and rebuilds the preconditioner around a stand-in backbone: :meth:`scale_model_input` and the timesteps are
what the student's network receives, and :meth:`step` reads the network output through the same code as
the student (so ``x0`` is bit-for-bit fewstep's) and then takes the student's own sampler step (``euler``
or multistep ``consistency``).

The state the pipeline holds between steps (``state``):

* ``"ve"`` (the UNet pipelines: SD, SDXL, consistency models): fewstep's VE coordinate ``x = x0 + s eps``; the
  pipeline scales its initial noise by ``init_noise_sigma = s_0`` and calls :meth:`scale_model_input`;
* ``"network"`` (SD3, FLUX: pipelines that feed their latents to the network as they are): the network's own input
  ``c_in(s) x`` (on a rectified-flow path ``x_t = (1 - t) x0 + t eps``). These pipelines do not scale their initial
  noise: pass ``latents = noise * scheduler.init_noise_sigma`` (``c_in(s_0) s_0``) for the student's exact
  samples; unscaled noise starts the student from ``x_t = eps``, the pipeline's own convention.
  ``timestep_scale`` is the factor the pipeline divides timesteps by before the network (FLUX: 1000), and
  ``packed_shape`` the ``(C, H, W)`` of latents the pipeline holds as 2x2 patches (FLUX), so that re-noising draws
  the student's noise and packs it. These pipelines do not pass their ``generator`` to :meth:`step`: a multi-step
  ``consistency`` schedule re-noises from torch's global generator (seed it with ``torch.manual_seed``).

Load a pipeline that uses it after ``import fewstep.hub`` (diffusers resolves the scheduler's module from
the running process).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from torch import Tensor, nn

from fewstep.models.denoiser import denoiser_from_config
from fewstep.nets.diffusers_backbone import pack_patches


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


STATES = ("ve", "network")


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """Samples with a fewstep student's preconditioner and schedule. ``sampling`` maps an NFE (as a string)
    to ``{"sampler": "euler" | "consistency", "sigmas": [...]}``; ``set_timesteps(n)`` picks NFE ``n``.
    ``use_flow_sigmas`` (always true) tells FLUX's pipeline to leave the levels to this scheduler."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, denoiser: dict, sampling: dict, default_nfe: int = 1, state: str = "ve",
                 timestep_scale: float = 1.0, packed_shape: list[int] | None = None, use_flow_sigmas: bool = True):
        for nfe, spec in sampling.items():
            if spec["sampler"] not in ("euler", "consistency"):
                raise ValueError(f"FewstepScheduler samples with 'euler' or 'consistency', NFE {nfe} uses "
                                 f"{spec['sampler']!r}")
        if state not in STATES:
            raise ValueError(f"FewstepScheduler state must be one of {STATES}; got {state!r}")
        self.stand_in = NetworkStandIn()
        self.reader = denoiser_from_config(self.stand_in, denoiser)
        self.set_timesteps(default_nfe)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                      mu: float | None = None) -> None:
        """Picks the student's schedule for ``num_inference_steps``. ``mu`` (FLUX passes its resolution-dependent
        shift) has no effect: the student's levels are the ones it was distilled for."""
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
        scale = self.config.timestep_scale
        self.timesteps = torch.stack([self._network_inputs(torch.zeros(1, 1), s)[1][0] * scale for s in self.levels])
        if device is not None:
            self.timesteps = self.timesteps.to(device)
        self.step_index = 0

    def set_begin_index(self, begin_index: int = 0) -> None:
        self.step_index = begin_index

    @property
    def init_noise_sigma(self) -> Tensor:
        """What unit noise is multiplied by to give the first state."""
        return self.sigmas[0] * self._state_scale(self.levels[0])

    def _state_scale(self, s: float) -> float:
        """State over VE coordinate at level ``s``: 1, or the network's input scale ``c_in(s)``."""
        if self.config.state == "ve" or s == 0:
            return 1.0
        return float(self._network_inputs(torch.ones(1, 1), s)[0][0, 0])

    def _network_inputs(self, sample: Tensor, s: float) -> tuple[Tensor, Tensor]:
        self.stand_in.output = None
        self.reader(sample, torch.full((sample.shape[0],), s, dtype=sample.dtype, device=sample.device))
        return self.stand_in.inputs

    def scale_model_input(self, sample: Tensor, timestep: Tensor | None = None) -> Tensor:
        if self.config.state == "network":
            return sample
        return self._network_inputs(sample, self.levels[self.step_index])[0]

    def _noise(self, sample: Tensor, generator: torch.Generator | None) -> Tensor:
        packed = self.config.packed_shape
        shape = sample.shape if packed is None else (sample.shape[0], *packed)
        z = torch.randn(shape, generator=generator, dtype=sample.dtype, device=sample.device)
        return z if packed is None else pack_patches(z)

    def step(self, model_output: Tensor, timestep: Tensor, sample: Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple[Tensor]:
        i = self.step_index
        s = self.levels[i]
        sample = sample / self._state_scale(s)
        self.stand_in.output = model_output
        x0 = self.reader(sample, torch.full((sample.shape[0],), s, dtype=sample.dtype, device=sample.device))
        self.stand_in.output = None
        if self.sampler == "euler":
            s_now, s_next = self.sigmas[i].to(sample), self.sigmas[i + 1].to(sample)
            prev = x0 + (s_next / s_now) * (sample - x0)
        elif i + 1 < len(self.levels):
            z = self._noise(sample, generator)
            prev = x0 + self.levels[i + 1] * z
        else:
            prev = x0
        prev = prev * self._state_scale(float(self.sigmas[i + 1]))
        self.step_index += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
