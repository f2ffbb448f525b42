"""SampleMonitor (:mod:`fewstep.train.monitor`): known answers for exact, collapsed and stand-in students on the
ring, moons and digits, fixed noise, argument checks, and its rows in a real training run's log.csv."""

import csv
import dataclasses
import math

import pytest
import torch

from fewstep.data import load_dataset
from fewstep.data.sources import RealData
from fewstep.errors import ConfigError
from fewstep.eval.digits import digits_metrics
from fewstep.methods import METHODS
from fewstep.models.denoiser import Denoiser
from fewstep.nets import MLP
from fewstep.solvers import Sampling, solver_sigmas
from fewstep.train.monitor import DIGITS_KEYS, MODE_KEYS, SampleMonitor
from fewstep.train.trainer import TrainConfig, train

RING = load_dataset("ring8")
ONE_JUMP = Sampling("euler", [80.0, 0.0])  # the sample is the student's output at s = 80


class Fixed(Denoiser):
    """A stand-in student whose output ignores its input: ``rows`` (cut to the batch), or one point repeated.
    It keeps the conditions it was called with."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.register_buffer("rows", rows)
        self.conds: list = []

    def forward(self, x, s, cond=None):
        self.conds.append(cond)
        rows = self.rows.expand(x.shape[0], *self.rows.shape[1:]) if len(self.rows) == 1 else self.rows[:len(x)]
        return rows.to(x.dtype)


def test_the_exact_teacher_covers_the_ring():
    """The exact ring denoiser solved with Heun at 35 evaluations samples the ring itself: 8 modes, recall as
    high as exact samples reach at this size (~0.98), and each mode's in-mode share within 4.5 multinomial
    standard errors sqrt(w (1 - w) / n_in) of w = 1/8."""
    monitor = SampleMonitor(RING, Sampling("heun", solver_sigmas("heun", 35)), every=1)
    m = monitor(0, RING.analytic)
    assert set(m) == {"nonfinite", *MODE_KEYS, "recall"}
    assert m["nonfinite"] == 0 and m["modes_covered"] == 8 and m["recall"] > 0.9
    se = math.sqrt(1 / 8 * 7 / 8 / 490)  # at least 490 of 500 samples fall within 3 stds of their mode
    assert m["mode_weight_worst"] < 4.5 * se < 0.07
    assert m["mode_weight_worst_relative"] == pytest.approx(8 * m["mode_weight_worst"])
    assert m["mode_balance"] < 0.1


def test_a_collapsed_student_shows_one_mode_and_no_recall():
    """Every sample on mode 0's mean: p = e_0, so balance and worst error are 1 - 1/8, the relative error 7, and
    recall 0 (all samples share one point, so their k-NN balls have radius 0 and hold no reference point)."""
    monitor = SampleMonitor(RING, ONE_JUMP, every=1)
    m = monitor(0, Fixed(RING.modes.means[:1].float()))
    assert m["modes_covered"] == 1 and m["recall"] == 0
    assert m["mode_balance"] == pytest.approx(0.875) and m["mode_weight_worst"] == pytest.approx(0.875)
    assert m["mode_weight_worst_relative"] == pytest.approx(7.0)


@pytest.mark.parametrize("sampling", [Sampling("heun", solver_sigmas("heun", 5).tolist()),
                                      Sampling("consistency", [80.0, 0.5])])
def test_the_same_student_gets_the_same_numbers(sampling: Sampling):
    """Fixed noise, and for a stochastic sampler (consistency re-noising) a re-seeded generator each call; another
    seed draws other noise."""
    monitor = SampleMonitor(RING, sampling, every=1, n_samples=200)
    first = monitor(0, RING.analytic)
    assert monitor(1, RING.analytic) == first
    assert torch.equal(monitor.draw(RING.analytic), monitor.draw(RING.analytic))
    assert SampleMonitor(RING, sampling, every=1, n_samples=200, seed=1)(0, RING.analytic) != first


def test_points_without_modes_get_swd_precision_and_recall():
    """On moons: a student whose samples are the monitor's own reference points scores exactly swd 0 and
    precision = recall = 1; one that collapses onto one training point has recall 0 and a large swd."""
    moons = load_dataset("moons")
    monitor = SampleMonitor(moons, ONE_JUMP, every=1, n_samples=300)
    perfect = monitor(0, Fixed(monitor.ref.float()))
    assert perfect == {"nonfinite": 0.0, "swd": pytest.approx(0.0, abs=1e-7), "precision": 1.0, "recall": 1.0}
    collapsed = monitor(0, Fixed(moons.train_x[:1]))
    assert collapsed["recall"] == 0 and collapsed["swd"] > 1.0


def test_nonfinite_samples_are_dropped_and_counted():
    nan = torch.full((1, 2), math.nan)
    m = SampleMonitor(RING, ONE_JUMP, every=1, n_samples=20)(0, Fixed(nan))
    assert m["nonfinite"] == 1.0 and all(math.isnan(m[key]) for key in (*MODE_KEYS, "recall"))


def test_digits_numbers_are_the_evaluators_on_real_images():
    """Real images cannot come out of noise without a trained model, so a stand-in student returns 200 real
    training digits whatever it is given. This shows the digits path end to end (cycling labels passed as the
    condition, the cached classifier, features against ref_x): the monitor's numbers are exactly
    digits_metrics on those images, near the real-data level, and far from those of blank images. It says
    nothing about a trained student."""
    digits = load_dataset("digits")
    images = digits.train_x[:200]
    student = Fixed(images)
    monitor = SampleMonitor(digits, ONE_JUMP, every=1, n_samples=200)
    m = monitor(0, student)
    assert torch.equal(student.conds[0], torch.arange(200) % 10)
    reference = digits_metrics(images, digits)
    assert m == {"nonfinite": 0.0} | {key: reference[key] for key in DIGITS_KEYS}
    assert math.isfinite(m["fd"]) and m["precision"] > 0.9 and m["recall"] > 0.9
    blank = monitor(0, Fixed(torch.full((1, 1, 8, 8), -1.0)))
    assert blank["fd"] > 50 * m["fd"] and blank["recall"] == 0


@pytest.mark.parametrize(("change", "name"), [({"every": 0}, "every"), ({"n_samples": 9}, "n_samples"),
                                              ({"seed": -1}, "seed"),
                                              ({"sampling": Sampling("dpm", [80.0, 0.0])}, "sampling"),
                                              ({"sampling": Sampling("euler", [0.0, 1.0])}, "sampling"),
                                              ({"sampling": Sampling("euler", [])}, "sampling")])
def test_bad_arguments_are_refused_by_name(change: dict, name: str):
    arguments = {"dataset": RING, "sampling": ONE_JUMP, "every": 1} | change
    with pytest.raises(ConfigError, match=f"SampleMonitor: {name} "):
        SampleMonitor(**arguments)


class Recording(SampleMonitor):
    """A SampleMonitor that keeps every step it was called at and what it returned."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, dict]] = []

    def __call__(self, step, student):
        numbers = super().__call__(step, student)
        self.calls.append((step, numbers))
        return numbers


def tiny_cd(seed: int = 0):
    cd = METHODS["cd"]
    config = cd.Config()
    torch.manual_seed(seed)
    student = cd.build_student(RING.analytic, config, lambda: MLP((2,), width=16, depth=1, emb_dim=8), RING.sigma_data)
    return cd(RING.analytic, student, config)


def test_monitor_rows_in_a_training_log(tmp_path):
    """A 6-step CD run on the ring with the monitor every 2 steps (= log_every): log.csv has a "monitor" row at
    steps 2, 4 and 6 holding exactly what the monitor returned there, the last equal to the monitor re-run on
    the trained (live, non-EMA) student; and watching does not change training (its draws use their own
    generators)."""
    settings = TrainConfig(steps=6, batch_size=32, log_every=2, checkpoint_every=100)
    method = tiny_cd()
    monitor = Recording(RING, method.sampling(2), every=2, n_samples=100)
    train(method, RealData(RING.train_x), settings, tmp_path, progress=False, monitors=(monitor,))
    with open(tmp_path / "log.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row["phase"] == "monitor"]
    assert [step for step, _ in monitor.calls] == [2, 4, 6]
    assert [int(row["step"]) for row in rows] == [2, 4, 6]
    for row, (_, numbers) in zip(rows, monitor.calls, strict=True):
        assert {key: float(row[key]) for key in numbers} == numbers
    assert monitor.calls[-1][1] == monitor(6, method.student_denoiser().eval())

    unwatched = tiny_cd()
    train(unwatched, RealData(RING.train_x), settings, None, progress=False)
    for key, value in unwatched.state_dict().items():
        assert torch.equal(value, method.state_dict()[key]), key


def test_monitor_rows_for_a_dataset_without_modes(tmp_path):
    """The same plumbing with the ring's points but no mode annotation: swd, precision and recall, whose swd
    moves as the student trains."""
    settings = TrainConfig(steps=4, batch_size=32, log_every=2, checkpoint_every=100)
    monitor = SampleMonitor(dataclasses.replace(RING, modes=None), tiny_cd().sampling(1), every=2, n_samples=100)
    train(tiny_cd(), RealData(RING.train_x), settings, tmp_path, progress=False, monitors=(monitor,))
    with open(tmp_path / "log.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row["phase"] == "monitor"]
    assert [int(row["step"]) for row in rows] == [2, 4]
    swd = [float(row["swd"]) for row in rows]
    assert all(math.isfinite(value) and value > 0 for value in swd) and swd[0] != swd[1]
    assert all(0 <= float(row["recall"]) <= 1 and 0 <= float(row["precision"]) <= 1 for row in rows)
