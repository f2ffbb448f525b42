import csv
import json
import math
import os
import signal
import socket
import subprocess
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from fewstep.data.batch import Batch
from fewstep.data.sources import RealData
from fewstep.errors import CheckpointError, ConfigError, TrainingDiverged
from fewstep.methods.base import DistillationMethod, MethodConfig, Phase
from fewstep.models.analytic import ring_mixture
from fewstep.models.denoiser import EDMDenoiser
from fewstep.nets import MLP
from fewstep.train.checkpoint import load_checkpoint, save_checkpoint
from fewstep.train.ema import EMA, warmup_decay
from fewstep.train.trainer import TrainConfig, lr_factor, train


class Points:
    """A stateful source: a fixed set of ring points in order (its position is checkpointed), plus jitter
    drawn from the trainer's data generator."""

    teacher_evals = 0

    def __init__(self, n: int = 48):
        self.x = ring_mixture().sample(n, torch.Generator().manual_seed(0)).float()
        self.position = 0

    def batch(self, batch_size, generator):
        index = (self.position + torch.arange(batch_size)) % self.x.shape[0]
        self.position = (self.position + batch_size) % self.x.shape[0]
        return Batch(x0=self.x[index] + 0.01 * torch.randn(batch_size, 2, generator=generator))

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


@dataclass
class RegressionConfig(MethodConfig):
    spread: float = 1.0  # of the log noise levels


class Regression(DistillationMethod):
    """Regress the student onto the exact ring denoiser at random noise levels; ``fault_at`` makes the loss
    NaN (``"loss"``) or the gradient NaN with a finite loss (``"weights"``) at that step."""

    name = "test_regression"

    def __init__(self, fault_at: int | None = None, fault: str = "loss", spread: float = 1.0):
        torch.manual_seed(0)
        super().__init__(ring_mixture(), EDMDenoiser(MLP((2,), width=16, depth=1, emb_dim=8), 1.4),
                         RegressionConfig(spread))
        self.fault_at, self.fault = fault_at, fault

    def losses(self, phase, batch, step, generator):
        x0 = batch.x0
        s = torch.exp(self.config.spread * torch.randn(x0.shape[0], generator=generator, device=x0.device))
        x = x0 + s[:, None] * torch.randn(x0.shape, generator=generator, device=x0.device)
        target = self.teacher(x, s)
        loss = ((self.student(x, s) - target) ** 2).mean()
        if step == self.fault_at and self.fault == "loss":
            loss = loss * torch.tensor(float("nan"))
        if step == self.fault_at and self.fault == "weights":
            weight = self.student.backbone.input.weight
            loss = loss + torch.sqrt((weight - weight.detach()).abs()).sum()  # finite value, NaN gradient
        return {"loss": loss, "s_mean": s.mean()}


def config(**changes) -> TrainConfig:
    settings = {"steps": 20, "batch_size": 16, "lr": 1e-2, "log_every": 5, "checkpoint_every": 10,
                "ema_decay": 0.9, "seed": 3}
    return TrainConfig(**(settings | changes))


def all_weights(method: nn.Module, result) -> dict[str, torch.Tensor]:
    return method.state_dict() | {f"ema.{k}": v for k, v in result.ema_student.state_dict().items()}


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def read_log(run_dir):
    with open(run_dir / "log.csv", newline="") as file:
        return list(csv.DictReader(file))


def log_without_seconds(run_dir) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in read_log(run_dir)]


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_training_reduces_the_loss_and_logs(tmp_path):
    method = Regression()
    result = train(method, Points(), config(steps=200, batch_size=64, log_every=50), tmp_path, progress=True)
    rows = read_log(tmp_path)
    assert list(rows[0]) == ["step", "phase", "loss", "s_mean", "seconds"]
    assert [int(r["step"]) for r in rows] == [50, 100, 150, 200]
    assert result.losses["student/loss"] == pytest.approx(float(rows[-1]["loss"]))
    assert result.losses["student/loss"] < 0.5 * float(rows[0]["loss"])
    assert result.steps_done == 200 and not result.stopped_early and result.seconds > 0
    assert result.teacher_evals == 200 * 64
    assert result.checkpoint == tmp_path / "checkpoint" and load_checkpoint(tmp_path).step == 200
    assert not result.ema_student.training


def test_same_seed_gives_bitwise_identical_weights():
    runs = []
    for seed in (3, 3, 4):
        method = Regression()
        runs.append(all_weights(method, train(method, Points(), config(seed=seed), None, progress=False)))
    assert_bitwise_equal(runs[0], runs[1])
    assert not torch.equal(runs[0]["student.backbone.input.weight"], runs[2]["student.backbone.input.weight"])


def test_ema_student_holds_the_averaged_weights():
    method = Regression()
    result = train(method, Points(), config(ema_decay=0.0), None, progress=False)
    assert_bitwise_equal(result.ema_student.state_dict(), method.student.state_dict())
    method = Regression()
    result = train(method, Points(), config(ema_decay=0.9), None, progress=False)
    ema, live = result.ema_student.backbone.input.weight, method.student.backbone.input.weight
    assert not torch.equal(ema, live) and result.ema_student is not method.student


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    method = Regression()
    whole = all_weights(method, train(method, Points(), config(steps=40), tmp_path / "whole", progress=False))
    first = Regression()
    half = train(first, Points(), config(steps=25), tmp_path / "split", progress=False)
    assert half.steps_done == 25 and load_checkpoint(tmp_path / "split").step == 25
    second = Regression()  # fresh objects: everything must come from the checkpoint
    resumed = train(second, Points(), config(steps=40), tmp_path / "split", progress=False)
    assert resumed.steps_done == 40
    assert_bitwise_equal(whole, all_weights(second, resumed))
    assert [int(r["step"]) for r in read_log(tmp_path / "split")] == [5, 10, 15, 20, 25, 30, 35, 40]


def test_resume_mid_epoch_over_real_data_is_bitwise_equal(tmp_path):
    """RealData's epoch order is checkpointed: 48 samples in batches of 16, split at step 10 (a third of the way
    into an epoch)."""
    points = Points().x

    def run(steps: int, run_dir):
        method = Regression()
        return all_weights(method, train(method, RealData(points), config(steps=steps), run_dir, progress=False))

    whole = run(20, tmp_path / "whole")
    run(10, tmp_path / "split")
    assert_bitwise_equal(whole, run(20, tmp_path / "split"))


def test_resume_false_starts_over(tmp_path):
    train(Regression(), Points(), config(steps=10), tmp_path, progress=False)
    method = Regression()
    result = train(method, Points(), config(steps=10), tmp_path, resume=False, progress=False)
    reference = Regression()
    assert_bitwise_equal(all_weights(method, result),
                         all_weights(reference, train(reference, Points(), config(steps=10), None, progress=False)))
    assert [int(r["step"]) for r in read_log(tmp_path)] == [5, 10]


def test_nan_loss_stops_without_checkpointing_the_bad_state(tmp_path):
    with pytest.raises(TrainingDiverged) as error:
        train(Regression(fault_at=7), Points(), config(checkpoint_every=3, log_every=1), tmp_path, progress=False)
    message = str(error.value)
    assert "step 7" in message and "phase 'student'" in message and "loss 'loss' is nan" in message
    assert f"{tmp_path / 'checkpoint'} (step 6)" in message
    assert load_checkpoint(tmp_path).step == 6
    assert not (tmp_path / "checkpoint.tmp").exists() and not (tmp_path / "checkpoint.prev").exists()
    # the last good checkpoint resumes to exactly the run that never diverged; log rows after it are dropped
    method = Regression()
    resumed = train(method, Points(), config(checkpoint_every=3, log_every=1), tmp_path, progress=False)
    reference = Regression()
    clean = train(reference, Points(), config(checkpoint_every=3, log_every=1), None, progress=False)
    assert_bitwise_equal(all_weights(method, resumed), all_weights(reference, clean))
    assert [int(r["step"]) for r in read_log(tmp_path)] == list(range(1, 21))


def test_non_finite_weights_stop_training(tmp_path):
    with pytest.raises(TrainingDiverged, match="step 4, phase 'student': its weights became non-finite"):
        train(Regression(fault_at=4, fault="weights"), Points(), config(), tmp_path, progress=False)
    assert not (tmp_path / "checkpoint").exists()
    with pytest.raises(TrainingDiverged, match="no checkpoint was written"):
        train(Regression(fault_at=4, fault="weights"), Points(), config(grad_clip=0.0), None, progress=False)


def test_max_seconds_stops_at_a_step_boundary_and_resumes(tmp_path):
    result = train(Regression(), Points(), config(max_seconds=0.0), tmp_path, progress=False)
    assert result.stopped_early and result.steps_done == 1 and load_checkpoint(tmp_path).step == 1
    result = train(Regression(), Points(), config(), tmp_path, progress=False)
    assert not result.stopped_early and result.steps_done == 20


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(3.0)), nn.Parameter(torch.tensor(-1.0))


class TwoPhases(nn.Module):
    """Phase "a" (2 updates, half learning rate) fits a; phase "b" fits b but its loss also pulls on a;
    "b"'s optimizer is reset after step 3. Any nn.Module with the trainer's protocol works with it."""

    fsdp_refusal = None
    teacher_evals = 0

    def __init__(self):
        super().__init__()
        self.pair = Pair()
        self.calls = []

    def phases(self):
        return [Phase("a", [self.pair.a], updates=2, lr_scale=0.5), Phase("b", [self.pair.b])]

    def losses(self, phase, batch, step, generator):
        self.calls.append((phase, step))
        if phase == "a":
            return {"loss": (self.pair.a - 1) ** 2}
        return {"loss": (self.pair.b - 2) ** 2 + 10 * self.pair.a**2, "b_error": (self.pair.b - 2).abs()}

    def after_update(self, phase, step):
        return phase == "b" and step == 3

    def student_denoiser(self):
        return self.pair


class Zeros:
    teacher_evals = 0

    def batch(self, batch_size, generator):
        return Batch(x0=torch.zeros(batch_size, 1))


def test_phases_run_in_order_with_their_own_optimizers(tmp_path):
    method = TwoPhases()
    result = train(method, Zeros(), config(steps=6, lr=0.1, grad_clip=0.0), tmp_path, progress=False)
    assert method.calls[:6] == [("a", 0), ("a", 0), ("b", 0), ("a", 1), ("a", 1), ("b", 1)]
    assert len(method.calls) == 18
    # "a" never sees the gradient "b"'s loss leaves on it: it follows plain AdamW on its own loss
    a = nn.Parameter(torch.tensor(3.0))
    optimizer = torch.optim.AdamW([a], lr=0.05, weight_decay=0.0)
    for _ in range(12):
        optimizer.zero_grad()
        ((a - 1) ** 2).backward()
        optimizer.step()
    assert torch.equal(method.pair.a.detach(), a.detach())
    optimizers = load_checkpoint(tmp_path).optimizer_states
    assert optimizers["a"]["state"][0]["step"] == 12 and optimizers["b"]["state"][0]["step"] == 2
    assert optimizers["a"]["param_groups"][0]["lr"] == pytest.approx(0.05)
    assert set(result.losses) == {"a/loss", "b/loss", "b/b_error"}
    assert list(read_log(tmp_path)[0]) == ["step", "phase", "b_error", "loss", "seconds"]


def test_resume_refuses_another_method(tmp_path):
    train(Regression(), Points(), config(steps=2), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="written by method 'Regression', not 'TwoPhases'"):
        train(TwoPhases(), Zeros(), config(steps=4), tmp_path, progress=False)


@pytest.mark.parametrize("changes, field", [({"steps": -1}, "steps"), ({"batch_size": 0}, "batch_size"),
                                            ({"ema_decay": 1.5}, "ema_decay"), ({"betas": (0.9,)}, "betas")])
def test_bad_config_is_refused(changes, field):
    with pytest.raises(ConfigError, match=f"invalid {field}"):
        config(**changes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_refused():
    with pytest.raises(ConfigError, match="device 'cuda' is not available"):
        train(Regression(), Points(), config(device="cuda"), None, progress=False)


def test_ema_update_and_warmup():
    module = nn.BatchNorm1d(2)
    ema = EMA(module)
    before = module.weight.detach().clone()
    with torch.no_grad():
        module.weight.add_(1.0)
    module.running_mean.fill_(5.0)
    ema.update(module, decay=0.75)
    assert torch.allclose(ema.state_dict()["weight"], 0.75 * before + 0.25 * (before + 1))
    assert torch.equal(ema.state_dict()["running_mean"], module.running_mean)  # buffers are copied
    target = nn.BatchNorm1d(2)
    target.load_state_dict(ema.state_dict())
    assert torch.allclose(target.weight, before + 0.25)
    assert warmup_decay(0.999, 0) == pytest.approx(0.1) and warmup_decay(0.999, 10**6) == 0.999


def test_checkpoint_files_and_corruption(tmp_path):
    tensors = {"method.w": torch.arange(6.0).reshape(2, 3), "ema.w": torch.ones(2, 3)}
    optim = {"student": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}}
    save_checkpoint(tmp_path, 7, tensors, optim, {"seconds": 1.5})
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["optim.pt", "state.json",
                                                                          "weights.safetensors"]
    loaded = load_checkpoint(tmp_path)
    assert loaded.step == 7 and loaded.state == {"seconds": 1.5}
    assert_bitwise_equal(loaded.tensors, tensors)
    assert loaded.optimizer_states["student"]["param_groups"][0]["lr"] == 0.1

    with pytest.raises(TypeError):  # not JSON-serialisable: nothing is replaced, nothing left behind
        save_checkpoint(tmp_path, 8, tensors, optim, {"seconds": object()})
    assert load_checkpoint(tmp_path).step == 7 and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]

    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.prev")  # a crash between the two renames
    assert load_checkpoint(tmp_path).step == 7
    save_checkpoint(tmp_path, 9, tensors, optim, {"seconds": 2.0})
    assert load_checkpoint(tmp_path).step == 9 and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]

    weights = tmp_path / "checkpoint" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"weights\.safetensors is missing or corrupt"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, 9, tensors, optim, {"seconds": 2.0})
    (tmp_path / "checkpoint" / "optim.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"optim\.pt is missing or corrupt"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, 9, tensors, optim, {"seconds": 2.0})
    (tmp_path / "checkpoint" / "state.json").write_text(json.dumps({"step": 9}))
    with pytest.raises(CheckpointError, match="not a fewstep training checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="has no checkpoint"):
        load_checkpoint(tmp_path / "elsewhere")


def test_corrupt_checkpoint_is_refused_on_resume(tmp_path):
    train(Regression(), Points(), config(steps=2), tmp_path, progress=False)
    (tmp_path / "checkpoint" / "weights.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match=r"weights\.safetensors is missing or corrupt"):
        train(Regression(), Points(), config(steps=4), tmp_path, progress=False)


def test_learning_rate_warm_up_and_cosine_schedule():
    constant = TrainConfig(steps=100, warmup_steps=10)
    assert [lr_factor(k, constant) for k in (0, 4, 9, 50, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    cosine = TrainConfig(steps=110, warmup_steps=10, lr_schedule="cosine")
    assert lr_factor(4, cosine) == pytest.approx(0.5)  # warming up
    assert lr_factor(10, cosine) == 1.0 and lr_factor(60, cosine) == pytest.approx(0.5)
    assert lr_factor(109, cosine) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert lr_factor(0, TrainConfig(steps=1, lr_schedule="cosine")) == 1.0
    with pytest.raises(ConfigError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


def write_lock(folder, pid: int) -> str:
    text = json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2025-01-02T03:04:05+00:00",
                       "what": "another run"})
    (folder / ".lock").write_text(text)
    return text


class LockWatch:
    """A monitor that records who holds the run directory's lock while training runs."""

    every = 5

    def __init__(self, run_dir):
        self.lock, self.holders = run_dir / ".lock", []

    def __call__(self, step, student):
        self.holders.append(json.loads(self.lock.read_text())["pid"])
        return {}


def test_a_second_run_on_a_locked_run_dir_is_refused_and_writes_nothing(tmp_path):
    train(Regression(), Points(), config(steps=10), tmp_path, progress=False)
    before = snapshot(tmp_path)
    assert ".lock" not in before  # released when train returned
    other = subprocess.Popen(["sleep", "30"])
    try:
        lock = write_lock(tmp_path, other.pid)
        with pytest.raises(ConfigError) as error:
            train(Regression(), Points(), config(), tmp_path, progress=False)
        assert str(error.value) == (f"{tmp_path} is in use by process {other.pid} on {socket.gethostname()} since "
                                    f"2025-01-02T03:04:05+00:00 (another run): wait for it to finish or choose "
                                    f"another folder")
        assert snapshot(tmp_path) == before | {".lock": lock.encode()}  # nothing written, the lock left alone
    finally:
        other.kill()
        other.wait()
    # its process is gone: the lock is stale and taken over
    watch = LockWatch(tmp_path)
    with pytest.warns(UserWarning, match=f"taking over the lock of process {other.pid}, which is no longer running"):
        result = train(Regression(), Points(), config(), tmp_path, progress=False, monitors=(watch,))
    assert result.steps_done == 20 and watch.holders == [os.getpid()] * 2
    assert not (tmp_path / ".lock").exists()


def test_the_lock_is_released_when_training_fails(tmp_path):
    with pytest.raises(TrainingDiverged):
        train(Regression(fault_at=3), Points(), config(), tmp_path, progress=False)
    assert not (tmp_path / ".lock").exists()


def test_resume_refuses_changed_settings_and_writes_nothing(tmp_path):
    train(Regression(), Points(), config(steps=10), tmp_path, progress=False)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as error:
        train(Regression(spread=0.5), Points(), config(lr=2e-2, grad_clip=0.5), tmp_path, progress=False)
    assert str(error.value) == (f"{tmp_path / 'checkpoint'} was trained under other settings (train.lr 0.01 -> 0.02, "
                                f"train.grad_clip 1.0 -> 0.5, method_args.spread 1.0 -> 0.5): use another run dir, or "
                                f"pass allow_changes=True (fewstep distill --resume-changed) to continue under the "
                                f"new settings")
    assert snapshot(tmp_path) == before

    result = train(Regression(), Points(), config(lr=2e-2), tmp_path, allow_changes=True, progress=False)
    assert result.steps_done == 20 and load_checkpoint(tmp_path).state["config"]["lr"] == 2e-2
    rows = read_log(tmp_path)
    assert [(r["step"], r["phase"], r["changed"]) for r in rows if r["phase"] == "resume"] == [
        ("10", "resume", "train.lr 0.01 -> 0.02")]
    train(Regression(), Points(), config(lr=2e-2, steps=30), tmp_path, progress=False)  # the new settings hold now


def test_resume_refuses_another_device_and_compares_what_old_checkpoints_kept(tmp_path):
    train(Regression(), Points(), config(steps=10), tmp_path, progress=False)
    state_file = tmp_path / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["method_config"] == {"spread": 1.0}
    state["config"]["device"] = "cuda"
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"\(train.device 'cuda' -> 'cpu'\)"):
        train(Regression(), Points(), config(), tmp_path, progress=False)
    del state["method_config"]  # a checkpoint written before method configs were kept
    state["config"]["device"] = "cpu"
    state_file.write_text(json.dumps(state))
    assert train(Regression(spread=0.5), Points(), config(), tmp_path, progress=False).steps_done == 20


def test_resume_with_more_steps_and_other_checkpointing_is_bitwise_equal(tmp_path):
    """Only the number of steps and when to checkpoint change. (A leg that ends logs its last, partial window: it
    ends here at a window's end, 15, so the logs match too.)"""
    method = Regression()
    whole = all_weights(method, train(method, Points(), config(steps=40), tmp_path / "whole", progress=False))
    train(Regression(), Points(), config(steps=15, checkpoint_every=4, max_seconds=100.0), tmp_path / "split",
          progress=False)
    second = Regression()
    resumed = train(second, Points(), config(steps=40, checkpoint_every=7), tmp_path / "split", progress=False)
    assert_bitwise_equal(whole, all_weights(second, resumed))
    assert log_without_seconds(tmp_path / "split") == log_without_seconds(tmp_path / "whole")


def test_resume_refuses_more_steps_under_a_cosine_schedule(tmp_path):
    train(Regression(), Points(), config(steps=10, lr_schedule="cosine"), tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"\(train.steps 10 -> 20\)"):
        train(Regression(), Points(), config(lr_schedule="cosine"), tmp_path, progress=False)


class Interrupting(Regression):
    """Sends itself ``times`` SIGINTs during step ``at`` (as Ctrl-C would); records the steps whose losses it
    computed (after the signals)."""

    def __init__(self, at: int, times: int = 1):
        super().__init__()
        self.at, self.times, self.steps = at, times, []

    def losses(self, phase, batch, step, generator):
        if step == self.at and step not in self.steps:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)
        self.steps.append(step)
        return super().losses(phase, batch, step, generator)


@pytest.fixture
def ctrl_c():
    """SIGINT raises KeyboardInterrupt, as in an interactive Python (whatever this test process inherited)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_checkpoints_the_step_it_interrupts_and_resumes_bitwise(tmp_path, ctrl_c):
    reference = Regression()
    whole = all_weights(reference, train(reference, Points(), config(), tmp_path / "whole", progress=False))
    method = Interrupting(at=12)
    with pytest.raises(KeyboardInterrupt):
        train(method, Points(), config(), tmp_path / "split", progress=False)
    assert max(method.steps) == 12 and load_checkpoint(tmp_path / "split").step == 13  # step 12 finished, saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and not (tmp_path / "split/.lock").exists()
    second = Interrupting(at=-1)  # the same method class, never interrupting
    resumed = train(second, Points(), config(), tmp_path / "split", progress=False)
    assert_bitwise_equal(whole, all_weights(second, resumed))
    assert log_without_seconds(tmp_path / "split") == log_without_seconds(tmp_path / "whole")


def test_a_second_ctrl_c_stops_at_once(tmp_path, ctrl_c):
    method = Interrupting(at=12, times=2)
    with pytest.raises(KeyboardInterrupt):
        train(method, Points(), config(), tmp_path, progress=False)
    assert max(method.steps) == 11 and load_checkpoint(tmp_path).step == 10 and not (tmp_path / ".lock").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_without_a_run_dir_stops_at_the_step_boundary(ctrl_c):
    method = Interrupting(at=4)
    with pytest.raises(KeyboardInterrupt):
        train(method, Points(), config(), None, progress=False)
    assert max(method.steps) == 4
