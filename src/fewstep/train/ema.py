"""Exponential moving average of a module's weights (the weights evaluation and export use)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def warmup_decay(decay: float, updates: int) -> float:
    """``min(decay, (1 + n) / (10 + n))`` after ``n`` earlier updates (TensorFlow's ``num_updates`` warm-up):
    early averages forget the random initialisation quickly, later ones use ``decay``."""
    return min(decay, (1 + updates) / (10 + updates))


class EMA:
    """A copy of ``module.state_dict()``: floating-point parameters are averaged,
    ``shadow = decay * shadow + (1 - decay) * value``; buffers (and non-float entries) are copied. Parameters frozen
    when the EMA is made (a LoRA student's base weights) never change, so the shadow holds them by reference."""

    def __init__(self, module: nn.Module):
        self.parameter_names = {name for name, _ in module.named_parameters()}
        self.frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
        self.shadow = {name: value.detach() if name in self.frozen else value.detach().clone()
                       for name, value in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module, decay: float) -> None:
        for name, value in module.state_dict().items():
            shadow = self.shadow[name]
            if name in self.frozen:
                continue
            if name in self.parameter_names and value.is_floating_point():
                shadow.lerp_(value, 1.0 - decay)
            else:
                shadow.copy_(value)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise KeyError(f"EMA state has keys {sorted(set(state) ^ set(self.shadow))} that do not match the module")
        for name, value in state.items():
            self.shadow[name].copy_(value)
