"""The training loop: one loop for every distillation method, and for teacher training.

A *method* is a :class:`fewstep.methods.base.DistillationMethod` or any ``nn.Module`` with the same
protocol (:class:`Trainable`; e.g. :class:`fewstep.train.teacher.TeacherTraining`). The loop knows nothing of its
insides::

    for step in range(start, config.steps):            # one step = one cycle over the phases
        for phase in method.phases():                  # in order, each with its own AdamW
            repeat phase.updates times:
                batch  = source.batch(config.batch_size, data_generator)
                losses = method.losses(phase.name, batch, step, noise_generator)
                if losses["loss"] has no gradient: the phase is idle this update (logged, nothing stepped)
                else: zero all grads; backward(losses["loss"]); clip; optimizer[phase].step()
                      if method.after_update(phase.name, step): reset optimizer[phase]
        EMA of method.student_denoiser()
        every monitor.every steps: log monitor(step, student)   (e.g. modes covered, recall), at once

Each phase's optimizer is AdamW with the run's settings (``TrainConfig``), overridden by the phase's own
(:class:`~fewstep.methods.base.Phase`: learning-rate scale, betas, weight decay, gradient clip).
Teacher evaluations are the method's own count (``method.teacher_evals``, which a counting wrapper keeps) plus
what the source's signal cost to make (``source.teacher_evals``: teacher pairs). The method's other networks (the
student and its target copies, fake scores, discriminator heads) are counted the same way, per sample, by forward
hooks (:mod:`fewstep.train.calls`), by network and by role. The counts are checkpointed, so a resumed run reports
the whole run's.

``config.steps`` therefore counts cycles: a method with phases "fake_score" x5 and "generator" x1 makes six
optimizer updates per step. ``step`` (the value methods see) is the 0-based cycle index; a checkpoint at
step ``n`` holds the state after ``n`` cycles, so a resumed run's first cycle is ``step = n``.

Randomness: ``torch.manual_seed(seed)`` (global RNG, e.g. dropout), a CPU generator seeded ``seed`` for
``source.batch`` and a generator on the training device seeded ``seed + 1`` for the method's own draws
(so a method draws with ``device=x.device``, e.g. ``torch.randn(x.shape, generator=generator, device=x.device)``).
All three are checkpointed, so a run split by a resume is bitwise equal to an uninterrupted one, provided
all state lives where the checkpoint sees it: the method's ``state_dict`` (parameters, buffers, and
``get_extra_state`` for JSON-serialisable non-tensor state) and, for a source with state of its own (e.g. its
position in an epoch), the source's optional ``state_dict()`` / ``load_state_dict(state)``. The values of the
log window not yet written are checkpointed too, so the resumed run's ``log.csv`` equals an uninterrupted run's
(but for ``seconds``).

Safety of a run directory (see :func:`train`): one run at a time holds it (``run_dir/.lock``); a resume refuses a
checkpoint trained under other settings unless told to allow them; Ctrl-C finishes the running step, checkpoints
it and then raises KeyboardInterrupt, so an interrupted run loses no finished step.

Scale (see :mod:`fewstep.train.parallel` and :mod:`fewstep.train.memory`):

* ``batch_size`` is the *global* batch of one optimizer update. Every process draws the same global batch
  (same data generator, same source state) and keeps its own slice; with ``grad_accumulation = k`` each
  process's slice is further cut into ``k`` micro-batches whose gradients are summed (each loss divided by
  ``k``). So each process holds ``batch_size / (num_processes * k)`` samples at a time, the data a run sees
  does not depend on the process count, and ``batch_size`` must be a multiple of ``num_processes * k``.
* After the backward passes the phase's gradients and the logged loss values are averaged over processes;
  the update equals a one-process update on the global batch (up to the method's own noise draws, which come
  from a per-process noise generator so processes do not repeat each other's noise).
* Rank 0 alone writes checkpoints, ``log.csv``, tensorboard, ``memory.json`` and the progress bar. Stop
  decisions agree on every process: ``max_seconds`` is rank 0's clock, broadcast; the divergence checks use
  the averaged losses and the (identical, or under FSDP all-reduced per shard) weights.
* ``distributed: fsdp`` shards every network's weights, gradients and optimizer state over the processes
  instead of replicating them (:mod:`fewstep.train.sharding`); with one process it is the same as ``ddp``.
  The method's networks stay sharded after ``train`` returns; the returned ``ema_student`` is whole.
* Checkpoints do not depend on the process count: replicas are identical, so rank 0's weights, EMA and
  optimizer states are the whole state (under FSDP they are gathered from the shards first); the step is
  the global step. Each process's own generators are stored by rank and restored when resuming under the
  same process count; under another count each process's noise and global RNG are re-seeded from
  ``(seed, rank, step)``.
* ``mixed_precision: bf16`` runs ``method.losses`` under ``torch.autocast`` in bfloat16 (weights and
  optimizer stay float32); ``teacher_dtype`` stores the frozen teacher in a lower precision;
  ``gradient_checkpointing`` recomputes backbone blocks in the backward pass.

Accelerate sets up the process (device, and the process group when launched with several processes) and
does the backward pass. The method is not passed through ``accelerator.prepare``; see
:mod:`fewstep.train.parallel` for why gradients are averaged explicitly. Accelerate keeps one state per
process, so the first ``train`` call fixes the device for the whole process, and a later call asking for
another device raises :class:`ConfigError`.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from fewstep.errors import CheckpointError, ConfigError, TrainingDiverged
from fewstep.locks import lock_folder
from fewstep.methods.base import Phase
from fewstep.models.denoiser import Denoiser
from fewstep.models.io import check_state_fits, one_line
from fewstep.threads import share_cpu
from fewstep.train.calls import NetworkCalls
from fewstep.train.checkpoint import (
    Checkpoint,
    checkpoint_folder,
    decode_rng_state,
    encode_rng_state,
    load_checkpoint,
    save_checkpoint,
)
from fewstep.train.ema import EMA, warmup_decay
from fewstep.train.memory import (
    TEACHER_DTYPES,
    enable_gradient_checkpointing,
    format_plan,
    memory_plan,
    set_teacher_dtype,
)
from fewstep.train.parallel import average, average_gradients, gather, local, rank0_decides, total
from fewstep.train.sharding import (
    full_optimizer_state,
    full_state,
    reshard,
    shard_like,
    shard_networks,
    shard_optimizer_state,
)

MIXED = ("no", "bf16")
DISTRIBUTED = ("ddp", "fsdp")
LR_SCHEDULES = ("constant", "cosine")
IDLE = "idle"  # logged per phase: the share of its updates in the window that were idle (no gradient)
FREE_SETTINGS = ("steps", "max_seconds", "log_every", "checkpoint_every")  # may change between legs of a run


class Trainable(Protocol):
    """What the loop needs of a method (see :mod:`fewstep.methods.base` for the full protocol)."""

    fsdp_refusal: str | None
    teacher_evals: int

    def phases(self) -> list[Phase]: ...

    def losses(self, phase: str, batch, step: int, generator: torch.Generator) -> dict[str, Tensor]: ...

    def after_update(self, phase: str, step: int) -> bool: ...

    def student_denoiser(self) -> Denoiser: ...


class Monitor(Protocol):
    """A check run every ``every`` steps on the student being trained (e.g.
    :class:`fewstep.train.monitor.SampleMonitor`); it returns numbers to log."""

    every: int

    def __call__(self, step: int, student: Denoiser) -> dict[str, float]: ...


@dataclass
class TrainConfig:
    """Loop settings shared by all methods.

    ``lr`` is the AdamW learning rate of a phase with ``lr_scale = 1``; its default suits fine-tuning a
    student initialised from its teacher (teachers trained from scratch use 1e-3, see
    :mod:`fewstep.train.teacher`). ``warmup_steps`` ramps every learning rate linearly over the first
    steps; ``lr_schedule`` then keeps it (``"constant"``) or anneals it to 0 at the last step (``"cosine"``),
    see :func:`lr_factor`. ``grad_clip`` is the maximum gradient norm of one phase update (0 disables clipping).
    ``ema_decay`` is reached after a warm-up, see :func:`fewstep.train.ema.warmup_decay`. ``max_seconds``
    caps this call's wall time: training stops at the first step boundary past it (and checkpoints).

    Scale: ``batch_size`` is the global batch of one update over all processes; ``grad_accumulation``
    splits each process's share into that many micro-batches; ``mixed_precision`` is ``"no"`` or ``"bf16"``
    (autocast of the losses); ``teacher_dtype`` (float32, bfloat16, float16) is the frozen teacher's weight
    dtype; ``gradient_checkpointing`` recomputes backbone blocks in the backward pass; ``distributed`` is
    ``"ddp"`` (replicated weights, averaged gradients) or ``"fsdp"`` (weights, gradients and optimizer
    state sharded over the processes, :mod:`fewstep.train.sharding`)."""

    steps: int = 2000
    batch_size: int = 256
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    device: str = "cpu"
    max_seconds: float | None = None
    grad_accumulation: int = 1
    mixed_precision: str = "no"
    teacher_dtype: str = "float32"
    gradient_checkpointing: bool = False
    distributed: str = "ddp"

    def __post_init__(self):
        self.betas = tuple(self.betas)
        checks = {
            "steps": self.steps >= 0, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
            "betas": len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "weight_decay": self.weight_decay >= 0, "grad_clip": self.grad_clip >= 0,
            "warmup_steps": self.warmup_steps >= 0, "lr_schedule": self.lr_schedule in LR_SCHEDULES,
            "ema_decay": 0 <= self.ema_decay <= 1,
            "log_every": self.log_every >= 1, "checkpoint_every": self.checkpoint_every >= 1,
            "max_seconds": self.max_seconds is None or self.max_seconds >= 0,
            "grad_accumulation": self.grad_accumulation >= 1, "mixed_precision": self.mixed_precision in MIXED,
            "teacher_dtype": self.teacher_dtype in TEACHER_DTYPES, "distributed": self.distributed in DISTRIBUTED,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"train config: invalid {bad[0]} = {getattr(self, bad[0])!r}")


def lr_factor(step: int, config: TrainConfig) -> float:
    """The learning rate of 0-based ``step`` over ``config.lr``: a linear warm-up over ``warmup_steps``
    times, for ``"cosine"``, ``(1 + cos(pi k / K)) / 2`` with ``k`` the steps after the warm-up and ``K``
    their number (1 at the first, near 0 at the last)."""
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    if config.lr_schedule == "constant":
        return warmup
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, max(0, step - config.warmup_steps) / span)
    return warmup * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    """``steps_done`` and ``seconds`` count the whole run, across resumes. ``losses`` maps
    ``"phase/loss_name"`` to its mean over the last log window. ``ema_student`` is a copy of the student
    denoiser holding the EMA weights, in eval mode, on the training device. ``teacher_evals`` counts the teacher's
    evaluations (one per sample a call denoises); ``network_evals`` the method's other networks' by name, and
    ``student_evals`` and ``auxiliary_evals`` those by role (:mod:`fewstep.train.calls`), also per sample."""

    steps_done: int
    seconds: float
    losses: dict[str, float]
    ema_student: Denoiser
    stopped_early: bool
    teacher_evals: int
    checkpoint: Path | None
    network_evals: dict[str, int] = field(default_factory=dict)
    student_evals: int = 0
    auxiliary_evals: int = 0

    @property
    def other_evals(self) -> int:
        """Evaluations of every network but the teacher (student and auxiliary)."""
        return self.student_evals + self.auxiliary_evals

    def evals(self) -> dict:
        """The network evaluations of the run, for a report: the teacher's, by role and by network."""
        return {"teacher_evals": self.teacher_evals, "student_evals": self.student_evals,
                "auxiliary_evals": self.auxiliary_evals, "network_evals": dict(self.network_evals)}


def train(method: Trainable, source, config: TrainConfig, run_dir: str | Path | None = None,
          resume: bool = True, *, allow_changes: bool = False, progress: bool = True,
          monitors: tuple[Monitor, ...] = ()) -> TrainResult:
    """Train ``method`` on batches from ``source`` (anything with ``batch(batch_size, generator)`` and
    ``teacher_evals``; see :mod:`fewstep.data.sources`).

    With ``run_dir``: checkpoints (``checkpoint/``), ``log.csv`` (losses per phase; the numbers of ``monitors``, run
    on the live student every ``monitor.every`` steps, as phase ``monitor``, ``monitor1``, ...), ``memory.json``
    and, when tensorboard is installed, ``tensorboard/``; with ``resume`` an existing checkpoint is continued (also
    under another process count). A non-finite loss or weight raises :class:`TrainingDiverged` without
    checkpointing the bad state. In a multi-process run every process calls this with the same arguments.

    The run holds ``run_dir/.lock`` throughout (:func:`fewstep.locks.lock_folder`, taken by rank 0): a second run
    on the folder raises :class:`ConfigError`. Resuming refuses a checkpoint trained under other settings (the
    ``TrainConfig`` but :data:`FREE_SETTINGS`, ``steps`` also when ``lr_schedule`` is ``"cosine"`` since the
    schedule spans it, and the method's ``config`` dataclass) with :class:`ConfigError`; ``allow_changes``
    continues anyway and logs the changes (a ``log.csv`` row of phase ``resume``). Ctrl-C (SIGINT, caught in the
    main thread while this runs) lets the running step finish, checkpoints it and raises KeyboardInterrupt, so no
    finished step is lost; a second Ctrl-C raises at once. With SIGINT ignored (``SIG_IGN``) it stays ignored."""
    accelerator = accelerator_for(config.device)
    run_dir = None if run_dir is None else Path(run_dir)
    with ExitStack() as stack:
        if run_dir is not None:
            _lock(stack, run_dir, f"fewstep training {type(method).__name__}", accelerator)
        interrupt = stack.enter_context(_catch_interrupts(run_dir is not None and accelerator.is_main_process))
        result = _train(method, source, config, run_dir, resume, allow_changes, progress, monitors, accelerator,
                        interrupt)
        if interrupt.requested:  # after the last step boundary: the run is complete and checkpointed
            raise KeyboardInterrupt
    return result


def _train(method: Trainable, source, config: TrainConfig, run_dir: Path | None, resume: bool, allow_changes: bool,
           progress: bool, monitors: tuple[Monitor, ...], accelerator: Accelerator,
           interrupt: _Interrupt) -> TrainResult:
    """:func:`train` inside its lock and SIGINT handler."""
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    if config.distributed == "fsdp" and method.fsdp_refusal:
        raise ConfigError(f"train.distributed=fsdp: {type(method).__name__} cannot be sharded: "
                          f"{method.fsdp_refusal}; use train.distributed=ddp")
    if config.batch_size % (world * config.grad_accumulation):
        raise ConfigError(f"train.batch_size={config.batch_size} must be a multiple of the number of processes "
                          f"({world}) times train.grad_accumulation ({config.grad_accumulation})")

    torch.manual_seed(_rank_seed(config.seed, rank))
    generators = {"data": torch.Generator().manual_seed(config.seed),
                  "noise": torch.Generator(device=device).manual_seed(_rank_seed(config.seed + 1, rank))}
    set_teacher_dtype(method, config.teacher_dtype)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(method)
    method.to(device).train()
    student = method.student_denoiser()
    sharded = config.distributed == "fsdp" and world > 1
    whole_student = copy.deepcopy(student) if sharded else student  # what the EMA weights are returned in
    sharded_networks = shard_networks(method, device, world) if sharded else []
    ema = EMA(student)
    phase_list = method.phases()
    phases = {phase.name: phase for phase in phase_list}
    if len(phases) != len(phase_list):
        raise ValueError(f"{type(method).__name__}.phases() must have distinct names")
    optimizers = {name: _optimizer(phase, config) for name, phase in phases.items()}  # lr is set every step

    calls = NetworkCalls(method)
    start, seconds_before, evals_before, last_good, changes = 0, 0.0, 0, None, []
    calls_before: dict[str, int] = {}
    window: dict[str, dict[str, list[float]]] = {}  # the log window's values so far, by phase and loss name
    if run_dir is not None and resume and checkpoint_folder(run_dir) is not None:
        checkpoint = load_checkpoint(run_dir)
        changes = _check_settings(checkpoint, method, config, allow_changes)
        seconds_before, evals_before, calls_before = _restore(checkpoint, method, source, ema, optimizers,
                                                              generators, config, rank, world)
        start, last_good = checkpoint.step, (checkpoint.step, checkpoint.folder)
        window = checkpoint.state.get("log_window", {})
    evals_at_start = method.teacher_evals

    log = CSVLog(run_dir / "log.csv", keep_until_step=start) if run_dir is not None and main else None
    if changes and main:
        tqdm.write(f"resuming {run_dir} at step {start} under changed settings: {', '.join(changes)}")
        if log is not None:
            log.append([{"step": start, "phase": "resume", "changed": ", ".join(changes),
                         "seconds": round(seconds_before, 3)}])
    writer = _tensorboard_writer(run_dir) if run_dir is not None and main else None
    bar = tqdm(total=config.steps, initial=start, disable=not (progress and main), unit="step",
               desc=type(method).__name__)
    last_losses: dict[str, float] = {}
    started = time.perf_counter()
    done, stopped_early = start, False

    def seconds() -> float:
        return seconds_before + time.perf_counter() - started

    def teacher_evals() -> int:
        """The method's teacher evaluations over the whole run, all processes (a collective)."""
        spent = method.teacher_evals - evals_at_start
        return evals_before + (total(int(spent), device) if world > 1 else int(spent))

    def network_evals() -> dict[str, int]:
        """The evaluations of the method's other networks over the whole run, all processes (a collective)."""
        return {name: calls_before.get(name, 0) + (total(spent, device) if world > 1 else spent)
                for name, spent in calls.evals.items()}

    def flush_window() -> None:
        rows = [{"step": done, "phase": name, **{k: sum(v) / len(v) for k, v in values.items()
                                                 if k != IDLE or any(v)},  # "idle" only where a phase idled
                 "seconds": round(seconds(), 3)} for name, values in window.items()]
        last_losses.clear()
        for row in rows:
            last_losses.update({f"{row['phase']}/{k}": v for k, v in row.items() if k not in CSVLog.FIXED})
        bar.set_postfix({row["phase"]: f"{row['loss']:.4g}" for row in rows if "loss" in row})
        if log is not None:
            log.append(rows)
        if writer is not None:
            for tag, value in last_losses.items():
                writer.add_scalar(tag, value, done)
        window.clear()

    def record(phase: str, values: dict[str, float]) -> None:
        """Log a monitor's numbers at once, at the step they were measured (rank 0 writes)."""
        if log is not None:
            log.append([{"step": done, "phase": phase, **values, "seconds": round(seconds(), 3)}])
        if writer is not None:
            for key, value in values.items():
                writer.add_scalar(f"{phase}/{key}", value, done)

    def save() -> tuple[int, Path]:
        return done, _save(run_dir, done, method, source, ema, optimizers, generators, config, seconds(),
                           teacher_evals(), network_evals(), window, device, main)

    try:
        for step in range(start, config.steps):
            share_cpu()
            for name in list(phases):
                for group in optimizers[name].param_groups:
                    group["lr"] = config.lr * phases[name].lr_scale * lr_factor(step, config)
                for _ in range(phases[name].updates):
                    losses = _update(method, phases[name], optimizers[name], source, step, generators, config,
                                     accelerator, last_good, calls)
                    reshard(sharded_networks)
                    idle = losses.pop(IDLE)
                    for key, value in losses.items():
                        window.setdefault(name, {}).setdefault(key, []).append(value)
                    window.setdefault(name, {}).setdefault(IDLE, []).append(float(idle))
                    if not idle and method.after_update(name, step):
                        phases[name] = {phase.name: phase for phase in method.phases()}[name]
                        optimizers[name] = _optimizer(phases[name], config, lr_factor(step, config))
            ema.update(student, warmup_decay(config.ema_decay, step))
            if step == start and main:
                _report_memory(method, phases, optimizers, device, run_dir, progress)
            done = step + 1
            bar.update(1)
            for index, monitor in enumerate(monitors):
                if done % monitor.every == 0:
                    record(f"monitor{index or ''}", _watch(monitor, done, student, method))
            if done % config.log_every == 0:
                flush_window()
            out_of_time = config.max_seconds is not None and time.perf_counter() - started >= config.max_seconds
            if world > 1:
                out_of_time = rank0_decides(out_of_time, device)
            stopped_early = out_of_time and done < config.steps
            interrupted = rank0_decides(interrupt.requested, device) if world > 1 else interrupt.requested
            if run_dir is not None and (done % config.checkpoint_every == 0 or stopped_early or interrupted):
                last_good = save()
            if interrupted:
                if main:
                    saved = f": checkpointed in {last_good[1]}" if run_dir is not None else ""
                    bar.write(f"interrupted at step {done} of {config.steps}{saved}")
                raise KeyboardInterrupt
            if stopped_early:
                bar.write(f"stopped early at step {done} of {config.steps}: max_seconds={config.max_seconds} reached")
                break
        if window:
            flush_window()
        if run_dir is not None and (last_good is None or last_good[0] != done):
            last_good = save()
    finally:
        bar.close()
        calls.remove()
        if writer is not None:
            writer.close()

    method.zero_grad(set_to_none=True)
    frozen = {id(p): p for p in whole_student.parameters() if not p.requires_grad}  # shared, as in the EMA
    ema_student = copy.deepcopy(whole_student, frozen)
    ema_student.load_state_dict(full_state(ema.state_dict()))
    networks = network_evals()
    roles = calls.by_role(networks)
    return TrainResult(
        steps_done=done, seconds=seconds(), losses=dict(last_losses), ema_student=ema_student.eval(),
        stopped_early=stopped_early, teacher_evals=teacher_evals() + int(source.teacher_evals),
        checkpoint=None if last_good is None else last_good[1], network_evals=networks,
        student_evals=roles["student"], auxiliary_evals=roles["auxiliary"])


def _lock(stack: ExitStack, run_dir: Path, what: str, accelerator: Accelerator) -> None:
    """Rank 0 locks ``run_dir`` until ``stack`` closes; every process raises :class:`ConfigError` if it could not."""
    refusal = None
    if accelerator.is_main_process:
        try:
            stack.enter_context(lock_folder(run_dir, what))
        except (ConfigError, OSError) as error:  # raised after the other processes know, or they would wait
            refusal = error
    refused = refusal is not None
    if accelerator.num_processes > 1:
        refused = rank0_decides(refused, accelerator.device)
    if refusal is not None:
        raise refusal
    if refused:
        raise ConfigError(f"{run_dir} is in use by another run: process 0 could not lock it (its error says by whom)")


class _Interrupt:
    """The SIGINT handler while :func:`train` runs: the first signal sets ``requested`` (the loop checkpoints at the
    next step boundary, then raises KeyboardInterrupt); a second raises KeyboardInterrupt at once."""

    def __init__(self, saves: bool):
        self.requested = False
        self.saves = saves

    def __call__(self, signum: int, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        then = "checkpoint it and stop" if self.saves else "stop"
        with suppress(OSError):  # os.write, not print: the handler may run in the middle of a write to stderr
            os.write(2, f"\nfewstep: interrupted: finishing the current step to {then}; Ctrl-C again stops at "
                     f"once\n".encode())


@contextmanager
def _catch_interrupts(saves: bool) -> Iterator[_Interrupt]:
    """Handle SIGINT with an :class:`_Interrupt` for the ``with`` block, in the main thread (signal handlers can
    only be set there) and unless SIGINT is ignored; the previous handler is restored afterwards."""
    interrupt = _Interrupt(saves)
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        yield interrupt
        return
    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield interrupt
    finally:  # None: a handler set outside Python, which cannot be put back
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


def _settings(method: nn.Module, config: TrainConfig) -> dict:
    """What a checkpoint records of the settings it was trained under: ``config`` and the method's ``config``
    dataclass, if it has one (less a ``TrainConfig`` nested in it, as in teacher training: that is ``config``)."""
    settings = {"config": asdict(config)}
    method_config = getattr(method, "config", None)
    if is_dataclass(method_config) and not isinstance(method_config, type):
        settings["method_config"] = {key: value for key, value in asdict(method_config).items()
                                     if not isinstance(getattr(method_config, key), TrainConfig)}
    return settings


def _flat(settings: dict) -> dict[str, object]:
    """A checkpoint's settings as ``train.<field>`` and ``method_args.<field>`` (nested fields joined by dots)."""
    def flat(value, name: str) -> dict[str, object]:
        if not isinstance(value, dict):
            return {name: value}
        return {key: v for field, item in value.items() for key, v in flat(item, f"{name}.{field}").items()}

    return flat(settings.get("config", {}), "train") | flat(settings.get("method_config", {}), "method_args")


def _check_settings(checkpoint: Checkpoint, method: nn.Module, config: TrainConfig, allow_changes: bool) -> list[str]:
    """The settings that differ from those ``checkpoint`` was trained under, as ``key old -> new`` (only what
    both record is compared); a checkpoint of another method raises :class:`CheckpointError`, and changes other
    than :data:`FREE_SETTINGS` raise :class:`ConfigError` unless ``allow_changes``."""
    folder, state = checkpoint.folder, checkpoint.state
    if state.get("method") != type(method).__name__:
        raise CheckpointError(f"{folder} was written by method {state.get('method')!r}, not "
                              f"{type(method).__name__!r}: use another run directory or resume=False")
    free = {f"train.{name}" for name in FREE_SETTINGS if name != "steps" or config.lr_schedule != "cosine"}
    old, new = _flat(state), _flat(json.loads(json.dumps(_settings(method, config))))
    changes = [f"{key} {old[key]!r} -> {new[key]!r}" for key in old
               if key in new and key not in free and old[key] != new[key]]
    if changes and not allow_changes:
        raise ConfigError(f"{folder} was trained under other settings ({', '.join(changes)}): use another run dir, "
                          f"or pass allow_changes=True (fewstep distill --resume-changed) to continue under the new "
                          f"settings")
    return changes


def _watch(monitor: Monitor, step: int, student: Denoiser, method: nn.Module) -> dict[str, float]:
    """One monitor's numbers on the student at ``step``, measured in eval mode without gradients."""
    student.eval()
    try:
        with torch.no_grad():
            return {key: float(value) for key, value in monitor(step, student).items()}
    finally:
        method.train()


def _rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of a process's own generators: ``seed`` itself for rank 0 at step 0 (so one-process runs are
    unchanged), otherwise a hash of ``(seed, rank, step)``."""
    if rank == 0 and step == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()[:7], "little")


def accelerator_for(device: str) -> Accelerator:
    """accelerate's process-wide state for ``device``: the device, and the process group when launched with
    several processes. Every call in one process must ask for the same device type."""
    try:
        accelerator = Accelerator(cpu=device == "cpu")
    except ValueError as error:  # the process's accelerate state was set up for another device
        raise ConfigError(f"train config: device {device!r}: an earlier run set this process up for another "
                          f"device (accelerate allows one per process): {one_line(error)}") from error
    if accelerator.device.type != torch.device(device).type:
        raise ConfigError(f"train config: device {device!r} is not available in this process (accelerate chose "
                          f"{accelerator.device}; the first run fixes the device for the whole process)")
    return accelerator


def _optimizer(phase: Phase, config: TrainConfig, factor: float = 1.0) -> torch.optim.Optimizer:
    """AdamW for ``phase``: the run's settings, overridden by the phase's own where it sets them."""
    betas = config.betas if phase.betas is None else phase.betas
    weight_decay = config.weight_decay if phase.weight_decay is None else phase.weight_decay
    return torch.optim.AdamW(phase.parameters, lr=config.lr * phase.lr_scale * factor, betas=betas,
                             weight_decay=weight_decay)


def _update(method: Trainable, phase: Phase, optimizer: torch.optim.Optimizer, source, step: int,
            generators: dict[str, torch.Generator], config: TrainConfig, accelerator: Accelerator,
            last_good: tuple[int, Path] | None, calls: NetworkCalls) -> dict[str, float]:
    """One optimizer update of ``phase`` on one global batch; returns its losses (means over the global batch)
    as floats, and under :data:`IDLE` whether the phase was idle: its loss carried no gradient, so nothing was
    stepped. Gradients of every parameter are cleared first, so a phase never steps with gradients another
    phase's loss left behind. ``calls`` counts the method's network calls made in its losses."""
    batch = source.batch(config.batch_size, generators["data"])
    world, k = accelerator.num_processes, config.grad_accumulation
    size = config.batch_size // (world * k)
    first = accelerator.process_index * k
    method.zero_grad(set_to_none=True)
    sums, idle = None, False
    for micro in range(first, first + k):
        part = batch.rows(micro * size, (micro + 1) * size).to(accelerator.device)
        bf16 = config.mixed_precision == "bf16"
        with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=bf16), calls.counting():
            losses = method.losses(phase.name, part, step, generators["noise"])
        values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
        sums = values if sums is None else sums + values
        idle = not losses["loss"].requires_grad
        if math.isfinite(float(values.sum())) and not idle:
            accelerator.backward(losses["loss"] / k if k > 1 else losses["loss"])
    means = sums / k
    if world > 1:
        means = average(means)
    values = dict(zip(losses, means.tolist(), strict=True))
    for key, value in values.items():
        if not math.isfinite(value):
            raise TrainingDiverged(f"training diverged at step {step}, phase '{phase.name}': loss '{key}' is "
                                   f"{value}; {_last_good(last_good)}")
    if idle:
        return {**values, IDLE: True}
    if world > 1:  # sharded parameters had theirs averaged by FSDP's reduce-scatter
        average_gradients([p for p in phase.parameters if not isinstance(p, DTensor)])
    grad_clip = config.grad_clip if phase.grad_clip is None else phase.grad_clip
    if grad_clip > 0:
        accelerator.clip_grad_norm_(phase.parameters, grad_clip)
    optimizer.step()
    finite = torch.stack([local(p).isfinite().all() for p in phase.parameters]).all()
    if world > 1 and config.distributed == "fsdp":  # each process checked its own shards
        finite = total(int(not finite), accelerator.device) == 0
    if not finite:
        raise TrainingDiverged(f"training diverged at step {step}, phase '{phase.name}': its weights became "
                               f"non-finite (loss {values['loss']:.4g}); {_last_good(last_good)}")
    return {**values, IDLE: False}


def _report_memory(method: nn.Module, phases: dict[str, Phase], optimizers: dict[str, torch.optim.Optimizer],
                   device: torch.device, run_dir: Path | None, progress: bool) -> None:
    """After the first cycle: ``run_dir/memory.json`` and one printed line (see :func:`memory_plan`)."""
    trainable = [p for phase in phases.values() for p in phase.parameters]
    plan = memory_plan(method, trainable, optimizers, device)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "memory.json").write_text(json.dumps(plan, indent=2) + "\n")
    if progress:
        tqdm.write(format_plan(plan))


def _last_good(last_good: tuple[int, Path] | None) -> str:
    if last_good is None:
        return "no checkpoint was written"
    return f"the last good checkpoint is {last_good[1]} (step {last_good[0]})"


def _process_rng(generators: dict[str, torch.Generator], device: torch.device) -> dict[str, str]:
    rng = {"noise": encode_rng_state(generators["noise"].get_state()), "torch": encode_rng_state(torch.get_rng_state())}
    if device.type == "cuda":
        rng["cuda"] = encode_rng_state(torch.cuda.get_rng_state(device))
    return rng


def _save(run_dir: Path, step: int, method: nn.Module, source, ema: EMA,
          optimizers: dict[str, torch.optim.Optimizer], generators: dict[str, torch.Generator],
          config: TrainConfig, seconds: float, teacher_evals: int, network_evals: dict[str, int], log_window: dict,
          device: torch.device, main: bool) -> Path:
    """Checkpoint tensors as ``method.*``, ``ema.*`` and ``source.*``; non-tensor entries of the method's and
    the source's state go to ``state.json`` and must be JSON-serialisable, as must the method's ``config``
    (:func:`_settings`), with the training seconds, the method's teacher and other network evaluations so far and
    the values of the unfinished log window (so a resumed run logs the same means). Every process takes part
    (their generator states are gathered); rank 0 writes."""
    process_rng = _process_rng(generators, device)
    ranks = gather(process_rng) if torch.distributed.is_initialized() else [process_rng]
    method_state, ema_state = full_state(method.state_dict()), full_state(ema.state_dict())  # every process
    optimizer_states = {name: full_optimizer_state(opt.state_dict()) for name, opt in optimizers.items()}
    target = run_dir / "checkpoint"
    if not main:
        return target
    method_tensors, method_extra = _split_tensors(method_state)
    source_tensors, source_extra = _split_tensors(source.state_dict() if hasattr(source, "state_dict") else {})
    tensors = {f"method.{k}": v for k, v in method_tensors.items()}
    tensors |= {f"ema.{k}": v for k, v in ema_state.items()}
    tensors |= {f"source.{k}": v for k, v in source_tensors.items()}
    rng = {"data": encode_rng_state(generators["data"].get_state()), "ranks": ranks}
    state = {"method": type(method).__name__, "seconds": seconds, "teacher_evals": teacher_evals,
             "network_evals": network_evals, "rng": rng,
             **_settings(method, config), "log_window": log_window,
             "num_processes": len(ranks), "method_extra": method_extra, "source_extra": source_extra}
    return save_checkpoint(run_dir, step, tensors, optimizer_states, state)


def _split_tensors(state: dict) -> tuple[dict[str, Tensor], dict]:
    """``(tensors, everything else)`` of a state dict."""
    return ({k: v for k, v in state.items() if isinstance(v, Tensor)},
            {k: v for k, v in state.items() if not isinstance(v, Tensor)})


def _restore(checkpoint: Checkpoint, method: nn.Module, source, ema: EMA,
             optimizers: dict[str, torch.optim.Optimizer], generators: dict[str, torch.Generator],
             config: TrainConfig, rank: int, world: int) -> tuple[float, int, dict[str, int]]:
    """Load a checkpoint (of this method, see :func:`_check_settings`) into the method, EMA, optimizers and
    generators; returns its training seconds and the method's teacher and other network evaluations up to it (no
    other network's in a checkpoint written before those were counted).
    A checkpoint from another process count restores everything but this process's own generators, which are
    re-seeded from ``(seed, rank, step)``."""
    folder, state = checkpoint.folder, checkpoint.state
    tensors = {prefix: {k.removeprefix(f"{prefix}."): v for k, v in checkpoint.tensors.items()
                        if k.startswith(f"{prefix}.")} for prefix in ("method", "ema", "source")}
    check_state_fits(tensors["method"], _split_tensors(method.state_dict())[0],
                     f"{folder}: the method's weights do not fit")
    check_state_fits(tensors["ema"], ema.state_dict(), f"{folder}: the EMA weights do not fit")
    if set(checkpoint.optimizer_states) != set(optimizers):
        raise CheckpointError(f"{folder}: optimizer phases {sorted(checkpoint.optimizer_states)} differ from the "
                              f"method's {sorted(optimizers)}")
    try:
        method.load_state_dict(shard_like(tensors["method"], method.state_dict()) | state["method_extra"], strict=True)
        ema.load_state_dict(shard_like(tensors["ema"], ema.state_dict()))
        if hasattr(source, "load_state_dict"):
            source.load_state_dict(tensors["source"] | state["source_extra"])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(shard_optimizer_state(checkpoint.optimizer_states[name], optimizer))
        rng = state["rng"]
        generators["data"].set_state(decode_rng_state(rng["data"]))
        ranks = rng.get("ranks", [rng])  # checkpoints written before multi-process training kept one process
        if len(ranks) == world:
            generators["noise"].set_state(decode_rng_state(ranks[rank]["noise"]))
            torch.set_rng_state(decode_rng_state(ranks[rank]["torch"]))
            if "cuda" in ranks[rank]:
                torch.cuda.set_rng_state(decode_rng_state(ranks[rank]["cuda"]))
        else:
            generators["noise"].manual_seed(_rank_seed(config.seed + 1, rank, checkpoint.step))
            torch.manual_seed(_rank_seed(config.seed, rank, checkpoint.step))
        return (float(state["seconds"]), int(state.get("teacher_evals", 0)),
                {name: int(n) for name, n in state.get("network_evals", {}).items()})
    except (KeyError, ValueError, RuntimeError, TypeError) as error:
        raise CheckpointError(f"{folder} cannot be restored: {type(error).__name__}: {one_line(error)}") from error


def _tensorboard_writer(run_dir: Path):
    """A SummaryWriter into ``run_dir/tensorboard`` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


class CSVLog:
    """``log.csv``: one row per phase and log window with ``step``, ``phase``, the window mean of each loss
    and ``seconds``. A new loss name widens the header (the file is rewritten); rows after
    ``keep_until_step`` (left by a run that died after its last checkpoint) are dropped on opening."""

    FIXED = ("step", "phase", "seconds")

    def __init__(self, path: Path, keep_until_step: int):
        self.path = path
        rows = [row for row in self._read() if (row.get("step") or "").isdigit()
                and int(row["step"]) <= keep_until_step]
        self.fields = self._fields({key for row in rows for key in row})
        self._rewrite(rows)

    def append(self, rows: list[dict]) -> None:
        keys = {key for row in rows for key in row}
        if not keys <= set(self.fields):
            old = self._read()
            self.fields = self._fields(keys | set(self.fields))
            self._rewrite(old)
        with open(self.path, "a", newline="") as file:
            csv.DictWriter(file, self.fields).writerows(rows)

    def _fields(self, keys: set[str]) -> list[str]:
        return ["step", "phase", *sorted(k for k in keys if k is not None and k not in self.FIXED), "seconds"]

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as file:
            return list(csv.DictReader(file))

    def _rewrite(self, rows: list[dict]) -> None:
        """Replace the file by renaming a new one into place, so a process killed meanwhile loses no rows."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp")
        with open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
