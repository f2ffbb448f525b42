"""InstaFlow: reflow, then one-step distillation. Liu, Zhang, Ma, Peng & Liu, "InstaFlow: One Step is Enough for
High-Quality Diffusion-Based Text-to-Image Generation", ICLR 2024.

Stages (:mod:`fewstep.methods.flow.rectify`): ``rounds`` reflow rounds exactly as :mod:`~.reflow` (round one on
the teacher's pairs: the 2-rectified flow), then distillation of the last reflow student's ODE into the student's
own one-step map, continuing from the reflow weights with a fresh optimizer. The distillation pairs ``(z, x')``
are that reflow student's ODE endpoints (``pair_solver`` at ``round_nfe`` evaluations)::

    L = E_z || T_theta(z) - x' ||^2 / t_max^2  +  reflow_weight L_reflow(z, x'),
    T_theta(z) = D_theta(sigma_max z, sigma_max)

the first term being the velocity error of the single Euler step from ``t_max``, the second the reflow loss on
the same pairs (uniform ``t``), which keeps 2- and 4-step Euler sampling working.

Deviations from the paper: L2 instead of LPIPS (not offered, as for CD; ``premetric = "pseudo_huber"`` is);
the reflow term in the distillation stage (the paper's one-step model is sampled at one step only); no text
conditioning or guidance beyond what the teacher's pairs carry.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep.data.batch import Batch
from fewstep.methods.flow.rectify import T_MAX, DistillingFlowConfig, RectifiedFlowMethod
from fewstep.solvers import SIGMA_MAX


class InstaFlow(RectifiedFlowMethod):
    """Reflow rounds, then distillation of the reflowed ODE into the student's one-step map."""

    name = "instaflow"
    paper = "Liu et al. 2024, InstaFlow: One Step is Enough for High-Quality Diffusion-Based Text-to-Image Generation"
    Config = DistillingFlowConfig
    distills = True

    def distill_losses(self, pairs: Batch, generator: torch.Generator) -> dict[str, Tensor]:
        """The one-step map's velocity error against the reflow student's endpoint."""
        noise = pairs.noise
        top = torch.full((noise.shape[0],), SIGMA_MAX, device=noise.device, dtype=noise.dtype)
        jump = self.student(SIGMA_MAX * noise, top, pairs.cond)
        distill = self.premetric(jump, pairs.endpoint, torch.full_like(top, T_MAX)).mean()
        return {"loss": distill, "distill": distill}
