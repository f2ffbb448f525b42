"""The count of every network call in training (:mod:`fewstep.train.calls`): exact per-sample counts by network and
role, worked out by hand from the steps, the batch and each method's updates per step."""

import json

import pytest
import torch
from torch import nn

from fewstep.cli import main
from fewstep.methods import METHODS
from fewstep.models.denoiser import CountingDenoiser, EDMDenoiser
from fewstep.nets import MLP
from fewstep.pipeline import build_method, method_source
from fewstep.teachers import Teacher
from fewstep.train.calls import STUDENT_COPIES, NetworkCalls
from fewstep.train.trainer import TrainConfig, train

STEPS, BATCH = 3, 8
RING = Teacher.analytic("ring8")


def run(method: str, args: dict | None = None, steps: int = STEPS, run_dir=None):
    distiller = build_method(RING, method, args, steps=steps)
    result = train(distiller, method_source(distiller, RING, progress=False),
                   TrainConfig(steps=steps, batch_size=BATCH, checkpoint_every=2), run_dir=run_dir, progress=False)
    return result


def test_cd_counts_student_and_target_once_per_sample_and_two_teacher_calls_of_a_heun_step():
    result = run("cd")
    assert result.teacher_evals == STEPS * BATCH * 2  # one Heun step of the teacher: two calls
    assert result.network_evals == {"student": STEPS * BATCH, "target": STEPS * BATCH}
    assert (result.student_evals, result.auxiliary_evals, result.other_evals) == (2 * STEPS * BATCH, 0,
                                                                                  2 * STEPS * BATCH)


def dmd2_counts(fake_updates: int) -> dict[str, int]:
    """DMD2 with one generation step, by hand. A fake-score update: the generator's sample (student), the fake
    score's denoising loss, and the GAN head's logits on generated and on real data (a fake-score forward each,
    whose feature the head reads: one head call each). A generator update: its sample, the teacher and the fake
    score on it (the distribution-matching direction), and one logit (fake score and head)."""
    per_step = {"student": fake_updates + 1, "fake_score": 3 * fake_updates + 2, "head": 2 * fake_updates + 1}
    return {name: STEPS * BATCH * n for name, n in per_step.items()}


@pytest.mark.parametrize("fake_updates", [1, 5])
def test_dmd2_counts_every_fake_score_update_and_the_gan_head(fake_updates):
    result = run("dmd2", {"fake_updates": fake_updates, "generation_steps": 1, "fake_warmup": 0})
    expected = dmd2_counts(fake_updates)
    assert result.teacher_evals == STEPS * BATCH  # the teacher only in the generator's update
    assert result.network_evals == expected
    assert result.student_evals == expected["student"]
    assert result.auxiliary_evals == expected["fake_score"] + expected["head"]


def test_the_auxiliary_calls_of_four_more_fake_updates_are_counted():
    """At the same teacher budget, fake_updates=5 does 4 more fake-score updates per step than fake_updates=1:
    4 x (one student, three fake-score and two head calls) per sample, which the counts must show."""
    one, five = (run("dmd2", {"fake_updates": k, "generation_steps": 1}) for k in (1, 5))
    assert one.teacher_evals == five.teacher_evals
    assert five.auxiliary_evals - one.auxiliary_evals == STEPS * BATCH * 4 * (3 + 2)
    assert five.student_evals - one.student_evals == STEPS * BATCH * 4


def test_dmd2_without_a_gan_term_calls_no_head():
    result = run("dmd2", {"fake_updates": 2, "generation_steps": 1, "gan_critic_weight": 0.0,
                          "gan_generator_weight": 0.0})
    assert result.network_evals == {"student": STEPS * BATCH * 3, "fake_score": STEPS * BATCH * (2 + 1), "head": 0}


def test_a_teacher_free_method_counts_its_two_student_passes():
    """iCT calls no teacher: the student with gradient at the higher level and without at the lower one."""
    result = run("ict")
    assert result.teacher_evals == 0
    assert result.network_evals == {"student": 2 * STEPS * BATCH}
    assert (result.student_evals, result.auxiliary_evals) == (2 * STEPS * BATCH, 0)


def test_a_resumed_run_reports_the_whole_runs_network_calls(tmp_path):
    run("cd", steps=2, run_dir=tmp_path)  # checkpointed at step 2
    resumed = run("cd", steps=4, run_dir=tmp_path)
    assert resumed.steps_done == 4
    assert resumed.network_evals == run("cd", steps=4).network_evals == {"student": 4 * BATCH, "target": 4 * BATCH}


def test_distill_reports_the_counts_in_report_json_and_report_md(tmp_path):
    out = tmp_path / "run"
    assert main(["distill", "dataset=ring8", "method=cd", "teacher.source=analytic", f"out={out}", "train.steps=2",
                 f"train.batch_size={BATCH}", "eval.n_samples=100", "eval.teacher_nfe=[1]", "eval.student_nfe=[1]",
                 "--quiet"]) == 0
    training = json.loads((out / "report.json").read_text())["training"]["student/cd"]
    assert training | {"seconds": 0} == {"seconds": 0, "steps": 2, "teacher_evals": 2 * BATCH * 2,
                                         "student_evals": 2 * BATCH * 2, "auxiliary_evals": 0,
                                         "network_evals": {"student": 2 * BATCH, "target": 2 * BATCH}}
    assert (f"{4 * BATCH} teacher evaluations, {4 * BATCH} evaluations of its other networks (student {4 * BATCH}, "
            f"auxiliary 0; by network: student {2 * BATCH}, target {2 * BATCH})") in (out / "report.md").read_text()


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.teacher = CountingDenoiser(EDMDenoiser(MLP((2,), width=8, depth=1)))
        self.student = EDMDenoiser(MLP((2,), width=8, depth=1))
        self.head = nn.Linear(2, 1)


def test_a_call_counts_its_samples_once_for_its_network_only_while_counting():
    toy = Toy()
    calls = NetworkCalls(toy)
    x, s = torch.randn(5, 2), torch.ones(5)
    toy.student(x, s)  # outside counting (e.g. a monitor's sampling): not counted
    with calls.counting():
        toy.student(x, s)  # 5, however many modules run inside it
        toy.student.backbone(x, s.log(), None)  # its backbone alone: a call of the student
        toy.head(input=x[:3])  # by keyword
        toy.teacher(x, s)  # the teacher is its CountingDenoiser's
    assert calls.evals == {"student": 10, "head": 3}
    assert calls.by_role() == {"student": 10, "auxiliary": 3}
    assert toy.teacher.evals == 5
    calls.remove()
    with calls.counting():
        toy.student(x, s)
    assert calls.evals["student"] == 10


def test_a_network_called_inside_another_is_part_of_that_call():
    toy = Toy()
    toy.teacher = CountingDenoiser(toy.student)  # the student runs inside the teacher's calls
    calls = NetworkCalls(toy)
    x, s = torch.randn(4, 2), torch.ones(4)
    with calls.counting():
        toy.teacher(x, s)
        assert calls.evals == {"student": 0, "head": 0} and toy.teacher.evals == 4
        toy.student(x, s)
    assert calls.evals == {"student": 4, "head": 0}


def test_every_methods_networks_have_a_role():
    """Each network a registered method owns is the teacher, the student, a copy of the student
    (:data:`STUDENT_COPIES`) or one of the auxiliary networks below: a new name must be placed on purpose."""
    auxiliary = {"fake_score", "head", "logvar", "features", "frozen_features"}
    for name in METHODS:
        distiller = build_method(RING, name, steps=10)
        names = {child for child, _ in distiller.named_children()}
        assert names <= {"teacher", "student", *STUDENT_COPIES, *auxiliary}, (name, names)
        roles = NetworkCalls(distiller).roles
        assert {child for child, role in roles.items() if role == "auxiliary"} == names & auxiliary, name
