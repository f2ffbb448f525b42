"""Forward evaluations of a method's own networks during training, counted by forward hooks, so no method counts by
hand (the teacher's are counted by its :class:`~fewstep.models.denoiser.CountingDenoiser`).

One *evaluation* is one forward pass of one network on one sample: a call on a batch of ``B`` samples counts ``B``,
whatever it costs inside; a backward pass is not a call. The networks are the method's direct sub-modules
(``named_children``: ``student``, ``target``, ``fake_score``, ``head``, ...). A call of a network, or of any
module inside it (e.g. a preconditioner's backbone called alone), counts once for that network, unless one of the
method's networks (the teacher included) is already running: what runs inside a call is part of it. So DMD2's GAN
head, which reads a feature captured during the fake score's own forward, adds one call of the head and none of
the fake score. A forward-mode JVP through a network is one call (one pass computes value and tangent); a
finite-difference JVP is the three passes it makes. Only calls inside :meth:`losses` count (the trainer turns
counting on around it), not a monitor's sampling nor a checkpointed block recomputed in the backward pass.

Roles: ``student`` is the student network (the child ``student``, or the one ``student_denoiser()`` returns) and
the copies of it a method keeps and evaluates (:data:`STUDENT_COPIES`: EMA targets, a previous round's student);
every other network is ``auxiliary`` (fake scores, discriminator heads, feature networks, weighting heads).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

STUDENT_COPIES = ("target", "previous", "previous_student")  # children that are copies of the student
ROLES = ("student", "auxiliary")


def batch_size(args: tuple, kwargs: dict) -> int:
    """The number of samples of a call: the leading size of its first tensor argument (0 without one)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return int(value.shape[0]) if value.ndim else 1
    return 0


class NetworkCalls:
    """Hooks on every network of ``method`` (see the module docstring) that count evaluations per sample while
    :meth:`counting` is on; ``evals`` maps each network's name (but the teacher's) to its count. Call
    :meth:`remove` to take the hooks off."""

    def __init__(self, method: nn.Module, teacher: str = "teacher"):
        student = method.student_denoiser() if hasattr(method, "student_denoiser") else None
        self.roles = {name: "student" if name == "student" or network is student or name in STUDENT_COPIES
                      else "auxiliary" for name, network in method.named_children() if name != teacher}
        self.evals = dict.fromkeys(self.roles, 0)
        self.on, self.running = False, 0
        self.handles = []
        networks = list(method.named_children())
        owners = {id(network): (name, network) for name, network in networks}  # a network is its own
        for name, network in networks:  # a module inside two networks is the first's
            for module in network.modules():
                owners.setdefault(id(module), (name, module))
        for name, module in owners.values():
            self.handles.append(module.register_forward_pre_hook(self._enter(name, name != teacher),
                                                                 with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, name: str, counted: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.on and counted and not self.running:
                self.evals[name] += batch_size(args, kwargs)
            self.running += 1
        return hook

    def _leave(self, module: nn.Module, args: tuple, output) -> None:
        self.running -= 1

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Count the calls made inside the block."""
        self.on = True
        try:
            yield
        finally:
            self.on = False

    def by_role(self, evals: dict[str, int] | None = None) -> dict[str, int]:
        """``evals`` (default: this counter's) summed by role."""
        evals = self.evals if evals is None else evals
        return {role: sum(n for name, n in evals.items() if self.roles.get(name, "auxiliary") == role)
                for role in ROLES}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
