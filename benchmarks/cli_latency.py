"""Wall time of jcompress commands in fresh processes, against their latency goals.

    .venv/bin/python benchmarks/cli_latency.py [--repeats 3] [--before DIR]

Each command runs ``--repeats`` times in a new interpreter (what a user waits for:
imports, JAX start-up, compilation); the median wall time is printed beside its
goal, and after it the median CPU time (user + system) of the process, which a
busy machine inflates less: on an idle machine a command that computes on one
thread (imports, tracing) takes about its CPU time. Each
checkout measured gets a new, empty cache folder (``$JCOMPRESS_CACHE_DIR``), so
the first ``--help`` is timed apart: it fills the parser's cache
(``jcompress.cli_spec``). Then ``eval``, ``compress`` (one-shot pruning) and
``bench`` each run twice in a row, each command with a compilation cache of its
own that starts empty: the second run may load the programs the first compiled.
They run on a LeNet-300-100 trained for one epoch on the embedded MNIST sample
(without the compilation cache). ``--before DIR`` also times the checkout in DIR
(``git worktree add DIR HEAD``, or an unpacked ``git archive``), alternating
with this one command by command, so that both see the same machine load.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
ROWS = [(["--help"], 1.0), (["train", "--help"], 1.0), (["eval", "--help"], 1.0),
        (["summary", "--help"], 1.0), (["compress", "--help"], 2.0),
        (["summary", "--model", "lenet300", "--dataset", "mnist"], 3.0),
        (["summary", "--model", "microbotnet", "--dataset", "cifar10"], 3.0)]


def _cpu() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def timed(tree: pathlib.Path, args: list[str], repeats: int, env: dict
          ) -> tuple[float, float]:
  """The median wall and CPU seconds of ``jcompress ARGS`` of checkout ``tree`` over
  ``repeats`` fresh processes (nan, with the error's last line on stderr, if it
  fails)."""
  walls, cpus = [], []
  for _ in range(repeats):
    start, cpu = time.perf_counter(), _cpu()
    proc = subprocess.run([sys.executable, "-m", "jcompress.cli", *args], cwd=tree,
                          capture_output=True, text=True, env=dict(os.environ, **env))
    walls.append(time.perf_counter() - start)
    cpus.append(_cpu() - cpu)
    if proc.returncode:
      print(f"{tree}: jcompress {' '.join(args)} failed: "
            f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
      return math.nan, math.nan
  return statistics.median(walls), statistics.median(cpus)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--before", type=pathlib.Path, help="another checkout to time too")
  args = parser.parse_args()
  trees = ([args.before.resolve()] if args.before else []) + [REPO]
  names = ["before", "after"] if args.before else ["s"]
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    envs = [{"JCOMPRESS_CACHE_DIR": str(tmp / f"cache{i}")} for i in range(len(trees))]

    def row(label, runs, goal=""):
      """One line: ``runs(i)`` gives checkout i's seconds."""
      seconds = [runs(i) for i in range(len(trees))]
      print(f"{label:<56} " + " ".join(f"{w:7.2f} ({c:5.2f})" for w, c in seconds)
            + f" {goal:>11}", flush=True)
      return seconds

    print(f"{'command':<56} " + " ".join(f"{n + ' s (cpu)':>15}" for n in names)
          + f" {'goal s':>11}")
    row("jcompress --help (first run: empty caches)",
        lambda i: timed(trees[i], ["--help"], 1, envs[i]))
    for command, goal in ROWS:
      row(f"jcompress {' '.join(command)}",
          lambda i: timed(trees[i], command, args.repeats, envs[i]), f"{goal:.1f}")
    workdirs = [tmp / f"l300-{i}" for i in range(len(trees))]
    for i, tree in enumerate(trees):
      timed(tree, ["train", "--model", "lenet300", "--dataset", "mnist_sample", "--epochs",
                   "1", "--batch-size", "64", "--workdir", str(workdirs[i])], 1,
            envs[i] | {"JCOMPRESS_COMPILE_CACHE": "0"})
    again = {"eval": lambda i, n: ["eval", "--workdir", str(workdirs[i])],
             "compress": lambda i, n: ["compress", "--from", str(workdirs[i]), "--workdir",
                                       str(tmp / f"pruned-{i}-{n}"), "--method", "prune",
                                       "--sparsity", "0.9", "--epochs", "0"],
             "bench": lambda i, n: ["bench", "--workdir", str(tmp / f"pruned-{i}-1"),
                                    "--baseline", str(workdirs[i]), "--repeats", "3"]}
    for name, command in again.items():
      own = [env | {"JCOMPRESS_COMPILE_CACHE": str(tmp / f"xla-{name}-{i}")}
             for i, env in enumerate(envs)]
      runs = {}
      for n in (1, 2):
        runs[n] = [timed(tree, command(i, n), 1, own[i]) for i, tree in enumerate(trees)]
      row(f"jcompress {name} (first run, empty compilation cache)", lambda i: runs[1][i])
      row(f"jcompress {name} (second run)", lambda i: runs[2][i],
          " ".join(f"{a[0] / b[0]:.2f}x" for a, b in zip(runs[1], runs[2])))


if __name__ == "__main__":
  main()
