"""What a (compressed) checkpoint costs and how well it does: ``jcompress eval``'s numbers."""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Any

from jcompress import cost, data, execution, export, transforms
from jcompress.train.loop import evaluate, load_workdir


def costs(model, state, method, input_shape, meta: dict | None = None,
          error: float | None = None, pj_per_mac: float = 1.0) -> tuple[cost.Summary, dict]:
  """The cost summary of ``state``'s (compressed) model and its headline numbers.

  Args:
    model, state, method: as ``load_workdir`` returns them.
    input_shape: one example's shape.
    meta: the checkpoint's metadata; with it, ``exported_bytes`` (the payload
      ``jcompress export`` writes) is measured by exporting to a temporary file.
    error: the test error; with it (and above 0) seed 000's ``score``.
    pj_per_mac: energy per nonzero MAC in picojoules.

  Returns:
    ``(summary, totals)``: totals holds params, macs, nonzero_macs, bytes,
    sparsity, energy_uj (and exported_bytes, score).
  """
  variables = {"params": method.apply(state.params, state.cstate)}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  summary = cost.summarize(model, variables, input_shape,
                           bits=method.bits(state.params, state.cstate) or None)
  summary = execution.factorized_costs(summary, state.params)  # what Tucker layers run
  totals = {"params": summary.params, "macs": summary.macs,
            "nonzero_macs": summary.nonzero_macs, "bytes": summary.bytes,
            "sparsity": summary.sparsity,
            "energy_uj": cost.energy_uj(summary.nonzero_macs, pj_per_mac)}
  if meta is not None and meta.get("compression") is not None:
    with tempfile.TemporaryDirectory() as tmp:
      totals["exported_bytes"] = export.export(
          pathlib.Path(tmp) / "m", meta, transforms.plan_methods(meta["compression"]),
          state)["param_bytes"]
  if error:  # seed 000's score is log10(error * bytes * mults): undefined at 0 error
    totals["score"] = cost.score(error, summary.bytes, summary.nonzero_macs)
  return summary, totals


def measure_loaded(model, state, meta: dict, method, *, data_dir: str | None = None,
                   batch_size: int = 1000, execution_name: str = "float",
                   exported: bool = False) -> dict[str, Any]:
  """Test accuracy, error, loss and costs of a loaded model (``load_workdir``'s
  tuple): the JSON of ``jcompress eval --json``.

  Args:
    model, state, meta, method: the loaded model.
    data_dir: offline dataset folder.
    batch_size: evaluation batch size.
    execution_name: how the compressed model runs (``execution.names()``).
    exported: the model was read from an exported file: it holds decompressed
      tensors, so it runs ``float`` and has no plan to export again.

  Raises:
    ValueError: a bad ``batch_size`` or execution (the message names the option).
  """
  if batch_size < 1:
    raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
  plan = [] if exported else transforms.plan_methods(meta.get("compression") or [])
  run = execution.get(execution_name, plan, state.params, state.cstate)
  ds = data.load(meta["dataset"], data_dir)
  result = evaluate(model, state, ds.test_images, ds.test_labels, data.spec(meta["dataset"]),
                    batch_size, method, run)
  _, totals = costs(model, state, method, tuple(meta["input_shape"]),
                    None if exported else meta, 1 - result["accuracy"])
  return {"model": meta["model"], "dataset": meta["dataset"], "epoch": meta["epoch"],
          "execution": execution_name, "accuracy": result["accuracy"],
          "error": 1 - result["accuracy"], "loss": result["loss"]} | totals


def measure(workdir: str | os.PathLike, checkpoint: str | int = "latest", **options: Any
            ) -> dict[str, Any]:
  """:func:`measure_loaded` of a workdir's checkpoint; ``options``: its keywords."""
  return measure_loaded(*load_workdir(workdir, checkpoint), **options)
