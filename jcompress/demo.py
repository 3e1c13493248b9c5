"""``jcompress demo``: the whole job on the embedded MNIST sample, offline, in about a minute.

Trains LeNet-300-100 on ``mnist_sample`` (2,000 training images), compresses the
trained model three ways, and stacks two of them, each with a short fine-tuning:
TTQ (Zhu et al. 2017) ternary weights, 90% magnitude pruning (Han et al. 2015),
4-bit quantization-aware training, and 4-bit codes on the pruned model (Deep
Compression's order). Each model is exported in packed form and the exported file
is evaluated, so every number in the table is what the file on disk holds and
does: accuracy on the 500 sample test images, params, nonzero MACs, file bytes,
the compression ratio against the exported float model, and the score
``log10(error x file bytes x nonzero MACs)`` (lower is better).

>>> [stage.name for stage in STAGES]
['TTQ (ternary)', 'prune 90%', 'QAT 4-bit', 'prune 90% + QAT 4-bit']
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable

from jcompress import cost, export, report, transforms
from jcompress.measure import load_exported, measure_loaded
from jcompress.train.compress import compress
from jcompress.train.loop import TrainConfig, load_workdir, train_and_evaluate

# The base run: Adam suits the 31 steps an epoch of the sample gives (the model's SGD
# recipe is for full MNIST).
TRAIN = {"batch_size": 64, "lr": 1e-3, "optimizer": "adam", "schedule": "cosine"}


@dataclasses.dataclass(frozen=True)
class Stage:
  """One compression of the demo: ``methods`` with ``options`` applied to the run
  ``source`` (``base`` or an earlier stage's ``workdir``), fine-tuned with ``train``."""
  name: str
  workdir: str
  source: str
  methods: tuple[str, ...]
  options: dict[str, Any]
  train: dict[str, Any]


_FINE_TUNE = {"batch_size": 64, "optimizer": "adam", "schedule": "cosine"}
STAGES = (
    Stage("TTQ (ternary)", "ttq", "base", ("ttq",),
          {"latent_lr": 1e-3, "scale_lr": 1e-3}, _FINE_TUNE | {"lr": 1e-3}),
    Stage("prune 90%", "prune", "base", ("prune",), {"sparsity": "0.9"},
          _FINE_TUNE | {"lr": 1e-2}),
    Stage("QAT 4-bit", "q4", "base", ("qat",), {"bits": 4, "granularity": "channel"},
          _FINE_TUNE | {"lr": 1e-4}),
    Stage("prune 90% + QAT 4-bit", "prune-q4", "prune", ("qat",),
          {"bits": 4, "granularity": "channel"}, _FINE_TUNE | {"lr": 1e-4}),
)
COLUMNS = ("Model", "Accuracy", "Params", "Nonzero MACs", "Exported bytes", "Ratio", "Score")
# README's measured pipeline (1.74% error, 35 KB exported) and TTQ as the MNIST study ran it.
FULL_MNIST = """\
# The same on full MNIST (60,000 images; $JCOMPRESS_DATA_DIR holds mnist/*-idx?-ubyte.gz):
jcompress train    --model lenet300 --dataset mnist --workdir runs/base   # its recipe: 20 epochs
jcompress compress --from runs/base --workdir runs/ttq --method ttq --epochs 4 \\
    --optimizer adam --lr 1e-4 --schedule cosine
jcompress compress --from runs/base --workdir runs/pruned --method prune \\
    --sparsity fc1=0.92,fc2=0.91,fc3=0.74 --epochs 10 --lr 0.01 --schedule cosine \\
    --weight-decay 1e-4
jcompress compress --from runs/pruned --workdir runs/small --method qat --bits 5 \\
    --granularity channel --select fc --epochs 2 --lr 0.001 --schedule cosine
jcompress export   --workdir runs/small --out lenet300.jcm
jcompress eval     --exported lenet300.jcm
jcompress summary  --workdir runs/small --pipeline   # each step's effect, one table"""


def run(workdir: str | os.PathLike, *, epochs: int = 8, fine_tune_epochs: int | None = None,
        log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Trains, compresses, fine-tunes, exports and evaluates (the module docstring).

  Args:
    workdir: the folder of the runs (``base`` and one per stage) and the exported
      ``*.jcm`` files; a rerun with the same settings resumes the finished runs.
    epochs: training epochs of the base model.
    fine_tune_epochs: epochs of each compression's fine-tuning (default: a quarter
      of ``epochs``, at least 1).
    log: where progress lines go.

  Returns:
    One row per model, the float baseline first: ``name``, ``file``, ``file_bytes``,
    ``ratio``, ``file_score`` (the score with the file's bytes) and
    ``measure_loaded``'s numbers of the exported file (``accuracy``, ``params``,
    ``nonzero_macs``, ...).

  Raises:
    ValueError: ``epochs`` below 1 or ``fine_tune_epochs`` below 0.
  """
  if epochs < 1:
    raise ValueError(f"--epochs must be at least 1, got {epochs}")
  if fine_tune_epochs is None:
    fine_tune_epochs = max(1, epochs // 4)
  if fine_tune_epochs < 0:
    raise ValueError(f"--fine-tune-epochs must be at least 0, got {fine_tune_epochs}")
  root = pathlib.Path(workdir)
  log(f"== LeNet-300-100 on the embedded MNIST sample: {epochs} epochs of Adam (lr 1e-3)")
  train_and_evaluate(TrainConfig(model="lenet300", dataset="mnist_sample", epochs=epochs,
                                 **TRAIN), root / "base", log=log)
  runs = [("float32 baseline", "base")]
  for stage in STAGES:
    log(f"== {stage.name}: {' + '.join(stage.methods)} of {stage.source}, "
        f"{fine_tune_epochs} epochs of fine-tuning")
    compress(root / stage.source, root / stage.workdir, list(stage.methods), stage.options,
             log=log, epochs=fine_tune_epochs, **stage.train)
    runs.append((stage.name, stage.workdir))
  rows = []
  for name, run_dir in runs:
    _, state, meta, _ = load_workdir(root / run_dir)
    path = root / f"{run_dir}.jcm"
    sizes = export.export(path, meta, transforms.plan_methods(meta["compression"]), state)
    result = measure_loaded(*load_exported(path), exported=True)
    rows.append(result | {"name": name, "file": str(path), "file_bytes": sizes["file_bytes"]})
  for row in rows:
    row["ratio"] = rows[0]["file_bytes"] / row["file_bytes"]
    row["file_score"] = (cost.score(row["error"], row["file_bytes"], row["nonzero_macs"])
                         if row["error"] > 0 else None)
  return rows


def table(rows: list[dict[str, Any]], fmt: str = "markdown") -> str:
  """The rows of :func:`run` as one table (``report.render`` formats)."""
  cells = [[r["name"], f"{r['accuracy']:.2%}", f"{r['params']:,}", f"{r['nonzero_macs']:,}",
            f"{r['file_bytes']:,}", f"{r['ratio']:.1f}x",
            "-" if r["file_score"] is None else f"{r['file_score']:.3f}"] for r in rows]
  return report.render(list(COLUMNS), cells, fmt)


def render(rows: list[dict[str, Any]]) -> str:
  """What ``jcompress demo`` prints at the end: the table, what its columns mean,
  and the commands that do the same on full MNIST."""
  return (table(rows) + "\n\nEvery row is the exported file, loaded and evaluated on the "
          "500 sample test images. Ratio: the float32 file's bytes over this file's; Score: "
          "log10(error x file bytes x nonzero MACs), lower is better.\n\n" + FULL_MNIST)
