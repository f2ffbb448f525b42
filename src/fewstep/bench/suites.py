"""Benchmark suites: which teachers every method is distilled from, and the equal budget each method gets.

A :class:`Suite` is one table of ``BENCHMARKS.md``. Every method in a suite gets the same number of *teacher
evaluations* (one denoiser call on one sample counts one, whether or not the call is guided), converted to
training steps per method from what the method spends per step (CD and PD each make two teacher calls per
training sample: CD one Heun step, PD two DDIM steps). Teacher-free methods (consistency training: CT, iCT,
ECT, sCT) learn from data alone; they get the training steps of a method spending
:data:`TEACHER_FREE_EVALS_PER_SAMPLE` = 2 evaluations per sample, i.e. as many steps and batches as CD.
``max_seconds`` caps each cell's training wall time; a capped cell reports the teacher evaluations it
actually used. A method whose schedule spans the run (a curriculum, stages) has it fitted to the cell's
steps through its ``total_steps`` config field (see :func:`fewstep.build_method`).

Per-method choices, the same in every suite except where a bullet names the tables:

* CD: the method's defaults (18 Karras scales, target EMA 0.95, pseudo-Huber distance); every other method
  its defaults too, except what :data:`BENCH_METHOD_ARGS` sets.
* Staged methods (Hyper-SD, ECT): ``steps_per_stage`` splits the cell's steps into their stages
  (:data:`SCHEDULE_RULES`); curricula (CT, iCT) span the run through ``total_steps``; sCT, sCD and rCM
  warm their tangent up over a share of the cell's steps (the same table), and rCM's DMD term starts
  after it.
* sCT, sCD and rCM on the analytic 2-D teachers (ring, imbalanced grid), whose students are new networks: the
  ring recipes' student, with time features of at most 20 radians per unit of ``c_noise`` (sCM's "no large
  Fourier scales"), and for sCD the recipe's tangent normalisation ``c = 0.01`` (a 2-D tangent's norm, about
  0.3, is not large next to the paper's 0.1). Students of trained teachers copy the teacher's network, so they
  keep its time features.
* PD: ``start_steps`` 32 (quick) or 64 (full), ``final_steps`` 4, and the training steps split evenly over
  the halving rounds (``steps_per_round = steps // rounds``). Its 1- and 2-NFE cells use the 4-step student
  on the coarser nested grids, with no training for them: going below 4 steps would cost PD more rounds
  from the same budget, so the table shows what the budget buys at 4 and what it gives at fewer steps.

Trained teachers come from the cache (:meth:`fewstep.Teacher.cached`), with fixed recipes: the digits
teacher uses the default arguments, so it is the one ``fewstep demo`` trains and reuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SUITE_NAMES = ("quick", "full")


@dataclass
class Suite:
    """One leaderboard table: a teacher, how it is measured, and the budget every method gets.

    ``teacher`` is ``"analytic"`` (the dataset's exact mixture) or ``"train"`` (``Teacher.cached(dataset,
    **teacher_args)``). ``quality`` is the metric that ranks rows (lower is better): ``"fd"`` (FD-digits) for
    digits, ``"swd"`` (sliced Wasserstein) for 2-D sets, where the NLL of samples under the true density is
    shown beside it but cannot rank (a student that collapses onto the modes' centres scores better than
    real data). ``student_backbone_args`` shape the student MLP where the teacher has no network to copy (an
    analytic teacher); students of trained teachers start from the teacher's network. ``method_student_args``
    adds per-method entries to them (:func:`student_backbone_args`). ``method_args`` holds per-method
    arguments; PD's ``steps_per_round`` is added from the budget by :func:`method_args`."""

    name: str
    dataset: str
    teacher: str
    teacher_eval_budget: int
    quality: str
    max_seconds: float
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
    method_student_args: dict[str, dict] = field(default_factory=dict)
    method_args: dict[str, dict] = field(default_factory=dict)


TEACHER_FREE_EVALS_PER_SAMPLE = 2.0


# Rules that fit a method's schedule to a cell's steps (they are part of the cell's key, so changing one
# re-measures exactly that method's cells). ``stages_per_run``: the staged methods split the cell's steps into
# this many stages of ``steps_per_stage`` (Hyper-SD's 8 -> 4 -> 2 segment stages plus the final 1-segment
# stage; ECT's shrinking-gap stages, the recipe's 8 of 250 steps in 2000). ``warmup_share``: the methods with a
# tangent warm-up take this share of the cell's steps for it (``tangent_warmup``; rCM's DMD term starts when
# it ends), the recipes' 300 of 3000 (ring) and 200 of 2000 (digits) steps.
SCHEDULE_RULES = {"hyper_sd": {"stages_per_run": 4}, "ect": {"stages_per_run": 8},
                  **{name: {"warmup_share": 0.1} for name in ("sct", "scd", "rcm")}}


def steps_for_budget(budget: int, teacher_evals_per_sample: float, batch_size: int) -> int:
    """Training steps that spend ``budget`` teacher evaluations at ``teacher_evals_per_sample`` per training
    sample and step (at least one step)."""
    if teacher_evals_per_sample <= 0:
        raise ValueError(f"teacher evaluations per sample must be positive, got {teacher_evals_per_sample}")
    return max(1, int(budget // (teacher_evals_per_sample * batch_size)))


def method_args(suite: Suite, method: str, steps: int) -> dict:
    """The arguments of ``method`` in a cell of ``suite`` trained for ``steps`` steps."""
    args = dict(suite.method_args.get(method, {}))
    if method == "pd":
        rounds = (args["start_steps"] // args["final_steps"]).bit_length() - 1  # halvings to final_steps
        args["steps_per_round"] = max(1, steps // rounds)
    rules = SCHEDULE_RULES.get(method, {})
    if "stages_per_run" in rules:
        args.setdefault("steps_per_stage", max(1, steps // rules["stages_per_run"]))
    if "warmup_share" in rules:  # warm-ups are a share of the cell, not the defaults' 1000 steps
        args.setdefault("tangent_warmup", max(1, int(steps * rules["warmup_share"])))
    return args


def student_backbone_args(suite: Suite, method: str) -> dict:
    """The backbone arguments of ``method``'s student in ``suite`` when the teacher has no network to copy."""
    return {**suite.student_backbone_args, **suite.method_student_args.get(method, {})}


TWO_D_STUDENT = {"width": 128, "depth": 3}
# The continuous-time methods' new students on 2-D data, as in their ring recipes (configs/ring8-sct.yaml, ...).
CONTINUOUS_TIME_STUDENTS = {name: {"time_frequencies": [0.1, 20.0]} for name in ("sct", "scd", "rcm")}
# sCD's tangent normalisation on both analytic 2-D tables (|g| is small there, as on the ring); on the ring also
# the recipes' training noise, log sigma ~ N(-0.5, 1.6^2). The grid keeps the default noise: with the ring's
# its sCD fell from 17 to 2 of 25 modes at 2 NFE (sCT from 6 to 1), since the grid's data spread is wider.
ANALYTIC_TWO_D_ARGS = {"scd": {"tangent_norm_c": 0.01}}
RING_NOISE = {"p_mean": -0.5, "p_std": 1.6}
RING_ARGS = {"sct": RING_NOISE, "rcm": RING_NOISE, "scd": {**RING_NOISE, "tangent_norm_c": 0.01}}
CHECKERBOARD_TEACHER = {"steps": 3000}  # a fixed recipe: the cached teacher is reused by every run


# Per-method arguments, the same in every suite: sCT/sCD/rCM take finite-difference JVPs (forward-mode AD
# through the MLPs costs about three times as much on a CPU; the two agree, see tests/test_jvp.py).
BENCH_METHOD_ARGS = {name: {"jvp": "finite_difference"} for name in ("sct", "scd", "rcm")}


def _with(method_args: dict[str, dict], extra: dict[str, dict]) -> dict[str, dict]:
    """``method_args`` with each method's ``extra`` arguments added."""
    return {**method_args, **{name: {**method_args.get(name, {}), **args} for name, args in extra.items()}}


def _suites(scale: str) -> list[Suite]:
    """``quick``: the exact 8-mode ring and digits, small budgets (under 20 minutes with a cached digits
    teacher). ``full``: all five tables with larger budgets (about 2 hours plus the checkerboard and digits
    teachers' training, if they are not cached)."""
    quick = scale == "quick"
    method_args = {**BENCH_METHOD_ARGS, "pd": {"start_steps": 32 if quick else 64, "final_steps": 4}}
    teacher_nfe = (1, 2, 4, 8, 16) if quick else (1, 2, 4, 8, 16, 32, 64)
    two_d = {"teacher_nfe": teacher_nfe, "n_samples": 2000 if quick else 5000,
             "max_seconds": 45.0 if quick else 240.0, "lr": 1e-3, "student_backbone_args": TWO_D_STUDENT,
             "method_args": method_args}
    two_d_budget = 200_000 if quick else 1_000_000
    analytic_two_d = {**two_d, "method_student_args": CONTINUOUS_TIME_STUDENTS,
                      "method_args": _with(method_args, ANALYTIC_TWO_D_ARGS)}
    digits = {"teacher": "train", "quality": "fd", "conditional": True, "lr": 2e-4, "method_args": method_args,
              "teacher_nfe": teacher_nfe, "teacher_eval_budget": 80_000 if quick else 150_000,
              "max_seconds": 90.0 if quick else 300.0}
    ring8 = Suite("ring8", "ring8", "analytic", two_d_budget, "swd",
                  **{**analytic_two_d, "method_args": _with(method_args, RING_ARGS)})
    if quick:
        return [ring8, Suite("digits", "digits", **digits)]
    return [
        ring8,
        Suite("grid25_imbalanced", "grid25_imbalanced", "analytic", two_d_budget, "swd", **analytic_two_d),
        Suite("checkerboard", "checkerboard", "train", two_d_budget, "swd", teacher_args=CHECKERBOARD_TEACHER,
              **two_d),
        Suite("digits", "digits", **digits),
        # a guided teacher evaluation costs two network calls: half the budget keeps the table's cost alike
        Suite("digits_cfg", "digits", guidance_scale=2.0, **{**digits, "teacher_eval_budget": 80_000,
                                                              "max_seconds": 150.0}),
    ]


SUITES: dict[str, list[Suite]] = {name: _suites(name) for name in SUITE_NAMES}
