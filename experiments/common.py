"""Shared plumbing of the experiment scripts: options, cached runs, result files.

Every study is one script whose docstring holds its exact command. Runs (trained
and compressed workdirs) go under ``--runs`` and are reused when complete, so a
study can be stopped and restarted, and studies share their baselines. Results go
to ``--out`` (default ``results/<study>/``): for each table a JSON file with every
number, a markdown and a LaTeX table; PNG plots; and ``README.md`` gathering the
tables with the command, the machine and the wall time.

``--smoke`` shrinks everything (one epoch on at most 512 training images, the
embedded MNIST sample for MNIST, tiny budgets) so the whole study runs in seconds:
the tests run every study that way. Tables, notes and run names then give the
budgets that ran (:meth:`Study.budget`, :meth:`Study.epochs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import shlex
import sys
import time
from typing import Any, Callable, Sequence

import jax

from jcompress import report
from jcompress.measure import measure
from jcompress.train.compress import compress, distill_step
from jcompress.train.loop import TrainConfig, train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMOKE_DATASETS = {"mnist": "mnist_sample", "fashion_mnist": "mnist_sample"}
SMOKE_TRAIN_SIZE = 512
_DATASET_NAMES = {"mnist_sample": "the embedded MNIST sample", "cifar10": "CIFAR-10",
                  "moving_mnist": "moving MNIST"}


def positive(text: str) -> int:
  """argparse type of a count option (epochs, clips, repeats): an integer >= 1, so a
  bad value is reported under the study's option name, not a library one."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
  return value


def fraction(text: str) -> float:
  """argparse type of a fraction option (a MAC budget, a student's width): 0 < v <= 1."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
  if not 0 < value <= 1:
    raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
  return value


@dataclasses.dataclass(frozen=True)
class Column:
  """A table column: the row key, its header, and how a value is written."""
  key: str
  header: str
  fmt: Callable[[Any], str] = str


def error(v: float) -> str:
  return f"{100 * v:.2f}%"


def score(v: float | None) -> str:
  return "-" if v is None else f"{int(10000 * v) / 10000}"


SEED000_COLUMNS = (Column("name", "Model"), Column("error", "Error", error),
                   Column("nonzero_macs", "Mults", report.thousands),
                   Column("params", "Params", report.thousands),
                   Column("exported_bytes", "Bytesize", report.byte_size),
                   Column("score", "Score", score), Column("baseline", "Baseline", score))


class Study:
  """One study's options, runs and outputs.

  Args:
    name: the study (``results/<name>/``).
    doc: the script's docstring (the ``--help`` text).
    argv: command-line arguments (default ``sys.argv[1:]``).
    add_options: adds the study's own options to its parser.
    parts: the study's parts, chosen with ``--parts`` (``self.parts``).
    default_parts: the parts run by default (all of them).
    datasets: the datasets its smoke run trains on (``--smoke``'s help names them).
  """

  def __init__(self, name: str, doc: str, argv: Sequence[str] | None = None,
               add_options: Callable[[argparse.ArgumentParser], None] | None = None,
               parts: Sequence[str] = (), default_parts: Sequence[str] | None = None,
               datasets: Sequence[str] = ("mnist",)):
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    smoke_data = " and ".join(dict.fromkeys(
        _DATASET_NAMES.get(d, d) for d in (SMOKE_DATASETS.get(d, d) for d in datasets)))
    p.add_argument("--smoke", action="store_true",
                   help=f"seconds-long run: 1 epoch on at most {SMOKE_TRAIN_SIZE} training "
                   f"images of {smoke_data}, tiny budgets")
    p.add_argument("--runs", default=str(ROOT / "runs"),
                   help="folder of the trained and compressed workdirs, reused when "
                   "complete (default: runs/ in the repository)")
    p.add_argument("--out", help=f"results folder (default: results/{name}/)")
    p.add_argument("--data-dir", help="offline dataset folder (default: $JCOMPRESS_DATA_DIR, "
                   "then tfds)")
    if parts:
      default = ",".join(default_parts or parts)
      p.add_argument("--parts", default=default, help="comma-separated parts to run, of: "
                     f"{', '.join(parts)} (default {default})")
    if add_options:
      add_options(p)
    self.args = p.parse_args(argv)
    self.parts = [x for x in self.args.parts.split(",") if x] if parts else []
    unknown = sorted(set(self.parts) - set(parts))
    if unknown:
      p.error(f"--parts: unknown {', '.join(unknown)}; valid: {', '.join(parts)}")
    self.name = name
    self.smoke = self.args.smoke
    self.runs = pathlib.Path(self.args.runs) / ("smoke" if self.smoke else "")
    self.out = pathlib.Path(self.args.out or ROOT / "results" / name)
    self.out.mkdir(parents=True, exist_ok=True)
    self.command = " ".join(["python", f"experiments/{pathlib.Path(sys.argv[0]).name}"]
                            + [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])])
    self.written: list[str] = []
    self.started = time.perf_counter()

  def pick(self, values: Sequence[Any], smoke: Sequence[Any] | None = None) -> tuple:
    """``values``, or in a smoke run ``smoke`` (default: the first of ``values``)."""
    return tuple(values if not self.smoke else values[:1] if smoke is None else smoke)

  def dataset(self, name: str) -> str:
    return SMOKE_DATASETS.get(name, name) if self.smoke else name

  def budget(self, train: dict) -> dict:
    """Training options as they run: ``train``, or in a smoke run at most 1 epoch on
    at most ``SMOKE_TRAIN_SIZE`` images."""
    if not self.smoke:
      return train
    return train | {"epochs": min(train.get("epochs", 1), 1),
                    "train_size": min(train.get("train_size") or SMOKE_TRAIN_SIZE,
                                      SMOKE_TRAIN_SIZE)}

  def epochs(self, n: int) -> int:
    """The epochs a run of ``n`` epochs trains here (1 at most in a smoke run): what
    run names, row names and notes give."""
    return self.budget({"epochs": n})["epochs"]

  def train(self, model: str, dataset: str, tag: str = "", *,
            distill: dict[str, Any] | None = None, **train: Any) -> pathlib.Path:
    """A trained workdir ``<runs>/<dataset>/<model><tag>`` (reused when complete);
    with ``distill`` (``--method distill``'s options, ``teacher`` among them) the
    model trains as the teacher's student."""
    dataset = self.dataset(dataset)
    workdir = self.runs / dataset / f"{model}{tag}"
    train = self.budget(train)
    config = TrainConfig(model=model, dataset=dataset, data_dir=self.args.data_dir, **train)
    if distill:
      config.compression = [distill_step(config, distill)]
    train_and_evaluate(config, workdir, log=self._log(workdir))
    return workdir

  def compress(self, source: pathlib.Path, tag: str, method: str | Sequence[str],
               options: dict[str, Any] | None = None, **kwargs: Any) -> pathlib.Path:
    """``source`` compressed by ``method`` (or several in order) into
    ``<source>+<tag>`` (reused when complete).

    ``kwargs``: ``select``/``min_size``/``keep_ends`` and fine-tuning options.
    """
    workdir = source.parent / f"{source.name}+{tag}"
    fine_tune = {k: v for k, v in kwargs.items() if k not in ("select", "min_size", "keep_ends")}
    fine_tune = self.budget(fine_tune) if fine_tune.get("epochs") else fine_tune
    compress(source, workdir, method, options, data_dir=self.args.data_dir,
             log=self._log(workdir), **{k: kwargs[k] for k in ("select", "min_size", "keep_ends")
                                        if k in kwargs}, **fine_tune)
    return workdir

  def measure(self, workdir: pathlib.Path) -> dict[str, Any]:
    """``jcompress eval --json``'s numbers, plus the fine-tuning epochs and wall time."""
    result = measure(workdir, data_dir=self.args.data_dir)
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l]
    result["train_seconds"] = sum(r.get("epoch_seconds", 0.0) for r in lines)
    return result

  def _log(self, workdir: pathlib.Path) -> Callable[[str], None]:
    return lambda line: print(f"[{workdir.relative_to(self.runs)}] {line}", flush=True)

  def table(self, name: str, title: str, columns: Sequence[Column], rows: list[dict],
            note: str = "") -> str:
    """Writes ``<name>.json`` (every number of every row), ``.md`` and ``.tex``;
    returns the markdown table."""
    header = [c.header for c in columns]
    cells = [[c.fmt(row.get(c.key)) for c in columns] for row in rows]
    (self.out / f"{name}.json").write_text(json.dumps(
        {"title": title, "note": note, "command": self.command, "smoke": self.smoke,
         "rows": rows}, indent=2, default=float) + "\n")
    markdown = report.render(header, cells, "markdown")
    (self.out / f"{name}.md").write_text(f"{title}\n\n{markdown}\n")
    (self.out / f"{name}.tex").write_text(report.render(header, cells, "latex") + "\n")
    self.written.append(name)
    print(f"\n{title}\n{report.render(header, cells, 'text')}\n", flush=True)
    return markdown

  def finish(self) -> None:
    """Writes ``README.md``: the machine, and every table in ``--out`` (this run's and
    earlier runs' of other parts) with the command and wall time that produced it."""
    wall = time.perf_counter() - self.started
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} on "
               f"{jax.default_backend()}")
    for name in self.written:
      record = json.loads((self.out / f"{name}.json").read_text())
      record["wall_seconds"] = wall
      (self.out / f"{name}.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    parts = [f"# {self.name}", "", f"Machine: {machine}."]
    for path in sorted(self.out.glob("*.json")):
      record = json.loads(path.read_text())
      smoke = " (smoke run: numbers are meaningless)" if record["smoke"] else ""
      parts += ["", f"## {record['title']}", "", f"`{record['command']}`: "
                f"{record.get('wall_seconds', 0):.0f} s for the whole command{smoke}."
                + (f" {record['note']}." if record["note"] else ""), "",
                (self.out / f"{path.stem}.md").read_text().split("\n\n", 1)[1].rstrip()]
    parts += [""] + [f"![{p.stem}]({p.name})" for p in sorted(self.out.glob("*.png"))]
    (self.out / "README.md").write_text("\n".join(parts) + "\n")
    print(f"{self.name}: results in {self.out} ({wall:.0f} s)")
