"""Steps/s of the digits teacher's training alone, beside a busy Python loop, and beside a second identical run.

Each setting is a label and environment variables for the runs, e.g.::

    python scripts/cpu_share.py --setting today PYTHONPATH=/path/to/old/src --setting auto \
        --setting one-thread FEWSTEP_THREADS=1 --setting passive OMP_WAIT_POLICY=PASSIVE

prints one row per setting: steps/s and the threads in use at the end (the pair's two runs both use the setting;
the second starts 4 s after the first, so the first also runs alone for a while).
The numbers behind docs/scaling.md, "Sharing the CPU".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

RUN = """
import sys, time
import fewstep, torch
dataset = fewstep.load_dataset("digits")
start = time.perf_counter()
fewstep.Teacher.train(dataset, steps={steps}, progress=False)
print(f"{{{steps} / (time.perf_counter() - start):.2f}} {{torch.get_num_threads()}}")
"""


def train_rate(env: dict[str, str], steps: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN.format(steps=steps)], env=env, stdout=subprocess.PIPE,
                            text=True)


def result(process: subprocess.Popen) -> str:
    out, _ = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"a training run failed with exit status {process.returncode}")
    rate, threads = out.split()
    return f"{rate} ({threads}t)"


def measure(env: dict[str, str], steps: int) -> dict[str, str]:
    alone = sorted((result(train_rate(env, steps)) for _ in range(3)), key=lambda text: float(text.split()[0]))
    row = {"alone (median of 3)": alone[1]}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1)
        row["busy loop"] = result(train_rate(env, steps))
    finally:
        busy.kill()
        busy.wait()
    first = train_rate(env, steps)
    time.sleep(4)
    second = train_rate(env, steps)
    row["pair (second run)"] = result(second)
    row["pair (first run)"] = result(first)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", nargs="+", action="append", metavar=("LABEL", "NAME=VALUE"), required=True)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        rows = {}
        for label, *assignments in args.setting:
            env = {**os.environ, "FEWSTEP_CACHE": cache, **dict(item.split("=", 1) for item in assignments)}
            rows[label] = measure(env, args.steps)
            print(label, rows[label], file=sys.stderr, flush=True)
    columns = list(next(iter(rows.values())))
    print("| setting | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for label, row in rows.items():
        print(f"| {label} | " + " | ".join(row[column] for column in columns) + " |")


if __name__ == "__main__":
    main()
