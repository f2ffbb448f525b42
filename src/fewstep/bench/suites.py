"""Benchmark suites: which teachers every method is distilled from, and the equal budget each method gets.

A :class:`Suite` is one table of ``BENCHMARKS.md``. Every method in a suite gets the same number of *teacher
evaluations* (one call of the teacher on one sample counts one, whether or not the call is guided; what a method's
teacher pairs cost to make comes off its budget), converted to training steps from what the method spends per
step (:func:`fewstep.pipeline.steps_for_budget`). Methods that never call the teacher get the steps of a method
spending :data:`TEACHER_FREE_EVALS_PER_SAMPLE` evaluations per sample. ``max_seconds`` caps each cell's training
wall time; a capped cell reports the teacher evaluations it used.

A method's arguments in a suite are its recipe's, ``<recipes>-<method>.yaml`` in the recipe folder (fewstep's own
``configs/`` by default): its ``method_args`` and, where the teacher has no network to copy, its
``student_backbone_args``. The fields that depend on the run's length (curricula, stages, rounds, warm-ups) are
dropped and fitted again to the cell's steps by the method itself (:meth:`~fewstep.methods.base.DistillationMethod.
run_schedule`). A method without a recipe for the suite runs at its defaults. The learning rate, batch size and
student network are the suite's, the same for every method. So this file names no method: what a method needs is in
its recipe and its class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SUITE_NAMES = ("quick", "full")
TEACHER_FREE_EVALS_PER_SAMPLE = 2.0  # the steps of a method making one two-evaluation ODE step per sample
RECIPE_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class Suite:
    """One leaderboard table: a teacher, how it is measured, and the budget every method gets.

    ``teacher`` is ``"analytic"`` (the dataset's exact mixture) or ``"train"`` (``Teacher.cached(dataset,
    **teacher_args)``). Rows are ranked by the dataset's quality metric (``fd`` for digits, ``swd`` for 2-D sets,
    where the NLL of samples under the true density is shown beside it but cannot rank: a student that collapses
    onto the modes' centres scores better than real data). ``recipes`` names the recipes methods take their
    arguments from (``<recipes>-<method>.yaml`` in ``recipe_dir``, default fewstep's ``configs/``).
    ``student_backbone_args`` shape the student MLP where the teacher has no network to copy (an analytic
    teacher); a recipe's own entries are added to them."""

    name: str
    dataset: str
    teacher: str
    teacher_eval_budget: int
    max_seconds: float | None
    recipes: str
    recipe_dir: str | None = None
    teacher_args: dict = field(default_factory=dict)
    conditional: bool = False
    guidance_scale: float = 1.0
    guidance_convention: str = "cfg"
    nfe: tuple[int, ...] = (1, 2, 4)
    teacher_nfe: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    n_samples: int | None = None
    batch_size: int = 256
    lr: float = 1e-3
    student_backbone_args: dict = field(default_factory=dict)

    def recipe_path(self, method: str) -> Path:
        """Where ``method``'s recipe for this suite is (it may not exist)."""
        return Path(self.recipe_dir or RECIPE_DIR) / f"{self.recipes}-{method}.yaml"


TWO_D_STUDENT = {"width": 128, "depth": 3}
CHECKERBOARD_TEACHER = {"steps": 3000}  # a fixed recipe: the cached teacher is reused by every run


def _suites(scale: str) -> list[Suite]:
    """``quick``: the exact 8-mode ring and digits, small budgets (about a minute and a half per method with a
    cached digits teacher). ``full``: all five tables with larger budgets (about 9 minutes per method, plus the
    checkerboard and digits teachers' training, if they are not cached)."""
    quick = scale == "quick"
    teacher_nfe = (1, 2, 4, 8, 16) if quick else (1, 2, 4, 8, 16, 32, 64)
    two_d = {"teacher_nfe": teacher_nfe, "n_samples": 2000 if quick else 5000,
             "max_seconds": 45.0 if quick else 240.0, "lr": 1e-3, "student_backbone_args": TWO_D_STUDENT}
    two_d_budget = 200_000 if quick else 1_000_000
    digits = {"teacher": "train", "recipes": "digits", "conditional": True, "lr": 2e-4, "teacher_nfe": teacher_nfe,
              "teacher_eval_budget": 80_000 if quick else 150_000, "max_seconds": 90.0 if quick else 300.0}
    ring8 = Suite("ring8", "ring8", "analytic", two_d_budget, recipes="ring8", **two_d)
    if quick:
        return [ring8, Suite("digits", "digits", **digits)]
    return [
        ring8,
        Suite("grid25_imbalanced", "grid25_imbalanced", "analytic", two_d_budget, recipes="grid25_imbalanced",
              **two_d),
        Suite("checkerboard", "checkerboard", "train", two_d_budget, recipes="checkerboard",
              teacher_args=CHECKERBOARD_TEACHER, **two_d),
        Suite("digits", "digits", **digits),
        # a guided teacher evaluation costs two network calls: half the budget keeps the table's cost alike
        Suite("digits_cfg", "digits", guidance_scale=2.0, **{**digits, "teacher_eval_budget": 80_000,
                                                              "max_seconds": 150.0}),
    ]


SUITES: dict[str, list[Suite]] = {name: _suites(name) for name in SUITE_NAMES}
