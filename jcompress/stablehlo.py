"""StableHLO export of a (compressed) model's forward pass with ``jax.export``, and its
evaluation through the deserialized module: ``jcompress export --format stablehlo``
and ``jcompress eval --runtime stablehlo``.

``FILE`` holds ``jax.export.Exported.serialize()`` of the inference-mode forward pass
``images -> logits``: normalised float32 images ``[batch, *input_shape]`` (``batch``
symbolic unless ``--batch-size`` fixed it), the params the model runs with and the
batch-norm statistics embedded as constants, lowered for CPU, CUDA, ROCm and TPU.
A method's ``stablehlo`` hook (:func:`compressed`) embeds its tensors at their
compressed width instead (quantize/qat: packed codes and scales; ttq: packed trits
and w_p, w_n), decoded in the graph; every other tensor is float32.
``FILE.json`` (the sidecar) says how to feed it: ``dataset``, ``input_shape``,
``num_classes``, ``mean`` and ``std`` (per channel on the 0-1 scale:
``x = (pixels / 255 - mean) / std``), ``batch`` (null: any), ``model``, ``epoch``,
``compression`` (the plan's method names) and ``compressed_width`` (those paths).
Running it needs JAX alone (and ``flatbuffers``)::

    exp = jax.export.deserialize(open(FILE, "rb").read())
    logits = exp.call(x)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import atomic, data
from jcompress.transforms import registry
from jcompress.transforms.select import flatten, unflatten

_LOG = logging.getLogger(__name__)
SIDECAR = ".json"  # FILE + SIDECAR: what the module's input is
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # lowered for each: one file runs on any
_INFO_KEYS = ("dataset", "input_shape", "num_classes", "mean", "std")


def forward(model, state, method, weights: dict[str, Callable[[], Any]] | None = None
            ) -> Callable[[jax.Array], jax.Array]:
  """``images -> logits`` of a loaded model (``load_workdir``'s tuple), in inference
  mode, with the params ``method.apply`` gives and the batch-norm statistics as
  host constants (what :func:`export` embeds); ``weights`` (:func:`compressed`)
  rebuild their params inside the graph instead."""
  params = flatten(jax.device_get(method.apply(state.params, state.cstate)))
  params = {p: v for p, v in params.items() if p not in (weights or {})}
  stats = {"batch_stats": jax.device_get(state.batch_stats)} if state.batch_stats else {}

  def fn(x):
    rebuilt = {p: w() for p, w in (weights or {}).items()}
    with (method.forward(state.params, state.cstate) if method.forward is not None
          else contextlib.nullcontext()):
      return model.apply({"params": unflatten(params | rebuilt)} | stats, x, train=False)
  return fn


def hook_outputs(meta: dict, state, hook: str) -> dict[str, Any]:
  """``{path: value}`` of the plan's methods' ``hook`` (``stablehlo``, ``onnx``): each
  method's hook sees the trainable tree as the earlier methods left it; a later
  method's entry replaces an earlier one's, and a later method without the hook
  drops the paths it selects."""
  from jcompress import transforms  # pylint: disable=import-outside-toplevel
  out: dict[str, Any] = {}
  trainable = state.params
  for i, m in enumerate(transforms.plan_methods(meta.get("compression") or [])):
    c = state.cstate[str(i)]
    fn = getattr(registry.METHODS[m.name], hook) if m.name in registry.METHODS else None
    if fn is not None:
      out.update(fn(trainable, c))
    else:
      for path in m.paths or ():
        out.pop(path, None)
    trainable = m.apply(trainable, c)
  return out


def compressed(meta: dict, state, method) -> dict[str, Callable[[], Any]]:
  """``{path: () -> tensor}`` of the plan's methods' ``stablehlo`` hooks (a later
  method's replaces an earlier one's; a later method without one drops the path),
  each checked against the value the model runs with: one that differs is left
  float32, with a warning."""
  out = hook_outputs(meta, state, "stablehlo")
  runs = flatten(jax.device_get(method.apply(state.params, state.cstate)))
  for path in list(out):
    got = np.asarray(out[path]())
    if path not in runs or got.shape != runs[path].shape or not np.allclose(
        got, runs[path], rtol=1e-5, atol=1e-6):
      _LOG.warning("export: %s's compressed form is not what the model runs with (a later "
                   "method changed it); embedded as float32", path)
      del out[path]
  return out


def sidecar(fmt: str, meta: dict, **extra: Any) -> dict[str, Any]:
  """What an exported module's ``FILE.json`` says of it: how to feed it (dataset,
  input shape, classes, normalisation), where it came from, and ``extra``."""
  spec = data.spec(meta["dataset"])
  return {"format": fmt, "model": meta["model"], "dataset": meta["dataset"],
          "input_shape": list(meta["input_shape"]), "num_classes": spec.num_classes,
          "mean": list(spec.mean), "std": list(spec.std), "epoch": meta.get("epoch"),
          "compression": [step["method"] for step in meta.get("compression") or []]} | extra


def export(out: str | os.PathLike, model, state, meta: dict, method, *,
           batch_size: int | None = None) -> dict[str, Any]:
  """Writes ``out`` (the serialized module) and ``out.json`` (its sidecar), atomically.

  Args:
    out: the file to write.
    model, state, meta, method: a loaded workdir (``load_workdir``).
    batch_size: fix the batch dimension; None: symbolic (any batch).

  Returns:
    ``{"format", "file_bytes", "batch", "platforms", "compressed_width"}`` (the
    params embedded at their compressed width, :func:`compressed`).

  Raises:
    ValueError: a bad ``batch_size``, or a model that does not trace with a
      symbolic batch (the message says to give ``--batch-size``).
  """
  if os.path.isdir(out):
    raise ValueError(f"--out {out} is a directory")
  if batch_size is not None and batch_size < 1:
    raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
  batch = jax.export.symbolic_shape("b")[0] if batch_size is None else batch_size
  weights = compressed(meta, state, method)
  args = jax.ShapeDtypeStruct((batch, *meta["input_shape"]), jnp.float32)
  try:
    exported = jax.export.export(jax.jit(forward(model, state, method, weights)),
                                 platforms=PLATFORMS)(args)
  except Exception as e:  # pylint: disable=broad-except
    if batch_size is not None:  # a fixed shape: any failure is a bug, shown as it is
      raise
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(f"model {meta['model']} does not export with a symbolic batch "
                     f"({reason}): give --batch-size N") from None
  blob = bytes(exported.serialize())
  info = sidecar("stablehlo", meta, batch=batch_size, compressed_width=sorted(weights))
  atomic.write_bytes(out, blob)
  atomic.write_text(f"{out}{SIDECAR}", json.dumps(info, indent=1) + "\n")
  return {"format": "stablehlo", "file_bytes": len(blob), "batch": batch_size,
          "platforms": list(exported.platforms), "compressed_width": sorted(weights)}


def read_sidecar(path: str | os.PathLike, fmt: str) -> dict:
  """The sidecar ``FILE.json`` of an exported ``path`` (``fmt``: the ``export --format``
  that wrote both), with the keys the model's input needs and a known dataset.

  Raises:
    ValueError: no sidecar, or one without those keys or with an unknown dataset.
  """
  sidecar = f"{path}{SIDECAR}"
  if not os.path.exists(sidecar):
    raise ValueError(f"{path}: no {sidecar} beside it (jcompress export --format {fmt} "
                     "writes both)")
  with open(sidecar, encoding="utf-8") as f:
    info = json.load(f)
  missing = [k for k in _INFO_KEYS if k not in info]
  if missing:
    raise ValueError(f"{sidecar} lacks {', '.join(missing)}")
  try:
    data.check_name(str(info["dataset"]))
  except ValueError as e:
    raise ValueError(f"{sidecar}: {e}") from None
  return info


def load(path: str | os.PathLike) -> tuple[Any, dict]:
  """``(exported, info)``: the deserialized module and its sidecar.

  Raises:
    ValueError: no sidecar, or one without the keys the module's input needs.
  """
  info = read_sidecar(path, "stablehlo")
  with open(path, "rb") as f:
    blob = f.read()
  try:
    exported = jax.export.deserialize(bytearray(blob))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} is not a serialized jax.export module ({type(e).__name__})"
                     ) from None
  return exported, info


def _logits(fn: Callable, images: np.ndarray, labels: np.ndarray, info: dict,
            batch_size: int) -> np.ndarray:
  """``fn``'s logits of all ``images`` (the last batch padded, then cut)."""
  out = []
  for batch in data.batches(images, labels, batch_size, mean=info["mean"], std=info["std"],
                            pad=True, prefetch=0):
    out.append(np.asarray(fn(batch["image"]))[np.asarray(batch["mask"]).astype(bool)])
  return np.concatenate(out)


def evaluate(path: str | os.PathLike, *, data_dir: str | None = None, batch_size: int = 1000,
             workdir: str | os.PathLike | None = None, checkpoint: str | int = "latest"
             ) -> dict[str, Any]:
  """Test accuracy, error and loss of ``path``'s module on its dataset (``eval
  --runtime stablehlo``); with ``workdir``, its agreement with that run's model:
  ``agreement`` (the fraction of identical argmax) and ``max_logit_diff``."""
  if batch_size < 1:
    raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
  exported, info = load(path)
  batch_size = info.get("batch") or batch_size
  ds = data.load(info["dataset"], data_dir)
  logits = _logits(jax.jit(exported.call), ds.test_images, ds.test_labels, info, batch_size)
  labels = np.asarray(ds.test_labels)
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)))
  accuracy = float(np.mean(np.argmax(logits, -1) == labels))
  result = {"model": info.get("model"), "dataset": info["dataset"], "epoch": info.get("epoch"),
            "runtime": "stablehlo", "accuracy": accuracy, "error": 1 - accuracy,
            "loss": float(-np.mean(logp[np.arange(len(labels)), labels])),
            "file_bytes": os.path.getsize(path)}
  if workdir is not None:
    from jcompress.train.loop import load_workdir  # pylint: disable=import-outside-toplevel
    model, state, meta, method = load_workdir(workdir, checkpoint)
    if meta["dataset"] != info["dataset"]:
      raise ValueError(f"--workdir {workdir} runs on {meta['dataset']}, {path} on "
                       f"{info['dataset']}")
    theirs = _logits(jax.jit(forward(model, state, method)), ds.test_images, ds.test_labels,
                     info, batch_size)
    result |= {"agreement": float(np.mean(np.argmax(logits, -1) == np.argmax(theirs, -1))),
               "max_logit_diff": float(np.max(np.abs(logits - theirs)))}
  return result
