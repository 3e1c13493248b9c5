"""Wall time of jcompress commands in fresh processes, against their latency goals.

    .venv/bin/python benchmarks/cli_latency.py [--repeats 3] [--workdir runs/l300]

Each command runs ``--repeats`` times in a new interpreter (what a user waits for:
imports, JAX start-up, compilation); the median is printed beside its goal. With
``--workdir`` (a trained LeNet-300-100 run; made in a temporary folder on the
embedded sample if not given) ``eval`` runs twice in a row: the second run may
reuse JAX's persistent compilation cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

JCOMPRESS = [sys.executable, "-m", "jcompress.cli"]


def timed(args: list[str], repeats: int, env: dict | None = None) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    proc = subprocess.run(JCOMPRESS + args, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))
    times.append(time.perf_counter() - start)
    if proc.returncode:
      raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr}")
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workdir", help="a trained lenet300 workdir (default: train one "
                      "on mnist_sample in a temporary folder)")
  args = parser.parse_args()
  rows = [(["--help"], 1.0), (["train", "--help"], 1.0), (["eval", "--help"], 1.0),
          (["summary", "--help"], 1.0), (["compress", "--help"], 2.0),
          (["summary", "--model", "lenet300", "--dataset", "mnist"], 3.0),
          (["summary", "--model", "microbotnet", "--dataset", "cifar10"], 3.0)]
  print(f"{'command':<56} {'median s':>9} {'goal s':>7}")
  for command, goal in rows:
    seconds = timed(command, args.repeats)
    print(f"jcompress {' '.join(command):<46} {seconds:9.2f} {goal:7.1f}"
          f"{'' if seconds <= goal else '  (over)'}")
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir
    if workdir is None:
      workdir = os.path.join(tmp, "l300")
      timed(["train", "--model", "lenet300", "--dataset", "mnist_sample", "--epochs", "1",
             "--batch-size", "64", "--workdir", workdir], 1)
    cache = {"JCOMPRESS_COMPILE_CACHE": os.path.join(tmp, "xla-cache")}
    first = timed(["eval", "--workdir", workdir], 1, cache)
    second = timed(["eval", "--workdir", workdir], 1, cache)
    print(f"{'jcompress eval --workdir (first, cold compile cache)':<56} {first:9.2f}")
    print(f"{'jcompress eval --workdir (second)':<56} {second:9.2f} "
          f"{'goal: 2x faster':>7} -> {first / second:.2f}x")


if __name__ == "__main__":
  main()
