"""Choosing a consistency student's intermediate levels on the training split (fewstep.eval.levels)."""

import dataclasses
import itertools
import math

import pytest
import torch

from fewstep.api import Student
from fewstep.cli import main
from fewstep.data import load_dataset
from fewstep.errors import ConfigError, DataError
from fewstep.eval.levels import search_levels, training_split_score, tune_levels
from fewstep.models.denoiser import ConsistencyDenoiser
from fewstep.nets import MLP
from fewstep.solvers import Sampling

RING = load_dataset("ring8")


def log_distance(levels, targets):
    return sum((math.log(a) - math.log(b)) ** 2 for a, b in zip(levels[1:], targets[1:], strict=True))


def test_search_finds_the_minimum_of_a_known_score_to_the_grid_resolution():
    target = [80.0, 0.3]
    coarse, _, _ = search_levels(lambda levels: log_distance(levels, target), [80.0, 2.0], grid=12, refinements=0)
    # the full grid's spacing is log(80 / 0.002) / 13 = 0.82, a refinement's 2 * 0.82 / 13 = 0.13
    assert abs(math.log(coarse[1] / 0.3)) < 0.41, coarse
    found, score, start = search_levels(lambda levels: log_distance(levels, target), [80.0, 2.0], grid=12)
    assert found[0] == 80.0 and abs(math.log(found[1] / 0.3)) < 0.065, found
    assert score == log_distance(found, target) and start == log_distance([80.0, 2.0], target)
    finer, _, _ = search_levels(lambda levels: log_distance(levels, target), [80.0, 2.0], grid=12, refinements=2)
    assert abs(math.log(finer[1] / 0.3)) < 0.0097, finer  # half of 2 * 0.13 / 13


def test_search_moves_every_level_and_keeps_them_decreasing():
    target = [80.0, 5.0, 0.5, 0.05]
    found, _, _ = search_levels(lambda levels: log_distance(levels, target), [80.0, 17.0, 3.8, 0.82])
    assert all(b < a for a, b in itertools.pairwise(found))
    assert all(abs(math.log(a / b)) < 0.1 for a, b in zip(found[1:], target[1:], strict=True)), found


def test_search_never_returns_worse_than_where_it_started():
    start = [80.0, 1.0]
    found, score, start_score = search_levels(lambda levels: log_distance(levels, start), start)
    assert found == start and score == start_score == 0.0
    calls = []
    found, score, start_score = search_levels(lambda levels: calls.append(levels) or 1.0, start, grid=5, rounds=1,
                                              refinements=0)
    assert found == start and len(calls) == 6  # the start, then 5 trials that tie and are not taken


def test_search_refuses_bad_levels_and_grid():
    with pytest.raises(ConfigError, match="decrease strictly"):
        search_levels(lambda levels: 0.0, [80.0, 1.0, 2.0])
    with pytest.raises(ConfigError, match="sigma_min"):
        search_levels(lambda levels: 0.0, [80.0, 0.001])
    with pytest.raises(ConfigError, match="grid"):
        search_levels(lambda levels: 0.0, [80.0, 1.0], grid=0)
    with pytest.raises(ConfigError, match="refinements"):
        search_levels(lambda levels: 0.0, [80.0, 1.0], refinements=-1)


def ring_student(sampler: str = "consistency") -> Student:
    torch.manual_seed(0)
    denoiser = ConsistencyDenoiser(MLP((2,), width=16, depth=1), RING.sigma_data)
    return Student(denoiser, "cd", {1: Sampling(sampler, [80.0]), 2: Sampling(sampler, [80.0, 0.8])}, RING)


def test_tune_levels_uses_the_training_split_only_and_writes_the_student():
    student = ring_student()
    trace = tune_levels(student, (1, 2), n_samples=400, grid=4, rounds=1, refinements=1, progress=False)
    assert set(trace) == {2} and trace[2]["metric"] == "swd" and trace[2]["split"] == "train"
    assert student.sampling[2].sigmas == trace[2]["levels"] and trace[2]["score"] <= trace[2]["default_score"]
    _, score = training_split_score(student, 2, n_samples=400, seed=101)  # the score is reproducible
    assert score(trace[2]["levels"]) == trace[2]["score"]
    # a held-out split of garbage changes nothing: the held-out split plays no part in the choice
    spoiled = ring_student()
    spoiled.dataset = dataclasses.replace(RING, ref_x=torch.full_like(RING.ref_x, float("nan")))
    assert tune_levels(spoiled, (2,), n_samples=400, grid=4, rounds=1, refinements=1, progress=False) == trace


def test_tune_levels_refuses_other_samplers_and_students_without_a_training_split():
    with pytest.raises(ConfigError, match="'euler'"):
        tune_levels(ring_student("euler"), (2,), progress=False)
    outside = ring_student()
    outside.dataset = dataclasses.replace(RING, train_x=torch.empty(0, 2))
    with pytest.raises(DataError, match="training split"):
        tune_levels(outside, (2,), progress=False)
    with pytest.raises(ConfigError, match="nfe=4"):
        tune_levels(ring_student(), (4,), progress=False)


def test_cli_levels_saves_the_chosen_levels(tmp_path, capsys):
    ring_student().save(tmp_path / "student")
    assert main(["levels", str(tmp_path), "--nfe", "2", "--n-samples", "300", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2 NFE: levels [80, 0.8] ->" in out and "swd on the training split" in out
    saved = Student.load(tmp_path / "student").sampling[2].sigmas
    assert saved[0] == 80.0 and saved[1] > 0.002


def test_a_recipe_that_asks_levels_of_a_non_consistency_sampler_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["distill", "dataset=ring8", "teacher.source=analytic", "method=pd", "eval.tune_levels=true",
                 f"out={out}", "--quiet"])
    assert code == 2 and "eval.tune_levels" in capsys.readouterr().err and not out.exists()
