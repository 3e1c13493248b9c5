"""Packed export of a (compressed) model: the real bytes behind ``summary``.

File layout: the 8 magic bytes ``JCMPRS02``, a little-endian uint32 header length,
a zlib-compressed JSON header (``JCMPRS01`` files, with the JSON uncompressed, are
read too; what the model is, when known: name and configuration, dataset,
input shape, the compression plan; and one entry per stored tensor: collection,
path, shape, encoding, its method's module, offset, length, the encoding's own
metadata and the bits per weight the plan counts it at), then the payload.
Tensors a method compressed are stored in the form its ``encode`` writes (k-bit
codes, ternary trits, sparse indices) and read back by its registered ``decode``; every other parameter, the tensors of methods
without a codec, and the batch-norm statistics as float32. ``param_bytes`` (the
payload of the params) is what ``summary`` reports as ``exported_bytes``.

Any model exports: :func:`save_params` takes a method list and its state (the
Python API, for a model jcompress does not know); :func:`export` a loaded workdir.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import struct
import zlib
from typing import Any

import jax
import numpy as np

from jcompress import atomic, entropy
from jcompress.transforms import base, packing, registry
from jcompress.transforms.select import flatten, unflatten

_LOG = logging.getLogger(__name__)
MAGIC = b"JCMPRS01"  # a plain JSON header (files of earlier versions; still read)
MAGIC_Z = b"JCMPRS02"  # the header compressed with zlib (what export writes)
MAX_HEADER = 64 << 20  # bytes of JSON header accepted on load
MAX_DEPTH = 32  # nesting of the header's JSON (a real one nests 6 deep)
MAX_TENSORS = 1 << 16  # tensor entries in a header (mobilenetv2 has a few hundred)


def encode(methods: list[base.Method], trainable: Any, cstate: Any
           ) -> dict[str, tuple[str, bytes, dict]]:
  """``{path: (method, bytes, meta)}`` of the tensors the plan's methods encode.

  Each method's ``encode`` sees the params as the earlier methods left them and
  their zeros (``masks``); a later method's encoding of a path replaces an
  earlier one's, and a later method without a codec that selects a path drops
  it (the path is then stored as the float32 values that run).
  """
  out: dict[str, tuple[str, bytes, dict]] = {}
  zeros: dict[str, Any] = {}
  for i, m in enumerate(methods):
    c = cstate[str(i)]
    if m.encode is not None:
      if m.name not in registry.METHODS or registry.METHODS[m.name].decode is None:
        raise ValueError(f"method {m.name!r} encodes its tensors but registered no decode")
      for path, (payload, meta) in m.encode(trainable, c, zeros).items():
        out[path] = (m.name, payload, meta)
    else:
      for path in m.paths or ():
        out.pop(path, None)
    if m.revives:
      zeros = {p: v for p, v in zeros.items() if m.paths is not None and p not in m.paths}
    if m.masks is not None:
      zeros = {**zeros, **{p: np.asarray(v) & np.asarray(zeros.get(p, True))
                           for p, v in jax.device_get(m.masks(trainable, c)).items()}}
    trainable = m.apply(trainable, c)
  return out


def save_params(out: str | os.PathLike, method: base.Method | list[base.Method], trainable: Any,
                cstate: Any, *, batch_stats: Any = None, info: dict | None = None,
                coder: str = "best") -> dict[str, int]:
  """Writes the packed model of any compressed param tree to ``out`` (atomically).

  Args:
    out: the file to write (replaced atomically; never written through a symlink).
    method: a method (with its own ``trainable, cstate``), or a plan's methods in
      order (with the stacked state of ``transforms.stack``: ``{"0": ..., "1": ...}``).
    trainable, cstate: the state (``init`` and training).
    batch_stats: batch-norm statistics to store beside the params.
    info: JSON-able facts about the model stored in the header (``export``
      stores the model name, configuration, dataset, input shape and plan).
    coder: entropy coding of the codecs' code streams (:mod:`jcompress.entropy`):
      ``best`` (default; per stream the smaller of raw and ANS), ``huffman``,
      ``ans`` or ``none``.

  Returns:
    ``{"file_bytes", "header_bytes", "payload_bytes", "param_bytes"}`` and the
    params' bytes by role (``indices_bytes``, ``positions_bytes``,
    ``codebook_bytes``, ``other_bytes``: :func:`entropy.split_bytes`).
  """
  if os.path.isdir(out):
    raise ValueError(f"--out {out} is a directory")
  if isinstance(method, base.Method):
    methods, cstate = [method], {"0": cstate}
  else:
    methods = list(method)
  with packing.sized_by(entropy.coded_size(coder)):  # sparse forms chosen coded
    encoded = encode(methods, trainable, cstate)
  # The bits per weight ``summary`` counts (``eval --exported`` reports the same bytes).
  bits = {p: float(b) for p, b in base.bits_of(base.stack(methods), trainable, cstate).items()}
  forward = flatten(jax.device_get(base.stack(methods).apply(trainable, cstate)))
  for path in [p for p in encoded if not _decodes_to(encoded[p], forward.get(p))]:
    _LOG.warning("export: %s's encoding of %s does not decode to the values the model runs "
                 "with (a later method changed them); stored as float32", encoded[path][0],
                 path)
    del encoded[path]
  entries, chunks, offset, param_bytes = [], [], 0, 0
  roles = dict.fromkeys(entropy.ROLES, 0)
  tensors = [("params", p, v) for p, v in forward.items()] + [
      ("batch_stats", p, v) for p, v in flatten(jax.device_get(batch_stats or {})).items()]
  for collection, path, value in tensors:
    entry = {"collection": collection, "path": path, "shape": list(np.shape(value))}
    if collection == "params" and path in encoded:
      method, payload, meta = encoded[path]
      payload, meta = entropy.compress(payload, meta, coder)
      entry |= {"encoding": method, "module": registry.METHODS[method].module, "meta": meta}
    else:
      payload = np.asarray(value, "<f4").tobytes()
      entry |= {"encoding": "float32", "meta": {"shape": list(np.shape(value))}}
    if collection == "params" and path in bits:
      entry["bits"] = bits[path]
    entries.append(entry | {"offset": offset, "length": len(payload)})
    chunks.append(payload)
    offset += len(payload)
    if collection == "params":
      param_bytes += len(payload)
      for role, n in entropy.split_bytes(entry["meta"], len(payload)).items():
        roles[role] += n
  header = zlib.compress(json.dumps((info or {}) | {"tensors": entries},
                                    separators=(",", ":")).encode(), 9)
  blob = MAGIC_Z + struct.pack("<I", len(header)) + header + b"".join(chunks)
  atomic.write_bytes(out, blob)
  return {"file_bytes": len(blob), "header_bytes": len(header) + 12,
          "payload_bytes": offset, "param_bytes": param_bytes,
          **{f"{role}_bytes": n for role, n in roles.items()}}


def _decodes_to(entry: tuple[str, bytes, dict], value: Any) -> bool:
  method, payload, meta = entry
  if value is None:
    return False
  got = np.asarray(registry.METHODS[method].decode({"_": (payload, meta)})["_"])
  return got.shape == np.shape(value) and np.allclose(got, value, rtol=1e-5, atol=1e-6)


def export(out: str | os.PathLike, meta: dict, methods: list[base.Method], state,
           coder: str = "best") -> dict[str, int]:
  """Writes the packed model of a loaded workdir to ``out`` (:func:`save_params`).

  Args:
    out: the file to write.
    meta: the checkpoint's meta (model, model_config, dataset, input_shape, compression).
    methods: the plan's methods, in order (``transforms.plan_methods``).
    state: the restored state (trainable params, batch_stats, cstate).
    coder: the entropy coding (:func:`save_params`).
  """
  info = {key: meta[key] for key in ("model", "model_config", "dataset", "num_classes",
                                     "input_shape", "compression")}
  return save_params(out, list(methods), state.params, state.cstate,
                     batch_stats=state.batch_stats, info=info, coder=coder)


def _int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(path: str, e: Any, payload_size: int) -> None:
  if not isinstance(e, dict):
    raise ValueError(f"{path}: a tensor entry is not an object")
  name = e.get("path", "?")
  for key in ("collection", "path", "encoding"):
    if not isinstance(e.get(key), str):
      raise ValueError(f"{path}: tensor {name!r} has no valid {key!r}")
  if e["collection"] not in ("params", "batch_stats") or not e["path"] or any(
      part in ("", ".", "..") for part in e["path"].split("/")):
    raise ValueError(f"{path}: tensor {name!r} has a bad collection or path")
  for key in ("offset", "length"):
    if not _int(e.get(key)):
      raise ValueError(f"{path}: tensor {name!r} has a bad {key} {e.get(key)!r} (not a "
                       "non-negative integer)")
  if e["offset"] + e["length"] > payload_size:
    raise ValueError(f"{path} is truncated or corrupt: tensor {name!r} lies outside the "
                     f"{payload_size}-byte payload")
  if not isinstance(e.get("meta"), dict):
    raise ValueError(f"{path}: tensor {name!r} has no meta object")
  shape = e.get("shape", e["meta"].get("shape"))
  if not (isinstance(shape, list) and all(_int(d) for d in shape) and len(shape) <= 8):
    raise ValueError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
  # The decoders read the meta's shape: it must be the entry's, which is checked
  # against the model before anything is decoded.
  if "shape" in e["meta"] and e["meta"]["shape"] != shape:
    raise ValueError(f"{path}: tensor {name!r} has shape {shape} but its meta says "
                     f"{e['meta']['shape']!r}")
  bits = e.get("bits", 32)
  if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 0 < bits <= 64:
    raise ValueError(f"{path}: tensor {name!r} has bad bits {bits!r} (not a number in (0, 64])")
  if e["encoding"] == "float32" and e["length"] != 4 * math.prod(shape):
    raise ValueError(f"{path}: float32 tensor {name!r} of shape {shape} needs "
                     f"{4 * math.prod(shape)} bytes, the file gives {e['length']}")


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
  """The JSON header of an exported file and the payload's offset (nothing decoded).

  Raises:
    ValueError: not a regular file or not a jcompress export, or a header that is
      truncated, longer than the file or :data:`MAX_HEADER`, nested deeper than
      :data:`MAX_DEPTH`, lists more than :data:`MAX_TENSORS` tensors, or holds an
      entry whose path, shape, offset or length is malformed or outside the file
      (the message names the file).
  """
  if os.path.isdir(path):
    raise ValueError(f"{path} is a directory, not an exported file")
  with open(path, "rb") as f:
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
      raise ValueError(f"{path} is not a regular file (a device, pipe or socket), not an "
                       "exported file")
    head = f.read(12)
    size = os.fstat(f.fileno()).st_size
    if len(head) < 12 or head[:8] not in (MAGIC, MAGIC_Z):
      raise ValueError(f"{path} is not a jcompress export (bad magic)")
    (length,) = struct.unpack("<I", head[8:12])
    if length > min(MAX_HEADER, size - 12):
      raise ValueError(f"{path}: header length {length} exceeds the file or the "
                       f"{MAX_HEADER}-byte limit")
    raw = f.read(length)
  if head[:8] == MAGIC_Z:
    raw = _inflate(str(path), raw)
  try:
    header = json.loads(raw)
  except (ValueError, RecursionError) as e:
    raise ValueError(f"{path}: the header is not valid JSON ({type(e).__name__})") from None
  if _depth(header) > MAX_DEPTH:
    raise ValueError(f"{path}: the header nests deeper than {MAX_DEPTH} levels: corrupt")
  if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
    raise ValueError(f"{path}: the header has no tensor list")
  if len(header["tensors"]) > MAX_TENSORS:
    raise ValueError(f"{path}: the header lists {len(header['tensors'])} tensors, more "
                     f"than the {MAX_TENSORS} allowed")
  plan = header.get("compression")
  if plan is not None and not (isinstance(plan, list) and all(
      isinstance(step, dict) and isinstance(step.get("method"), str)
      and isinstance(step.get("module", ""), (str, type(None))) for step in plan)):
    raise ValueError(f"{path}: the header's compression plan is not a list of steps "
                     "naming their method")
  seen = set()
  for e in header["tensors"]:
    _check_entry(str(path), e, size - 12 - length)
    if (e["collection"], e["path"]) in seen:
      raise ValueError(f"{path}: tensor {e['collection']}/{e['path']} appears twice")
    seen.add((e["collection"], e["path"]))
  return header, 12 + length


def _inflate(path: str, data: bytes) -> bytes:
  """The zlib-compressed header ``data``, at most :data:`MAX_HEADER` bytes inflated."""
  inflater = zlib.decompressobj()
  try:
    raw = inflater.decompress(data, MAX_HEADER + 1)
  except zlib.error:
    raise ValueError(f"{path}: the header is corrupt (zlib)") from None
  if len(raw) > MAX_HEADER or inflater.unconsumed_tail or not inflater.eof:
    raise ValueError(f"{path}: the header inflates past the {MAX_HEADER}-byte limit or is "
                     "truncated")
  return raw


def header_bits(header: dict) -> dict[str, float]:
  """``{param path: bits per weight}`` of an exported file (:func:`read_header`'s
  header): each tensor's recorded ``bits`` (what ``summary`` counts it at), else
  for an encoded tensor of a file written before they were recorded, the bits its
  payload takes; float32 tensors are left out (32)."""
  out = {}
  for e in header["tensors"]:
    size = math.prod(e.get("shape", e["meta"].get("shape", ())))
    if e["collection"] != "params":
      continue
    if "bits" in e:
      out[e["path"]] = float(e["bits"])
    elif e["encoding"] != "float32" and size:
      out[e["path"]] = 8 * e["length"] / size
  return out


def _depth(value: Any) -> int:
  """Nesting depth of parsed JSON (0 for a scalar), without recursion."""
  deepest, stack = 0, [(value, 1)]
  while stack:
    value, depth = stack.pop()
    if isinstance(value, (dict, list)):
      deepest = max(deepest, depth)
      if depth <= MAX_DEPTH:
        stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict)
                                              else value))
  return deepest


def load(path: str | os.PathLike, expected: dict[str, dict[str, tuple]] | None = None
         ) -> tuple[dict, dict[str, Any]]:
  """Reads an exported file: ``(header, {"params": ..., "batch_stats": ...})`` with
  every tensor decoded to what the compressed model runs with.

  Args:
    path: the file.
    expected: ``{collection: {path: shape}}`` of the model the file is for; every
      tensor is checked against it before anything is decoded.

  Raises:
    ValueError: not a jcompress export, truncated, malformed, an unknown
      encoding, or tensors that do not fit ``expected``.
  """
  header, start = read_header(path)
  try:
    registry.ensure(header.get("compression") or [], trusted=False)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  if expected is not None:
    _check_expected(str(path), header["tensors"], expected)
  variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
  with open(path, "rb") as f:
    for e in header["tensors"]:
      f.seek(start + e["offset"])  # read_header checked it lies inside the file
      chunk = f.read(e["length"])
      if len(chunk) != e["length"]:
        raise ValueError(f"{path} is truncated: tensor {e['path']!r} needs {e['length']} "
                         f"bytes at offset {e['offset']}, the file gives {len(chunk)}")
      variables[e["collection"]][e["path"]] = _decode(str(path), e, chunk)
  return header, {k: unflatten(v) for k, v in variables.items() if v}


def _decode(path: str, e: dict, chunk: bytes) -> Any:
  """One tensor entry (checked by ``read_header``) decoded from its bytes."""
  shape = tuple(e.get("shape", e["meta"].get("shape")))  # checked by read_header
  if e["encoding"] == "float32":
    return np.frombuffer(chunk, "<f4").reshape(shape)
  if e["encoding"] not in registry.METHODS and isinstance(e.get("module"), str):
    try:
      registry.ensure([{"method": e["encoding"], "module": e["module"]}], trusted=False)
    except ValueError as err:
      raise ValueError(f"{path}: tensor {e['path']!r}: {err}") from None
  spec = registry.METHODS.get(e["encoding"])
  if spec is None or spec.decode is None:
    raise ValueError(f"{path}: unknown encoding {e['encoding']!r} of {e['path']}")
  try:
    # Entropy-coded streams hold at most an entry per weight plus relative-index fillers.
    chunk, meta = entropy.expand(chunk, e["meta"], limit=2 * math.prod(shape) + 64)
    # The decoder gets the checked shape: it sizes what it allocates by it.
    value = spec.decode({e["path"]: (chunk, {**meta, "shape": list(shape)})})[e["path"]]
  except (KeyError, TypeError, IndexError, ValueError, AttributeError, OverflowError) as err:
    raise ValueError(f"{path}: tensor {e['path']!r} ({e['encoding']}) is corrupt: "
                     f"{type(err).__name__}: {err}") from None
  if tuple(np.shape(value)) != shape:
    raise ValueError(f"{path}: tensor {e['path']!r} ({e['encoding']}) decodes to shape "
                     f"{list(np.shape(value))}, its entry says {list(shape)}")
  return value


def _check_expected(path: str, entries: list[dict], expected: dict[str, dict[str, tuple]]
                    ) -> None:
  found = {(e["collection"], e["path"]): tuple(e.get("shape", e["meta"].get("shape", ())))
           for e in entries}
  want = {(c, p): tuple(s) for c, tensors in expected.items() for p, s in tensors.items()}
  for key in sorted(want.keys() | found.keys()):
    if key not in found:
      raise ValueError(f"{path}: tensor {'/'.join(key)} of the model is missing")
    if key not in want:
      raise ValueError(f"{path}: tensor {'/'.join(key)} is not a tensor of the model")
    if found[key] != want[key]:
      raise ValueError(f"{path}: tensor {'/'.join(key)} has shape {list(found[key])}, the "
                       f"model {list(want[key])}")
