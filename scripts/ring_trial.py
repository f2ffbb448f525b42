"""Train one method against the exact 8-mode ring teacher and print its 1-, 2- and 4-NFE readings.

Uses the exact-teacher harness of the tests (``tests/exact_ring.py``: a width-128, depth-3 MLP student, the ring's
training split or the method's own source, constant learning rate), so a reading here is what a longer version
of a method's exact-ring test would see::

    python scripts/ring_trial.py dmd2 3000 --args '{"fake_warmup": 100}'

prints modes covered, within-mode spread (1 is the data's), the share of samples inside a mode (the data's is
0.989), per-mode weight error (total variation) and excess NLL over the data's, beside the best training-free
solver's excess NLL at 2 and 4 NFE. The numbers behind docs/distribution.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from exact_ring import RING, best_training_free_excess_nll, distil_on_ring, draw, low_frequency_mlp, small_mlp
from fewstep.cache import cache_dir
from fewstep.data.sources import TeacherPairs, make_source
from fewstep.eval.toy import reference_nll, toy_metrics
from fewstep.methods import METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=sorted(METHODS))
    parser.add_argument("steps", type=int)
    parser.add_argument("--args", default="{}", help="method arguments as JSON")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr-schedule", default="constant", help="the trainer's lr_schedule, e.g. cosine")
    parser.add_argument("--low-frequency", action="store_true",
                        help="student time features at most 20 radians (the continuous-time recipes' student)")
    options = parser.parse_args()
    cls = METHODS[options.method]
    config = cls.Config(**json.loads(options.args))
    pairs = None
    if "teacher_pairs" in cls.needs:
        student = cls.build_student(RING.analytic, config, small_mlp, RING.sigma_data)
        request = cls(RING.analytic, student, config).pair_request()
        pairs = TeacherPairs(RING.analytic, request.num_pairs, cache_dir() / "pairs", request.solver, request.nfe,
                             progress=False)
    source = make_source(cls.needs, RING, pairs)
    started = time.perf_counter()
    backbone = low_frequency_mlp if options.low_frequency else small_mlp
    method, student = distil_on_ring(cls, config, options.steps, source=source, lr=options.lr, seed=options.seed,
                                     backbone=backbone, lr_schedule=options.lr_schedule)
    print(f"{options.method} {options.args} steps {options.steps} lr {options.lr} seed {options.seed}: "
          f"{time.perf_counter() - started:.0f} s, {method.teacher_evals:,} teacher evaluations")
    print(f"best training-free excess NLL: 2 NFE {best_training_free_excess_nll(2):.3f}, "
          f"4 NFE {best_training_free_excess_nll(4):.3f}")
    reference = reference_nll(RING)
    for nfe in (1, 2, 4):
        m = toy_metrics(draw(method, student, nfe), RING)
        print(f"{nfe} NFE: modes {m['modes_covered']}/8, spread {m['spread_ratio']:.3f}, in-mode "
              f"{m['in_mode_fraction']:.3f}, weight error {m['mode_balance']:.3f}, excess NLL "
              f"{m['nll'] - reference:.3f}")


if __name__ == "__main__":
    main()
