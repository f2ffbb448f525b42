"""Multi-process training (2 CPU processes over gloo, replicated or sharded), gradient accumulation, bf16,
gradient checkpointing, teacher dtype and the memory plan.

One module fixture runs the one-process references here and all two-process runs in one launch (starting
processes costs ~10 s each time), each with DDP and with FSDP: a deterministic method (2 processes must equal
1 process to float tolerance), 200 steps of consistency distillation on the exact ring (loss curves within
2%), and a run stopped at step 77 and finished under another process count (one -> two processes with DDP,
two sharded -> one with FSDP; metrics within the noise floor of uninterrupted runs)."""

import csv
import json

import diffusers
import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from fewstep.data import load_dataset
from fewstep.data.batch import Batch
from fewstep.data.sources import RealData
from fewstep.errors import ConfigError
from fewstep.eval.toy import noise_floor_toy, toy_metrics
from fewstep.hub import diffusers_denoiser
from fewstep.methods.base import DistillationMethod, MethodConfig
from fewstep.methods.consistency.consistency_distillation import CDConfig, ConsistencyDistillation
from fewstep.models.denoiser import EDMDenoiser, innermost
from fewstep.nets import MLP, SmallUNet
from fewstep.solvers import sample
from fewstep.train.checkpoint import load_checkpoint
from fewstep.train.memory import enable_gradient_checkpointing
from fewstep.train.parallel import launch
from fewstep.train.sharding import full_state, shard_units
from fewstep.train.trainer import TrainConfig, train

RING = load_dataset("ring8")
CD_STEPS, STOP_AT = 200, 77


class Deterministic(DistillationMethod):
    """Regress onto the exact ring denoiser with noise levels and noise taken from the batch: no draws of
    its own, so a run depends only on the global batches."""

    name = "test_deterministic"

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(RING.analytic, EDMDenoiser(MLP((2,), width=32, depth=2, emb_dim=16), 1.4), MethodConfig())

    def losses(self, phase, batch, step, generator):
        s = torch.exp(batch.noise[:, 0])
        x = batch.x0 + s[:, None] * batch.noise
        return {"loss": ((self.student(x, s) - self.teacher(x, s)) ** 2).mean()}


class RingWithNoise:
    teacher_evals = 0

    def batch(self, batch_size, generator):
        index = torch.randint(RING.train_x.shape[0], (batch_size,), generator=generator)
        return Batch(x0=RING.train_x[index], noise=torch.randn(batch_size, 2, generator=generator))


def deterministic_config(**changes) -> TrainConfig:
    return TrainConfig(**({"steps": 20, "batch_size": 16, "lr": 1e-2, "ema_decay": 0.9, "seed": 3} | changes))


def cd_method(teacher=None, seed: int = 0) -> ConsistencyDistillation:
    torch.manual_seed(seed)
    teacher = RING.analytic if teacher is None else teacher
    student = ConsistencyDistillation.build_student(teacher, CDConfig(), lambda: MLP((2,), width=64, depth=2),
                                                    RING.sigma_data)
    return ConsistencyDistillation(teacher, student, CDConfig())


def cd_config(steps: int = CD_STEPS, seed: int = 0, **changes) -> TrainConfig:
    return TrainConfig(**({"steps": steps, "batch_size": 128, "lr": 1e-3, "log_every": 50,
                           "checkpoint_every": 1000, "seed": seed} | changes))


def weights(method, result) -> dict[str, torch.Tensor]:
    """The method's weights (gathered, if sharded: every process must call this) and the returned EMA's."""
    return full_state(method.state_dict()) | {f"ema.{k}": v for k, v in result.ema_student.state_dict().items()}


def two_process_runs(tmp) -> None:
    """Every process runs this; rank 0 saves what the tests compare."""
    torch.set_num_threads(1)
    method = Deterministic()
    result = train(method, RingWithNoise(), deterministic_config(), None, progress=False)
    accumulated = Deterministic()
    result_k2 = train(accumulated, RingWithNoise(), deterministic_config(grad_accumulation=2), None, progress=False)
    cd = cd_method()
    cd_result = train(cd, RealData(RING.train_x), cd_config(), tmp / "cd-2proc", progress=False)
    resumed = cd_method()
    resumed_result = train(resumed, RealData(RING.train_x), cd_config(), tmp / "resume", progress=False)
    sharded = Deterministic()
    sharded_result = train(sharded, RingWithNoise(), deterministic_config(distributed="fsdp"), None, progress=False)
    train(cd_method(), RealData(RING.train_x), cd_config(distributed="fsdp"), tmp / "cd-fsdp", progress=False)
    train(cd_method(), RealData(RING.train_x), cd_config(steps=STOP_AT, distributed="fsdp"), tmp / "resume-fsdp",
          progress=False)
    network_teacher = EDMDenoiser(MLP((2,), width=16, depth=1), RING.sigma_data)
    with_network_teacher = cd_method(teacher=network_teacher)
    train(with_network_teacher, RealData(RING.train_x), cd_config(steps=2, distributed="fsdp"), None, progress=False)
    diffusers_cd = cd_method(teacher=tiny_unet_teacher())
    train(diffusers_cd, RealData(torch.randn(8, 4, 8, 8)), cd_config(steps=2, batch_size=4, distributed="fsdp"), None,
          progress=False)
    gathered = {"deterministic": weights(method, result), "accumulated": weights(accumulated, result_k2),
                "sharded": weights(sharded, sharded_result)}
    if torch.distributed.get_rank() == 0:
        torch.save({**gathered, "cd_teacher_evals": cd_result.teacher_evals,
                    "cd_network_evals": cd_result.network_evals,
                    "sharded_kinds": {name: sorted({type(p).__name__ for p in module.parameters()})
                                      for name, module in with_network_teacher.named_children()},
                    "resumed": resumed_result.ema_student.state_dict(),
                    "diffusers_units": sum(isinstance(m, FSDPModule) for m in diffusers_cd.student.modules()),
                    "diffusers_blocks": len(shard_units(diffusers_cd.student.backbone)),
                    "world": torch.distributed.get_world_size()}, tmp / "two.pt")


def read_losses(run_dir) -> list[float]:
    with open(run_dir / "log.csv", newline="") as file:
        return [float(row["loss"]) for row in csv.DictReader(file)]


def ring_metrics(state: dict) -> dict:
    method = cd_method()
    method.student.load_state_dict(state)
    spec = method.sampling(2)
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        x = sample(method.student.eval(), noise, spec.sampler, torch.tensor(spec.sigmas),
                   torch.Generator().manual_seed(12))
    return toy_metrics(x, RING)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    one = {}
    method = Deterministic()
    one["deterministic"] = weights(method, train(method, RingWithNoise(), deterministic_config(), None,
                                                 progress=False))
    for seed in (0, 1):
        cd = cd_method(seed=seed)
        one[f"cd{seed}"] = train(cd, RealData(RING.train_x), cd_config(seed=seed), tmp / f"cd-1proc-{seed}",
                                 progress=False)
    stopped = train(cd_method(), RealData(RING.train_x), cd_config(steps=STOP_AT), tmp / "resume", progress=False)
    assert stopped.steps_done == STOP_AT and load_checkpoint(tmp / "resume").state["num_processes"] == 1
    launch(two_process_runs, (tmp,), 2)
    assert load_checkpoint(tmp / "resume-fsdp").state["num_processes"] == 2
    one["resumed_fsdp"] = train(cd_method(), RealData(RING.train_x), cd_config(distributed="fsdp"),
                                tmp / "resume-fsdp", progress=False)
    return tmp, one, torch.load(tmp / "two.pt")


def assert_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_two_processes_equal_one_process_for_a_deterministic_method(runs):
    _, one, two = runs
    assert two["world"] == 2
    assert_close(two["deterministic"], one["deterministic"])
    assert_close(two["accumulated"], one["deterministic"])  # 2 processes x 2 micro-batches of 4
    assert_close(two["sharded"], one["deterministic"])  # FSDP: sharded weights, gradients, optimizer state


def tiny_unet_teacher():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                          block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=8,
                                          attention_head_dim=4,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return diffusers_denoiser(unet, diffusers.DDPMScheduler(), encoder_hidden_states=torch.zeros(1, 3, 8))


def test_fsdp_shards_a_diffusers_network_block_by_block(runs):
    """Each UNet down / mid / up block of a diffusers student is its own FSDP unit (a forward pass gathers one
    block's weights at a time), plus the network and the backbone around them."""
    _, _, two = runs
    assert two["diffusers_blocks"] == 5  # two down blocks, the mid block, two up blocks
    assert two["diffusers_units"] == two["diffusers_blocks"] + 1


def test_fsdp_shards_every_network_and_its_optimizer_state(runs):
    tmp, _, two = runs
    # the caller's teacher stays whole (evaluation uses it on one process); the method's own networks shard
    assert two["sharded_kinds"] == {"teacher": ["Parameter"], "student": ["DTensor"], "target": ["DTensor"]}
    replicated = json.loads((tmp / "cd-2proc" / "memory.json").read_text())["networks"]
    sharded = json.loads((tmp / "cd-fsdp" / "memory.json").read_text())["networks"]
    print(f"\nper-process bytes, DDP: {replicated}\n  FSDP: {sharded}")
    for name in ("student", "target"):  # the analytic teacher has no weights
        for kind in ("parameters", "gradients", "optimizer_state"):
            if replicated[name][kind]:  # FSDP pads each weight's rows to a multiple of the process count
                assert 0.5 <= sharded[name][kind] / replicated[name][kind] < 0.52, (name, kind)


@pytest.mark.parametrize("run", ["cd-2proc", "cd-fsdp"])
def test_two_process_loss_curve_matches_one_process_at_equal_global_batch(runs, run):
    tmp, one, two = runs
    single, double = read_losses(tmp / "cd-1proc-0"), read_losses(tmp / run)
    assert len(single) == len(double) == CD_STEPS // 50
    other_seed = read_losses(tmp / "cd-1proc-1")
    gap = abs(sum(double) - sum(single)) / sum(single)
    seed_gap = abs(sum(other_seed) - sum(single)) / sum(single)
    print(f"\nlogged loss windows: 1 process {single}\n  2 processes ({run}) {double}\n  1 process seed 1 "
          f"{other_seed}\n  mean over 200 steps: 2 vs 1 processes {100 * gap:.2f}%, seed 1 vs seed 0 "
          f"{100 * seed_gap:.2f}%")
    assert gap < 0.02  # the per-process noise draws differ, so single windows differ by the loss's own noise
    assert two["cd_teacher_evals"] == one["cd0"].teacher_evals == 2 * 128 * CD_STEPS
    assert two["cd_network_evals"] == one["cd0"].network_evals == {"student": 128 * CD_STEPS, "target": 128 * CD_STEPS}


@pytest.mark.parametrize("run", ["resume", "resume-fsdp"])
def test_resume_under_another_process_count_is_within_the_noise_floor(runs, run):
    tmp, one, two = runs
    checkpoint = load_checkpoint(tmp / run)
    assert checkpoint.step == CD_STEPS
    assert checkpoint.state["num_processes"] == (2 if run == "resume" else 1)  # the process count that finished
    uninterrupted = [ring_metrics(one[f"cd{seed}"].ema_student.state_dict()) for seed in (0, 1)]
    resumed = ring_metrics(two["resumed"] if run == "resume" else one["resumed_fsdp"].ema_student.state_dict())
    sampling = noise_floor_toy(RING, 4000)
    how = "1 -> 2 processes" if run == "resume" else "2 sharded -> 1 process"
    for key in ("nll", "swd", "mmd"):
        seed_spread = abs(uninterrupted[0][key] - uninterrupted[1][key])
        floor = max(seed_spread, abs(sampling[key] - noise_floor_toy(RING, 4000, seed=1)[key]))
        gap = abs(resumed[key] - uninterrupted[0][key])
        print(f"{key}: uninterrupted {uninterrupted[0][key]:.4f} (seed 1: {uninterrupted[1][key]:.4f}), "
              f"resumed ({how}) {resumed[key]:.4f}; gap {gap:.4f}, noise floor {floor:.4f}")
        assert gap <= floor


def test_grad_accumulation_equals_one_big_batch():
    big, small = Deterministic(), Deterministic()
    result_big = train(big, RingWithNoise(), deterministic_config(), None, progress=False)
    result_small = train(small, RingWithNoise(), deterministic_config(grad_accumulation=4), None, progress=False)
    assert_close(weights(small, result_small), weights(big, result_big))
    assert not torch.equal(small.student.backbone.input.weight, Deterministic().student.backbone.input.weight)


def test_batch_must_split_evenly():
    with pytest.raises(ConfigError, match=r"batch_size=16 must be a multiple .* train\.grad_accumulation \(3\)"):
        train(Deterministic(), RingWithNoise(), deterministic_config(grad_accumulation=3), None, progress=False)


@pytest.mark.parametrize("key, value", [("mixed_precision", "fp16"), ("teacher_dtype", "int8"),
                                        ("distributed", "zero3"), ("grad_accumulation", 0)])
def test_bad_scale_options_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"invalid {key}"):
        deterministic_config(**{key: value})


def test_fsdp_refuses_a_method_that_bypasses_forward():
    from fewstep.methods.trajectory.consistency_trajectory import ConsistencyTrajectory, CTMConfig

    student = ConsistencyTrajectory.build_student(RING.analytic, CTMConfig(), lambda: MLP((2,), width=8, depth=1),
                                                  RING.sigma_data)
    ctm = ConsistencyTrajectory(RING.analytic, student, CTMConfig())
    with pytest.raises(ConfigError, match=r"fsdp: ConsistencyTrajectory cannot be sharded: .*functional_call"):
        train(ctm, RealData(RING.train_x), cd_config(distributed="fsdp"), None, progress=False)


def network_teacher() -> EDMDenoiser:
    torch.manual_seed(5)
    return EDMDenoiser(MLP((2,), width=64, depth=2), RING.sigma_data).requires_grad_(False)


def test_bf16_and_teacher_dtype_run_and_are_recorded(tmp_path):
    full = train(cd_method(network_teacher()), RealData(RING.train_x), cd_config(steps=20, log_every=10),
                 tmp_path / "fp32", progress=False)
    method = cd_method(network_teacher())
    half = train(method, RealData(RING.train_x), cd_config(steps=20, log_every=10, mixed_precision="bf16",
                                                           teacher_dtype="bfloat16"), tmp_path / "bf16",
                 progress=False)
    assert innermost(method.teacher).backbone.input.weight.dtype == torch.bfloat16
    assert method.student.backbone.input.weight.dtype == torch.float32
    a, b = full.losses["student/loss"], half.losses["student/loss"]
    assert a != b and abs(a - b) < 0.1 * a  # bf16 changes the numbers, not the training
    config = load_checkpoint(tmp_path / "bf16").state["config"]
    assert config["mixed_precision"] == "bf16" and config["teacher_dtype"] == "bfloat16"
    memory = json.loads((tmp_path / "bf16" / "memory.json").read_text())
    assert memory["networks"]["teacher"]["dtype"] == "bfloat16"


def test_teacher_dtype_needs_a_network_teacher():
    with pytest.raises(ConfigError, match="teacher_dtype=bfloat16 needs a network teacher"):
        train(cd_method(), RealData(RING.train_x), cd_config(steps=1, teacher_dtype="bfloat16"), None,
              progress=False)


def test_memory_plan_counts_each_network(tmp_path, capsys):
    method = cd_method(network_teacher())
    train(method, RealData(RING.train_x), cd_config(steps=2), tmp_path, progress=True)
    plan = json.loads((tmp_path / "memory.json").read_text())
    networks = plan["networks"]
    assert set(networks) == {"teacher", "student", "target"}
    params = sum(p.numel() * 4 for p in method.student.parameters())
    tensors = len(list(method.student.parameters()))
    assert networks["student"]["parameters"] == networks["student"]["gradients"] == params
    assert networks["student"]["optimizer_state"] == 2 * params + 4 * tensors  # AdamW: 2 moments + step
    assert networks["teacher"]["gradients"] == networks["teacher"]["optimizer_state"] == 0
    assert networks["target"]["gradients"] == 0 and networks["target"]["parameters"] == params
    assert plan["total"] == sum(n["total"] for n in networks.values())
    assert plan["peak_bytes"] > plan["total"] and plan["peak_kind"] == "process_peak_rss"
    assert "memory (MiB): teacher" in capsys.readouterr().out


@pytest.mark.parametrize("backbone", [MLP((2,), width=32, depth=2, emb_dim=16),
                                      SmallUNet((1, 4, 4), channels=8, emb_dim=16)])
def test_gradient_checkpointing_gives_the_same_gradients(backbone):
    torch.manual_seed(0)
    x = torch.randn((6, *backbone.data_shape))
    c = torch.randn(6)

    def grads(module):
        module.zero_grad()
        (module(x, c) ** 2).sum().backward()
        return {name: p.grad.clone() for name, p in module.named_parameters()}

    plain = grads(backbone)
    assert enable_gradient_checkpointing(backbone) == (2 if isinstance(backbone, MLP) else 4)
    checkpointed = grads(backbone)
    assert_close(checkpointed, plain)
    with torch.no_grad():
        assert torch.equal(backbone(x, c), backbone(x, c))


def test_gradient_checkpointing_trains_and_refuses_unknown_backbones(tmp_path):
    result = train(cd_method(), RealData(RING.train_x), cd_config(steps=3, gradient_checkpointing=True), None,
                   progress=False)
    assert result.steps_done == 3
    with pytest.raises(ConfigError, match="no blocks fewstep can checkpoint"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
