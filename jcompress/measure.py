"""What a (compressed) checkpoint costs and how well it does: ``jcompress eval``'s numbers."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import tempfile
from typing import Any

import jax

from jcompress import cost, data, execution, export, models, report, transforms
from jcompress.train.loop import evaluate, load_workdir
from jcompress.train.state import TrainState
from jcompress.transforms import select

_LOG = logging.getLogger(__name__)


def compressed_summary(model, method: transforms.Method, trainable, cstate, batch_stats,
                       input_shape) -> cost.Summary:
  """``cost.summarize`` of what ``method``'s compressed model stores and runs: its
  bits per weight, and each method's ``costs`` hook (Tucker's factor sequence)."""
  variables = {"params": method.apply(trainable, cstate)}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  summary = cost.summarize(model, variables, input_shape,
                           bits=transforms.bits_of(method, trainable, cstate) or None)
  return summary if method.costs is None else method.costs(summary, trainable, cstate)


def costs(model, state, method, input_shape, meta: dict | None = None,
          error: float | None = None, pj_per_mac: float = 1.0) -> tuple[cost.Summary, dict]:
  """The cost summary of ``state``'s (compressed) model and its headline numbers.

  Args:
    model, state, method: as ``load_workdir`` returns them.
    input_shape: one example's shape.
    meta: the checkpoint's metadata; with it, ``exported_bytes`` (the payload
      ``jcompress export`` writes) is measured by exporting to a temporary file,
      or read from the tensors of an exported file's header.
    error: the test error; with it (and above 0) the ``score``
      log10(error x bytes x mults).
    pj_per_mac: energy per nonzero MAC in picojoules.

  Returns:
    ``(summary, totals)``: totals holds params, macs, nonzero_macs, bytes,
    sparsity, energy_uj (and exported_bytes, score).
  """
  summary = compressed_summary(model, method, state.params, state.cstate, state.batch_stats,
                               input_shape)
  totals = {"params": summary.params, "macs": summary.macs,
            "nonzero_macs": summary.nonzero_macs, "bytes": summary.bytes,
            "sparsity": summary.sparsity,
            "energy_uj": cost.energy_uj(summary.nonzero_macs, pj_per_mac)}
  if meta is not None and "tensors" in meta:  # an exported file: its own params' payload
    totals["exported_bytes"] = sum(e["length"] for e in meta["tensors"]
                                   if e["collection"] == "params")
  elif meta is not None and meta.get("compression") is not None:
    with tempfile.TemporaryDirectory() as tmp:
      totals["exported_bytes"] = export.export(
          pathlib.Path(tmp) / "m", meta, transforms.plan_methods(meta["compression"]),
          state)["param_bytes"]
  if error:  # the score log10(error * bytes * mults) is undefined at 0 error
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
    exported: the model was read from an exported file (:func:`load_exported`):
      it holds decompressed tensors, so it runs ``float``; its bytes are counted at
      the bits the file records and ``exported_bytes`` is the file's own payload.

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
  _, totals = costs(model, state, method, tuple(meta["input_shape"]), meta,
                    1 - result["accuracy"])
  return {"model": meta["model"], "dataset": meta["dataset"], "epoch": meta["epoch"],
          "execution": execution_name, "accuracy": result["accuracy"],
          "error": 1 - result["accuracy"], "loss": result["loss"]} | totals


def measure(workdir: str | os.PathLike, checkpoint: str | int = "latest", **options: Any
            ) -> dict[str, Any]:
  """:func:`measure_loaded` of a workdir's checkpoint; ``options``: its keywords."""
  return measure_loaded(*load_workdir(workdir, checkpoint), **options)


def lineage(workdir: str | os.PathLike) -> list[pathlib.Path]:
  """``workdir`` and the runs it was compressed or continued from (each run's
  ``--from`` / ``--init-from``), the first trained one first."""
  chain = [pathlib.Path(workdir)]
  while True:
    config = chain[-1] / "config.json"
    if not config.exists():
      raise FileNotFoundError(f"{chain[-1]} has no config.json: not a jcompress run folder")
    source = json.loads(config.read_text())["train_config"].get("init_from")
    if not source:
      return chain[::-1]
    if pathlib.Path(source) in chain:
      raise ValueError(f"{source}: its runs were compressed from each other in a cycle")
    chain.append(pathlib.Path(source))


def pipeline(workdir: str | os.PathLike, **options: Any) -> list[dict[str, Any]]:
  """One :func:`measure` row per run of ``workdir``'s :func:`lineage`, each with
  ``stage`` (the plan steps it added, ``+``-joined; ``baseline`` for the first,
  ``continued`` for training continued without a new step), ``workdir``,
  ``epochs`` (of that run) and ``delta_error`` (against the first run)."""
  rows, done = [], 0
  for run in lineage(workdir):
    row = measure(run, **options)
    plan = json.loads((run / "config.json").read_text())["compression"]
    added = [step["method"] for step in plan[done:]]
    done = len(plan)
    rows.append(row | {"workdir": str(run), "delta_error": row["error"] - (
        rows[0]["error"] if rows else row["error"]),
        "stage": " + ".join(added) or ("continued" if rows else "baseline")})
  return rows


PIPELINE_COLUMNS = (("stage", "Stage", str), ("workdir", "Run", str),
                    ("error", "Error", lambda v: f"{100 * v:.2f}%"),
                    ("delta_error", "vs first", lambda v: f"{100 * v:+.2f} pt"),
                    ("params", "Params", "{:,}".format),
                    ("nonzero_macs", "Nonzero MACs", "{:,}".format),
                    ("bytes", "Bytes", lambda v: f"{v:,.0f}"),
                    ("exported_bytes", "Exported", "{:,}".format),
                    ("score", "Score", lambda v: f"{v:.3f}"))


def pipeline_table(rows: list[dict[str, Any]], fmt: str = "text") -> str:
  """The rows of :func:`pipeline` as one table (``report.render`` formats)."""
  cells = [[fmt_(row[key]) if row.get(key) is not None else "-"
            for key, _, fmt_ in PIPELINE_COLUMNS] for row in rows]
  return report.render([header for _, header, _ in PIPELINE_COLUMNS], cells, fmt)


def load_exported(path: str | os.PathLike):
  """``(model, state, meta, method)`` of an exported file, as ``load_workdir`` gives
  them: the model rebuilt from the header, every tensor checked against it before
  anything is decoded (``eval --exported``). ``meta`` is the header (its
  ``tensors`` included); ``method`` runs the decoded tensors as they are and counts
  them at the bits the file records (``export.header_bits``).

  Raises:
    ValueError: the file does not name a known model and dataset, its input
      shape or classes are not the dataset's, or its tensors do not fit the model.
  """
  header, _ = export.read_header(path)
  missing = [k for k in ("model", "model_config", "num_classes", "input_shape", "dataset")
             if k not in header]
  if missing:
    raise ValueError(f"{path} does not say which model it holds (no {', '.join(missing)}): "
                     "load it in Python with jcompress.export.load and your own model")
  if header["model"] not in models.names():
    raise ValueError(f"{path} holds model {header['model']!r}, not one of "
                     f"{', '.join(models.names())}")
  if not isinstance(header["model_config"], dict):
    raise ValueError(f"{path}: model_config must be an object, got {header['model_config']!r}")
  if not (isinstance(header["num_classes"], int) and header["num_classes"] >= 1):
    raise ValueError(f"{path}: num_classes must be a positive integer, got "
                     f"{header['num_classes']!r}")
  try:
    data.check_name(header["dataset"])
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  spec = data.spec(header["dataset"])
  if header["input_shape"] != list(spec.image_shape):
    raise ValueError(f"{path}: input_shape {header['input_shape']!r} is not "
                     f"{header['dataset']}'s {list(spec.image_shape)}")
  if header["num_classes"] != spec.num_classes:
    raise ValueError(f"{path}: num_classes {header['num_classes']} is not "
                     f"{header['dataset']}'s {spec.num_classes}")
  try:
    model = models.create(header["model"], num_classes=header["num_classes"],
                          input_shape=spec.image_shape, **header["model_config"])
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jax.numpy.zeros((1, *spec.image_shape)), train=False))
  except (TypeError, ValueError) as e:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(f"{path}: model {header['model']!r} cannot be built from model_config "
                     f"{header['model_config']!r}: {reason}") from None
  expected = {c: {p: tuple(v.shape) for p, v in select.flatten(tree).items()}
              for c, tree in shapes.items() if c in ("params", "batch_stats")}
  _, variables = export.load(path, expected)
  state = TrainState(step=0, params=variables["params"], opt_state=None, rng=None,
                     batch_stats=variables.get("batch_stats", {}), cstate={})
  bits = export.header_bits(header)
  method = transforms.base.IDENTITY._replace(name="exported", bits=lambda t, c: bits,
                                             forward=_plan_forward(header, path))
  return model, state, {**header, "epoch": None}, method


def _plan_forward(header: dict, path) -> Any:
  """The plan's ``forward`` hooks (``act_quant``'s activation rounding), which the
  decoded tensors run inside; they get no compression state (the file has none)."""
  try:
    hooked = [m for m in transforms.plan_methods(header.get("compression") or [])
              if m.forward is not None]
  except ValueError as e:
    _LOG.warning("%s: the plan's methods cannot be built (%s): its forward hooks are not "
                 "applied", path, e)
    return None
  if not hooked:
    return None
  stacked = transforms.base.stack(hooked)
  return lambda t, c: stacked.forward(t, {str(i): {} for i in range(len(hooked))})
