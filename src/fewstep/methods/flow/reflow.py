"""Reflow (k-rectified flow). Liu, Gong & Liu, "Flow Straight and Fast: Learning to Generate and Transfer Data with
Rectified Flow", ICLR 2023; applied to a diffusion teacher as in Liu et al., "InstaFlow", ICLR 2024.

Round one trains the student on the teacher's coupling: pairs ``(z, x)`` of standard-normal noise and the
teacher's ODE endpoint from it (``teacher_pairs``: ``pair_solver`` at ``pair_nfe`` evaluations, cached, charged to
the run). With ``t`` uniform on ``[T_MIN, T_MAX]`` and the straight line ``z_t = (1 - t) x + t z`` (VE state
``x + s z``, ``s = t / (1 - t)``; see :mod:`fewstep.methods.flow.rectify`)::

    L = E_{(z, x), t} || v_theta(z_t, t) - (z - x) ||^2 = E || (x - D_theta(x + s z, s)) / t ||^2   (mean over dims)

Round ``k > 1`` (``rounds = k``) does the same on pairs that round ``k - 1``'s student makes itself
(``pair_solver`` at ``round_nfe`` evaluations, fresh noise), continuing from its weights with a fresh optimizer:
the k-rectified flow. The student samples with Euler on levels evenly spaced in ``t``.

Deviations from the paper: the student is initialised from the teacher's network and preconditioner (the paper
initialises the 2-rectified flow from the 1-rectified flow too); time stops at ``t = 80/81`` (the teacher's
``sigma_max = 80``) instead of 1; ``premetric = "pseudo_huber"`` is offered beside the paper's L2.
"""

from __future__ import annotations

from fewstep.methods.flow.rectify import RectifiedFlowConfig, RectifiedFlowMethod


class Reflow(RectifiedFlowMethod):
    """k-rectified flow: ``rounds`` reflow rounds, the first on the teacher's pairs."""

    name = "reflow"
    paper = "Liu et al. 2023, Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow"
    Config = RectifiedFlowConfig
