"""The one distillation path and protocol v2: counted teacher calls, schedules fitted to a run, per-phase optimiser
settings, idle phases, composite sources and teacher pairs charged to a method's budget."""

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.data.sources import make_source
from fewstep.errors import ConfigError
from fewstep.methods import METHODS
from fewstep.methods.base import DistillationMethod, MethodConfig, PairRequest, Phase
from fewstep.methods.consistency.consistency_distillation import ConsistencyDistillation
from fewstep.models.analytic import GaussianMixture
from fewstep.models.denoiser import CountingDenoiser, EDMDenoiser
from fewstep.nets import MLP
from fewstep.pipeline import (
    build_method,
    distill,
    method_source,
    new_method,
    steps_for_budget,
    teacher_cost,
)
from fewstep.solvers import Sampling
from fewstep.teachers import Teacher
from fewstep.train.calls import NetworkCalls
from fewstep.train.trainer import TrainConfig, _optimizer, _update, accelerator_for, train

SMALL = {"width": 16, "depth": 1}
ROOT = Path(__file__).parent.parent


def class_conditional_teacher(scale: float) -> Teacher:
    """Two labelled Gaussians: a class-conditional analytic teacher, guided at ``scale``."""
    ring = fewstep.load_dataset("ring8")
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    mixture = GaussianMixture(torch.ones(2), means, torch.full((2,), 0.04, dtype=torch.float64),
                              component_labels=[0, 1])
    labels = (ring.train_x[:, 0] > 0).long()
    dataset = dataclasses.replace(ring, name="two", num_classes=2, train_y=labels, analytic=None, modes=None)
    return Teacher(mixture, dataset, "two", guidance_scale=scale)


def real_samples(teacher: Teacher) -> list[int]:
    """A forward hook's record of the samples each real call of the teacher's innermost denoiser sees."""
    seen: list[int] = []
    teacher.denoiser.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    return seen


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_counted_teacher_evaluations_equal_the_real_calls_for_every_method(name):
    """One training cycle of every registered method: the count its wrapper keeps (one per sample a call denoises)
    equals what the teacher's own forward saw. No method counts by hand."""
    teacher = Teacher.analytic("ring8")
    distiller = build_method(teacher, name, {}, SMALL, steps=4)
    source = method_source(distiller, teacher, progress=False)  # teacher pairs: charged to the source, not here
    seen = real_samples(teacher)
    batch = source.batch(16, torch.Generator().manual_seed(0))
    for step in (0, 3):  # rCM's DMD term starts after the warm-up
        for phase in distiller.phases():
            for _ in range(phase.updates):
                distiller.losses(phase.name, batch, step, torch.Generator().manual_seed(step))
    assert distiller.teacher_evals == sum(seen)
    assert distiller.teacher.calls == len(seen)
    if name in ("ct", "ict", "ect", "sct"):
        assert not seen  # consistency training never calls the teacher


@pytest.mark.parametrize("name", ["cd", "lcm"])
def test_a_guided_call_counts_once_though_it_runs_the_network_on_both_conditions(name):
    teacher = class_conditional_teacher(scale=2.0)
    distiller = build_method(teacher, name, {}, SMALL, steps=4)
    seen = real_samples(teacher)
    batch = method_source(distiller, teacher, progress=False).batch(16, torch.Generator().manual_seed(0))
    distiller.losses("student", batch, 0, torch.Generator().manual_seed(0))
    assert seen and all(n == 32 for n in seen)  # conditional and unconditional rows in one call
    assert distiller.teacher_evals == sum(seen) // 2


def test_run_schedules_fit_only_fields_their_methods_have():
    for name, method in METHODS.items():
        fitted = method.run_schedule(1000, {})
        assert set(fitted) <= {f.name for f in dataclasses.fields(method.Config)}, name
    assert METHODS["hyper_sd"].run_schedule(1000, {})["steps_per_stage"] == 250  # 8, 4, 2, 1 segments
    assert METHODS["hyper_sd"].run_schedule(1000, {"start_segments": 2})["steps_per_stage"] == 500
    assert METHODS["ect"].run_schedule(1000, {})["steps_per_stage"] == 125
    assert METHODS["ect"].run_schedule(3, {})["steps_per_stage"] == 1
    assert METHODS["pd"].run_schedule(999, {"start_steps": 32, "final_steps": 4})["steps_per_round"] == 333
    assert METHODS["ct"].run_schedule(700, {}) == METHODS["ict"].run_schedule(700, {}) == {"total_steps": 700}
    for name in ("sct", "scd", "rcm"):
        assert METHODS[name].run_schedule(292, {}) == {"tangent_warmup": 29}
    assert METHODS["cd"].run_schedule(1000, {}) == {}


def test_build_method_fits_the_schedule_unless_the_caller_gives_it():
    teacher = Teacher.analytic("ring8")
    assert build_method(teacher, "rcm", {}, SMALL, steps=292).dmd_start == 29
    assert build_method(teacher, "ect", {"steps_per_stage": 7}, SMALL, steps=1000).config.steps_per_stage == 7
    assert build_method(teacher, "ect", {}, SMALL).config.steps_per_stage == 250  # no run length: the default


def test_teacher_cost_is_measured_per_method_at_the_training_batch():
    teacher = Teacher.analytic("ring8")
    for name in ("cd", "pd"):
        assert teacher_cost(teacher, name, {}, SMALL, 16, 10, 0) == (2.0, 0)
    # TBCM rolls out 32 trajectories of 2 (N - 1) = 34 evaluations per step, whatever the batch: per sample that
    # is 34 at a batch of 32 but 4.25 at 256 (the probe must use the training batch size)
    assert teacher_cost(teacher, "tbcm", {"rollouts_per_step": 4}, SMALL, 4, 10, 0)[0] == 34.0
    assert teacher_cost(teacher, "tbcm", {}, SMALL, 256, 10, 0)[0] == 32 * 34 / 256
    # rCM spends one more evaluation per sample once its DMD term starts (after the warm-up)
    assert teacher_cost(teacher, "rcm", {}, SMALL, 16, 10, 0)[0] == 1.0
    assert teacher_cost(teacher, "rcm", {}, SMALL, 16, 10, 9)[0] == 2.0
    steps, per_sample = steps_for_budget(teacher, "rcm", 200 * 16 * 2, 16, {}, SMALL)
    assert (steps, per_sample) == (200, 2.0)  # budgeted at its dearer step
    assert steps_for_budget(teacher, "ct", 100 * 16 * 2, 16, {}, SMALL) == (100, 0.0)  # CD's steps


@dataclass
class PairsConfig(MethodConfig):
    num_pairs: int = 64


class PairRegression(DistillationMethod):
    """A stand-in for a method trained on teacher pairs: regress the student's one-step output onto each pair's
    endpoint."""

    name = "pair_regression"
    needs = frozenset({"teacher_pairs"})
    Config = PairsConfig

    def pair_request(self) -> PairRequest:
        return PairRequest(self.config.num_pairs, "euler", 4)

    def losses(self, phase, batch, step, generator):
        s = torch.full((batch.size,), 80.0)
        return {"loss": ((self.student(80.0 * batch.noise, s) - batch.endpoint) ** 2).mean()}

    def sampling(self, nfe):
        return Sampling("euler", [80.0, 0.0])


def test_teacher_pairs_are_charged_to_the_method_that_trains_on_them(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    teacher = Teacher.analytic("ring8")
    assert teacher_cost(teacher, PairRegression, {}, SMALL, 16, 1, 0) == (0.0, 64 * 4)
    steps, _ = steps_for_budget(teacher, PairRegression, 64 * 4 + 10 * 2 * 16, 16, {}, SMALL)
    assert steps == 10  # the pairs' cost comes off the budget; the rest buys teacher-free steps
    with pytest.raises(ConfigError, match="whole budget"):
        steps_for_budget(teacher, PairRegression, 64 * 4, 16, {}, SMALL)
    student = distill(teacher, PairRegression, steps=3, batch_size=16, student_backbone_args=SMALL, progress=False)
    assert student.train_result.teacher_evals == 64 * 4  # generated once, paid once, even from the cache
    assert len(list((tmp_path / "pairs").iterdir())) == 1


class TwoPhases(DistillationMethod):
    """A critic phase with its own optimiser settings, idle (a loss without gradient) at even steps; a student
    phase regressing onto the teacher. Counts its critic updates."""

    name = "two_phases"
    needs = frozenset({"noise", "data"})

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(fewstep.load_dataset("ring8").analytic, EDMDenoiser(MLP((2,), **SMALL), 1.4),
                         MethodConfig())
        self.critic = torch.nn.Linear(2, 1)
        self.critic_updates = 0

    def phases(self):
        return [Phase("critic", list(self.critic.parameters()), updates=2, lr_scale=2.0, betas=(0.0, 0.99),
                      weight_decay=0.01, grad_clip=1e-3), *super().phases()]

    def losses(self, phase, batch, step, generator):
        if phase == "critic":
            loss = (self.critic(batch["data"].x0) - self.critic(batch["noise"].noise)).mean()
            return {"loss": loss.detach() if step % 2 == 0 else loss}
        x0 = batch["data"].x0
        s = torch.ones(x0.shape[0])
        return {"loss": ((self.student(x0 + s[:, None] * batch["noise"].noise, s) - x0) ** 2).mean()}

    def after_update(self, phase, step):
        self.critic_updates += phase == "critic"
        return False

    def sampling(self, nfe):
        return Sampling("euler", [80.0, 0.0])


def test_phases_have_their_own_optimiser_settings_and_can_be_idle(tmp_path):
    method = TwoPhases()
    critic = method.phases()[0]
    optimizer = _optimizer(critic, TrainConfig(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0))
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.0, 0.99) and group["weight_decay"] == 0.01 and group["lr"] == 2e-3
    plain = _optimizer(method.phases()[1], TrainConfig(lr=1e-3, weight_decay=0.5)).param_groups[0]
    assert plain["betas"] == (0.9, 0.999) and plain["weight_decay"] == 0.5 and plain["lr"] == 1e-3

    source = make_source(method.needs, fewstep.load_dataset("ring8"))
    before = [p.detach().clone() for p in method.critic.parameters()]
    config = TrainConfig(steps=4, batch_size=8, lr=1e-2, log_every=2, checkpoint_every=100, seed=0)
    train(method, source, config, run_dir=tmp_path, progress=False)
    assert method.critic_updates == 2 * 2  # two updates at each of the two odd steps; none when idle
    assert not all(torch.equal(a, b) for a, b in zip(before, method.critic.parameters(), strict=True))
    with open(tmp_path / "log.csv") as file:
        rows = list(csv.DictReader(file))
    critic_rows = [row for row in rows if row["phase"] == "critic"]
    assert [float(row["idle"]) for row in critic_rows] == [0.5, 0.5]  # half its updates in each window idled
    assert all(row["idle"] == "" for row in rows if row["phase"] == "student")


def test_a_phases_gradient_clip_applies_to_its_update():
    method = TwoPhases()
    source = make_source(method.needs, fewstep.load_dataset("ring8"))
    critic = method.phases()[0]
    generators = {"data": torch.Generator().manual_seed(0), "noise": torch.Generator().manual_seed(1)}
    optimizer = _optimizer(critic, TrainConfig())
    values = _update(method, critic, optimizer, source, 1, generators, TrainConfig(batch_size=8),
                     accelerator_for("cpu"), None, NetworkCalls(method))
    assert values["idle"] is False
    norm = torch.stack([p.grad.norm() for p in critic.parameters]).norm()
    assert norm <= 1e-3 * (1 + 1e-6)  # the phase's clip, not the run's 1.0


def test_distill_takes_a_method_built_and_checked_beforehand():
    teacher = Teacher.analytic("ring8")
    config = TrainConfig(steps=2, batch_size=8, seed=5)
    built = new_method(teacher, "cd", {}, SMALL, config)
    again = new_method(teacher, "cd", {}, SMALL, config)
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), again.state_dict().values(),
                                                   strict=True))  # the student's weights come from the seed
    student = distill(teacher, built, train_config=config, progress=False)
    assert student.method == "cd" and student.metadata["method_args"]["num_scales"] == 18
    with pytest.raises(ConfigError, match="own arguments"):
        distill(teacher, built, method_args={"num_scales": 3}, train_config=config, progress=False)


def test_methods_get_the_teacher_counted_whatever_they_are_given():
    mixture = fewstep.load_dataset("ring8").analytic
    student = ConsistencyDistillation.build_student(mixture, ConsistencyDistillation.Config(),
                                                    lambda: MLP((2,), **SMALL), 1.4)
    method = ConsistencyDistillation(mixture, student, ConsistencyDistillation.Config())
    assert isinstance(method.teacher, CountingDenoiser) and method.teacher.denoiser is mixture
    counted = CountingDenoiser(mixture)
    assert ConsistencyDistillation(counted, student, ConsistencyDistillation.Config()).teacher is counted


def test_a_resumed_run_reports_the_whole_runs_teacher_evaluations(tmp_path):
    teacher = Teacher.analytic("ring8")
    config = TrainConfig(steps=6, batch_size=8, checkpoint_every=3, seed=0)
    whole = distill(teacher, "cd", train_config=config, student_backbone_args=SMALL, progress=False)
    distill(teacher, "cd", train_config=dataclasses.replace(config, steps=3), student_backbone_args=SMALL,
            run_dir=tmp_path, progress=False)
    resumed = distill(teacher, "cd", train_config=config, student_backbone_args=SMALL, run_dir=tmp_path,
                      progress=False)
    assert resumed.train_result.teacher_evals == whole.train_result.teacher_evals == 6 * 8 * 2


def test_a_recipe_monitors_its_student_while_it_trains(tmp_path):
    from fewstep.config import load_recipe
    from fewstep.run import run_recipe

    recipe = load_recipe(ROOT / "configs" / "ring8-cd.yaml",
                         ["train.steps=4", "train.log_every=2", "eval.monitor_every=2", "eval.monitor_samples=50",
                          "eval.n_samples=200", "eval.teacher_nfe=[1]", "eval.student_nfe=[1]", f"out={tmp_path}"])
    run_recipe(recipe, progress=False)
    with open(tmp_path / "run" / "log.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["phase"] == "monitor"]
    assert [row["step"] for row in rows] == ["2", "4"]
    assert all(0 <= int(float(row["modes_covered"])) <= 8 and 0 <= float(row["recall"]) <= 1 for row in rows)
    with pytest.raises(ConfigError, match="monitor"):
        run_recipe(dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, monitor_every=-1)))
