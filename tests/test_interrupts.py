"""Interrupted runs: the run-directory lock, and trials that kill a tiny distillation in a subprocess (SIGKILL, or
SIGINT as Ctrl-C) at random steps and rerun it until it finishes; the result must be bitwise the uninterrupted
run's (weights, EMA, optimizer state, source state and log.csv but for its seconds). About half the SIGKILLs aim
at a checkpoint being written; a SIGINT must leave a checkpoint at the last step the run finished.

``python -m pytest tests/test_interrupts.py -s`` prints each trial's legs."""

import csv
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import safetensors.torch
import torch

from fewstep.errors import ConfigError
from fewstep.locks import lock_folder

HOST = socket.gethostname()


def test_lock_folder_holds_and_releases_the_folder(tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), lock_folder(folder, "first") as lock:
        holder = json.loads(lock.read_text())
        assert lock == folder / ".lock" and holder["pid"] == os.getpid() and holder["host"] == HOST
        assert holder["what"] == "first" and holder["started"][:4].isdigit()
        with pytest.raises(ConfigError) as error, lock_folder(folder, "second"):
            pass
        assert str(error.value) == (f"{folder} is in use by process {os.getpid()} on {HOST} since "
                                    f"{holder['started']} (first): wait for it to finish or choose another folder")
        raise KeyboardInterrupt
    assert list(folder.iterdir()) == []
    with lock_folder(folder, "third"):
        pass
    assert list(folder.iterdir()) == []


def test_lock_folder_takes_over_a_dead_process_lock_only_on_this_host(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()  # reaped: its pid is free
    stale = {"pid": finished.pid, "host": HOST, "started": "2025-01-02T03:04:05+00:00", "what": "old run"}
    (tmp_path / ".lock").write_text(json.dumps(stale))
    with pytest.warns(UserWarning, match=f"taking over the lock of process {finished.pid}, which is no longer "
                                         r"running \(old run, started 2025-01-02T03:04:05\+00:00\)"), \
            lock_folder(tmp_path, "new run") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert list(tmp_path.iterdir()) == []

    (tmp_path / ".lock").write_text(json.dumps(stale | {"host": "elsewhere"}))
    with pytest.raises(ConfigError, match=f"in use by process {finished.pid} on elsewhere since .* choose another "
                                          f"folder \\(or delete {tmp_path / '.lock'} if that process is gone\\)"), \
            lock_folder(tmp_path, "new run"):
        pass
    (tmp_path / ".lock").write_text("{")
    with pytest.raises(ConfigError, match=r"\.lock is not a fewstep lock file: delete it if no process is using"), \
            lock_folder(tmp_path, "new run"):
        pass


# A tiny CD run (ring8, width 16) that prints each step it finishes, as a monitor (in the step's boundary, before
# that step's checkpoint); exits 130 on KeyboardInterrupt, as the CLI does.
CHILD = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C semantics whatever the parent ignores
from fewstep import Teacher
from fewstep.pipeline import distill
from fewstep.train.trainer import TrainConfig

class Steps:
    every = 1

    def __call__(self, step, student):
        print("step", step, flush=True)
        return {}

config = TrainConfig(steps=int(sys.argv[2]), batch_size=64, lr=1e-3, log_every=7, checkpoint_every=int(sys.argv[3]),
                     seed=0)
try:
    distill(Teacher.analytic("ring8"), "cd", train_config=config, student_backbone_args={"width": 16, "depth": 1},
            run_dir=sys.argv[1], progress=False, monitors=(Steps(),))
except KeyboardInterrupt:
    sys.exit(130)
"""


CHECKPOINT_EVERY = 10  # log_every is 7: a checkpoint mostly falls inside a log window


def child(run_dir: Path, steps: int, cache: Path) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "FEWSTEP_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir), str(steps), str(CHECKPOINT_EVERY)], env=env,
                            text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(run_dir: Path, steps: int, cache: Path) -> str:
    """Run to the end; its stderr."""
    process = child(run_dir, steps, cache)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0 and checkpoint_step(run_dir) == steps, err
    return err


def checkpoint_step(run_dir: Path) -> int | None:
    state = run_dir / "checkpoint" / "state.json"
    return json.loads(state.read_text())["step"] if state.exists() else None


def steps_printed(lines: Iterable[str]) -> Iterator[int]:
    for line in lines:
        if line.startswith("step "):
            yield int(line.split()[1])


def interrupt(run_dir: Path, steps: int, cache: Path, sig: signal.Signals, at_step: int, delay: float) -> dict:
    """One leg: run until it prints a step >= ``at_step`` (or ends), wait ``delay`` seconds, send ``sig``."""
    before = checkpoint_step(run_dir)
    with child(run_dir, steps, cache) as process:
        printed = []
        for step in steps_printed(process.stdout):
            printed.append(step)
            if step >= at_step:
                break
        signalled_at = printed[-1] if printed else None
        time.sleep(delay)
        process.send_signal(sig)
        printed += list(steps_printed(process.stdout))
        err = process.stderr.read()
    after = checkpoint_step(run_dir)
    leg = {"signal": sig.name, "at": signalled_at, "reached": max(printed, default=before),
           "saved": after, "status": process.returncode, "stderr": err,
           "left": sorted(p.name for p in run_dir.glob("*.tmp")) + sorted(p.name for p in run_dir.glob("*.prev"))}
    if sig == signal.SIGINT:
        assert process.returncode in (130, 0), err
        # the step running at the signal finished and was checkpointed: no finished step is lost
        assert after == leg["reached"], (leg, err)
    else:
        assert process.returncode in (-signal.SIGKILL, 0), err
        assert (after or 0) >= (before or 0)
    return leg


def read_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as file:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(file)]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    ours, theirs = (safetensors.torch.load_file(d / "checkpoint" / "weights.safetensors") for d in (run_dir, reference))
    assert ours.keys() == theirs.keys() and any(k.startswith("ema.") for k in ours)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    optim = [torch.load(d / "checkpoint" / "optim.pt", weights_only=True) for d in (run_dir, reference)]
    assert repr(optim[0]) == repr(optim[1])  # the same tensors, bit for bit, print the same
    states = [json.loads((d / "checkpoint" / "state.json").read_text()) for d in (run_dir, reference)]
    assert {k: v for k, v in states[0].items() if k != "seconds"} == {k: v for k, v in states[1].items()
                                                                      if k != "seconds"}
    assert read_rows(run_dir) == read_rows(reference)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint", "log.csv", "memory.json"]


def trial(run_dir: Path, steps: int, cache: Path, plan: list[tuple[signal.Signals, int, float]],
          reference: Future) -> list[dict]:
    """Interrupt a run as ``plan`` says (signal, step, delay per leg), rerun it to its end and compare it with the
    uninterrupted run (``reference``: its folder, once it is done); returns the interrupted legs."""
    legs = [interrupt(run_dir, steps, cache, *leg) for leg in plan]
    legs.append({"status": 0, "stderr": finish(run_dir, steps, cache)})
    for previous, leg in itertools.pairwise(legs):
        killed = previous["status"] == -signal.SIGKILL
        if not killed or previous["reached"] < steps:  # killed while training: its lock is left, then taken over
            assert ("taking over the lock" in leg["stderr"]) == killed, leg["stderr"]
    assert_same_run(run_dir, reference.result())
    return [{k: v for k, v in leg.items() if k != "stderr"} for leg in legs[:-1]]


def run_trials(tmp_path: Path, trials: int, steps: int, interruptions: int, seed: int) -> list[list[dict]]:
    """``trials`` runs, each interrupted ``interruptions`` times at random steps after random delays (SIGINT first
    on even trials, SIGKILL on odd ones, then either at random) and rerun to its end; each must equal an
    uninterrupted run. Two processes at a time (the reference, then the trials)."""
    cache, rng = tmp_path / "cache", random.Random(seed)

    def leg(number: int, index: int) -> tuple[signal.Signals, int, float]:
        sig = [signal.SIGINT, signal.SIGKILL][number % 2] if index == 0 else rng.choice([signal.SIGINT, signal.SIGKILL])
        at = rng.randrange(1, steps)
        if sig == signal.SIGKILL and rng.random() < 0.5:  # at once after a checkpoint step's line: during its save
            return sig, max(CHECKPOINT_EVERY, at - at % CHECKPOINT_EVERY), rng.uniform(0, 0.004)
        return sig, at, rng.uniform(0, 0.03)

    plans = [[leg(number, index) for index in range(interruptions)] for number in range(trials)]

    def uninterrupted() -> Path:
        finish(tmp_path / "reference", steps, cache)
        return tmp_path / "reference"

    with ThreadPoolExecutor(2) as pool:
        reference = pool.submit(uninterrupted)
        runs = [pool.submit(trial, tmp_path / f"trial{number}", steps, cache, plan, reference)
                for number, plan in enumerate(plans)]
        results = [run.result() for run in runs]
    for number, legs in enumerate(results):
        print(f"trial {number}: {legs} -> finished, equal to the uninterrupted run")
    return results


def test_interrupted_runs_equal_an_uninterrupted_one(tmp_path):
    legs = run_trials(tmp_path, trials=2, steps=80, interruptions=1, seed=0)
    assert [leg["signal"] for trial in legs for leg in trial] == ["SIGINT", "SIGKILL"]


@pytest.mark.slow
def test_many_interrupted_runs_equal_an_uninterrupted_one(tmp_path):
    legs = run_trials(tmp_path, trials=12, steps=300, interruptions=2, seed=1)
    kinds = [leg["signal"] for trial in legs for leg in trial]
    assert kinds.count("SIGINT") >= 6 and kinds.count("SIGKILL") >= 6
