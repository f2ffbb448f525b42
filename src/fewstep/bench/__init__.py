"""``fewstep bench``: every registered method on the same teachers and budget, one leaderboard
(``benchmarks/BENCHMARKS.md``). :mod:`.suites` says what is run, :mod:`.runner` runs it."""

from fewstep.bench.runner import run_bench, select_methods
from fewstep.bench.suites import SUITES, Suite

__all__ = ["SUITES", "Suite", "run_bench", "select_methods"]
