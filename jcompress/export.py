"""Packed export of a (compressed) model: the real bytes behind ``summary``.

File layout: the 8 magic bytes ``JCMPRS01``, a little-endian uint32 header length,
a JSON header (model name and configuration, dataset, input shape, and one entry
per stored tensor: path, collection, encoding, offset, length and the encoding's
own metadata), then the payload. Tensors a method compressed are stored in its
packed form (k-bit codes, ternary trits, sparse indices); every other parameter
and the batch-norm statistics as float32. ``payload_bytes`` of the params is what
``summary`` reports as the model's bytes.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Any, Callable

import jax
import numpy as np

from jcompress.transforms import packing, prune, quantize, ternary, tucker
from jcompress.transforms.base import Method, stack
from jcompress.transforms.select import flatten, unflatten

MAGIC = b"JCMPRS01"

_FACTORS = ("core", "u_in", "u_out")


def _tucker_export(trainable, cstate, options, masks) -> dict[str, tuple[bytes, dict]]:
  """The float32 Tucker factors of each factorized kernel (what the layer stores)."""
  out = {}
  for layer, factors in tucker.factorized_layers(trainable).items():
    payload, layout = packing.concat({name: np.asarray(f, "<f4").tobytes()
                                      for name, f in zip(_FACTORS, factors)})
    out[f"{layer}/kernel" if layer else "kernel"] = payload, {
        "shapes": [list(np.shape(f)) for f in factors], "layout": layout}
  return out


def _tucker_import(exported: dict[str, tuple[bytes, dict]]) -> dict[str, jax.Array]:
  out = {}
  for path, (payload, meta) in exported.items():
    parts = packing.split(payload, meta["layout"])
    out[path] = tucker.kernel_from_factors(*(
        np.frombuffer(parts[name], "<f4").reshape(shape)
        for name, shape in zip(_FACTORS, meta["shapes"])))
  return out


# method -> (export(trainable, cstate, options, masks) -> {path: (bytes, meta)},
#            import({path: (bytes, meta)}) -> {path: array}). ``masks`` are the
# pruning masks of earlier steps ({path: bool array}): a codec may store only the
# kept entries of those tensors.
_CODECS: dict[str, tuple[Callable, Callable]] = {
    "quantize": (lambda t, c, o, m: quantize.export_arrays(t, c, m), quantize.import_arrays),
    "qat": (lambda t, c, o, m: quantize.export_arrays(t, c, m), quantize.import_arrays),
    "ttq": (lambda t, c, o, m: ternary.export_arrays(t, c, packing=o["packing"], masks=m),
            ternary.import_arrays),
    "prune": (lambda t, c, o, m: prune.export_arrays(t, c), prune.import_arrays),
    "tucker": (_tucker_export, _tucker_import),
}


def register_codec(method: str, export: Callable, load: Callable) -> None:
  """Registers how ``method``'s compressed tensors are packed and unpacked:
  ``export(trainable, cstate, options, masks)`` and ``load(exported)`` as above."""
  _CODECS[method] = (export, load)


def _encoded(plan: list[dict], method_list: list[Method], trainable, cstate) -> dict:
  """``{path: (method, bytes, meta)}`` of the compressed tensors; a later method's
  encoding of a path replaces an earlier one's (it stores what actually runs), and
  sees the masks of earlier ``prune`` steps."""
  out: dict[str, tuple[str, bytes, dict]] = {}
  masks: dict[str, Any] = {}
  for i, (step, m) in enumerate(zip(plan, method_list)):
    if step["method"] not in _CODECS and step["paths"]:
      raise ValueError(f"--method {step['method']} has no packed export format")
    if step["paths"]:  # a step that compressed no tensor (distill) stores nothing
      for path, (payload, meta) in _CODECS[step["method"]][0](
          trainable, cstate[str(i)], step["options"], masks).items():
        out[path] = (step["method"], payload, meta)
    if step["method"] == "prune":
      masks.update(flatten(jax.device_get(cstate[str(i)]["masks"])))
    trainable = m.apply(trainable, cstate[str(i)])
  return out


def export(out: str | os.PathLike, meta: dict, methods: list[Method], state) -> dict[str, int]:
  """Writes the packed model of a loaded workdir to ``out`` (atomically).

  Args:
    out: the file to write.
    meta: the checkpoint's meta (model, model_config, dataset, input_shape, compression).
    methods: the plan's methods, in order (``base.build`` of each step).
    state: the restored state (trainable params, batch_stats, cstate).

  Returns:
    ``{"file_bytes", "header_bytes", "payload_bytes", "param_bytes"}``: payload
    of the params alone in ``param_bytes``.
  """
  encoded = _encoded(meta["compression"], methods, state.params, state.cstate)
  forward = flatten(jax.device_get(stack(methods).apply(state.params, state.cstate)))
  entries, chunks, offset, param_bytes = [], [], 0, 0
  tensors = [("params", p, v) for p, v in forward.items()] + [
      ("batch_stats", p, v) for p, v in flatten(jax.device_get(state.batch_stats)).items()]
  for collection, path, value in tensors:
    if collection == "params" and path in encoded:
      method, payload, info = encoded[path]
      entry = {"encoding": method, "meta": info}
    else:
      payload = np.asarray(value, "<f4").tobytes()
      entry = {"encoding": "float32", "meta": {"shape": list(np.shape(value))}}
    entries.append({"collection": collection, "path": path, "offset": offset,
                    "length": len(payload), **entry})
    chunks.append(payload)
    offset += len(payload)
    param_bytes += len(payload) if collection == "params" else 0
  header = json.dumps({key: meta[key] for key in (
      "model", "model_config", "dataset", "num_classes", "input_shape", "compression")}
      | {"tensors": entries}).encode()
  out = pathlib.Path(out)
  tmp = out.with_name(out.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(MAGIC + struct.pack("<I", len(header)) + header + b"".join(chunks))
  os.replace(tmp, out)
  return {"file_bytes": out.stat().st_size, "header_bytes": len(header) + 12,
          "payload_bytes": offset, "param_bytes": param_bytes}



def load(path: str | os.PathLike) -> tuple[dict, dict[str, Any]]:
  """Reads an exported file: ``(header, {"params": ..., "batch_stats": ...})`` with
  every tensor decoded to what the compressed model runs with.

  Raises:
    ValueError: not a jcompress export, truncated, or an unknown encoding.
  """
  blob = pathlib.Path(path).read_bytes()
  if blob[:8] != MAGIC or len(blob) < 12:
    raise ValueError(f"{path} is not a jcompress export (bad magic)")
  (size,) = struct.unpack("<I", blob[8:12])
  header = json.loads(blob[12:12 + size])
  payload = blob[12 + size:]
  variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
  for e in header["tensors"]:
    if e["offset"] + e["length"] > len(payload):
      raise ValueError(f"{path} is truncated: {e['path']} ends past the file")
    chunk = payload[e["offset"]:e["offset"] + e["length"]]
    if e["encoding"] == "float32":
      value = np.frombuffer(chunk, "<f4").reshape(e["meta"]["shape"])
    elif e["encoding"] in _CODECS:
      value = _CODECS[e["encoding"]][1]({e["path"]: (chunk, e["meta"])})[e["path"]]
    else:
      raise ValueError(f"{path}: unknown encoding {e['encoding']!r} of {e['path']}")
    variables[e["collection"]][e["path"]] = value
  return header, {k: unflatten(v) for k, v in variables.items() if v}
