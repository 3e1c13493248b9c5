"""Bit-packing of integer codes and trits into real bytes (numpy, for export).

Codes of ``bits`` bits are laid end to end in one little-endian bit stream: bit
``j`` of value ``i`` is stream bit ``i * bits + j``, and stream bit ``s`` is bit
``s % 8`` (least significant first) of byte ``s // 8``. Signed codes are stored in
two's complement over ``bits`` bits. Trits (values in {-1, 0, 1}) also pack five
to a byte as base-3 digits ``v + 1``, least significant first (3^5 = 243 <= 256),
the last byte padded with zero trits: 1.6 bits per weight instead of 2.

A tensor's payload may hold several sections (codes, then scales...):
:func:`concat` joins them and returns their layout, :func:`split` cuts them apart.

>>> buf = pack_codes(np.array([-2, 1, 0, 1]), 2)
>>> len(buf), unpack_codes(buf, 2, 4, signed=True).tolist()
(1, [-2, 1, 0, 1])
>>> unpack_trits(pack_trits(np.array([1, -1, 0, 0, 1, -1])), 6).tolist()
[1, -1, 0, 0, 1, -1]
"""

from __future__ import annotations

from typing import Callable

import numpy as np

TRITS_PER_BYTE = 5
_TRIT_WEIGHTS = 3 ** np.arange(TRITS_PER_BYTE, dtype=np.uint8)


def _check_bits(bits: int) -> None:
  if not (isinstance(bits, (int, np.integer)) and 1 <= bits <= 16):
    raise ValueError(f"bits must be an integer in 1..16, got {bits!r}")


def code_dtype(bits: int, signed: bool) -> np.dtype:
  """The smallest numpy integer dtype holding ``bits``-bit codes."""
  _check_bits(bits)
  return np.dtype(("int" if signed else "uint") + ("8" if bits <= 8 else "16"))


def packed_size(n: int, bits: int) -> int:
  """Bytes taken by ``n`` codes of ``bits`` bits (the last byte zero-padded)."""
  return -(-n * bits // 8)


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
  """Packs integer ``codes`` (any shape, C order) at ``bits`` bits each.

  Args:
    codes: integers that fit in ``bits`` bits, signed (two's complement) or
      unsigned: each must lie in ``[-2^(bits-1), 2^bits - 1]``.
    bits: 1..16.

  Returns:
    ``ceil(codes.size * bits / 8)`` bytes.

  Raises:
    ValueError: ``bits`` is out of range, ``codes`` are not integers, or a code
      does not fit in ``bits`` bits.
  """
  _check_bits(bits)
  codes = np.asarray(codes).reshape(-1)
  if codes.size and not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
  wide = codes.astype(np.int64)
  if wide.size and (wide.min() < -(1 << (bits - 1)) or wide.max() >= 1 << bits):
    raise ValueError(f"codes in [{wide.min()}, {wide.max()}] do not fit in {bits} bits")
  unsigned = (wide & ((1 << bits) - 1)).astype(np.uint32)
  stream = ((unsigned[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
  return np.packbits(stream.reshape(-1), bitorder="little").tobytes()


def unpack_codes(buf: bytes, bits: int, n: int, signed: bool) -> np.ndarray:
  """The first ``n`` codes of ``bits`` bits in ``buf`` (inverse of :func:`pack_codes`).

  Returns:
    A flat array of dtype :func:`code_dtype` (``bits``, ``signed``); signed codes
    are sign-extended from two's complement.

  Raises:
    ValueError: ``buf`` is shorter than ``n`` codes need.
  """
  _check_bits(bits)
  if len(buf) < packed_size(n, bits):
    raise ValueError(f"{len(buf)} bytes cannot hold {n} codes of {bits} bits "
                     f"({packed_size(n, bits)} needed)")
  stream = np.unpackbits(np.frombuffer(buf, np.uint8), count=n * bits, bitorder="little")
  values = stream.reshape(n, bits).astype(np.int32) @ (1 << np.arange(bits, dtype=np.int32))
  if signed:
    values = np.where(values >= 1 << (bits - 1), values - (1 << bits), values)
  return values.astype(code_dtype(bits, signed))


def pack_trits(values: np.ndarray) -> bytes:
  """Packs values in {-1, 0, 1} five per byte (``ceil(size / 5)`` bytes).

  Raises:
    ValueError: a value is not -1, 0 or 1.
  """
  values = np.asarray(values).reshape(-1)
  if not np.isin(values, (-1, 0, 1)).all():
    raise ValueError("trits must be -1, 0 or 1, got values "
                     f"{sorted(set(np.unique(values).tolist()) - {-1, 0, 1})[:5]}")
  digits = (values.astype(np.int8) + 1).astype(np.uint8)
  digits = np.pad(digits, (0, -digits.size % TRITS_PER_BYTE), constant_values=1)  # trit 0
  return (digits.reshape(-1, TRITS_PER_BYTE) @ _TRIT_WEIGHTS).astype(np.uint8).tobytes()


def unpack_trits(buf: bytes, n: int) -> np.ndarray:
  """The first ``n`` trits in ``buf`` as a flat int8 array (inverse of :func:`pack_trits`).

  Raises:
    ValueError: ``buf`` is too short or holds a byte above 242 (not packed trits).
  """
  need = -(-n // TRITS_PER_BYTE)
  raw = np.frombuffer(buf, np.uint8)
  if raw.size < need:
    raise ValueError(f"{raw.size} bytes cannot hold {n} trits ({need} needed)")
  raw = raw[:need]
  if raw.size and raw.max() >= 3 ** TRITS_PER_BYTE:
    raise ValueError(f"byte {int(raw.max())} is not 5 packed trits (max 242)")
  digits = (raw[:, None] // _TRIT_WEIGHTS) % 3
  return digits.reshape(-1)[:n].astype(np.int8) - 1


def concat(sections: dict[str, bytes]) -> tuple[bytes, dict[str, list[int]]]:
  """Joins named byte sections; returns the payload and ``{name: [offset, length]}``."""
  layout, offset = {}, 0
  for name, part in sections.items():
    layout[name] = [offset, len(part)]
    offset += len(part)
  return b"".join(sections.values()), layout


def split(payload: bytes, layout: dict[str, list[int]]) -> dict[str, bytes]:
  """The sections of ``payload`` described by ``layout`` (inverse of :func:`concat`).

  Raises:
    ValueError: a section reaches past the end of ``payload``.
  """
  out = {}
  for name, (offset, length) in layout.items():
    if offset + length > len(payload):
      raise ValueError(f"section {name!r} [{offset}, {offset + length}) is past the end "
                       f"of a {len(payload)}-byte payload")
    out[name] = payload[offset:offset + length]
  return out


SPARSE_FORMATS = ("dense", "bitmask", "relative")


def _relative_codes(positions: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
  """Deep Compression's relative indices: per entry, the zeros skipped since the
  previous one (at most ``2^bits - 1``; a longer run gets filler entries).
  Returns the codes and, per kept entry, its index among the entries."""
  cap = (1 << bits) - 1
  skips = np.diff(positions, prepend=-1) - 1
  fillers = skips // (cap + 1)
  real = np.cumsum(fillers + 1) - 1
  codes = np.full(int(real[-1]) + 1 if real.size else 0, cap, np.int64)
  codes[real] = skips - fillers * (cap + 1)
  return codes, real


def pack_sparse(values: np.ndarray, keep: np.ndarray, value_bits: int,
                pack: Callable[[np.ndarray], bytes], codes: bool = False
                ) -> tuple[dict[str, bytes], dict]:
  """Stores the entries of ``values`` where ``keep`` holds, in the smallest of three
  forms: ``dense`` (every entry), ``bitmask`` (a 1-bit mask of the shape, then the
  kept entries) or ``relative`` (per entry the zeros skipped before it,
  ``index_bits`` wide, with filler entries for longer runs, as in Deep
  Compression).

  Args:
    values: the tensor (any shape, C order): float32 weights, or integer codes.
    keep: booleans of the same size: where the stored entries are.
    value_bits: bits one entry takes (32 for float32, k for k-bit codes).
    pack: packs a 1-D array of entries (fillers are zeros of ``values``' dtype).
    codes: ``pack`` is :func:`pack_codes` at ``value_bits``: the values section is
      declared a code stream too.

  Returns:
    ``(sections, meta)``: sections ``values`` (+ ``mask`` or ``index``) for
    :func:`concat`; meta ``format``, ``kept`` (and ``index_bits``, ``entries``),
    and ``symbols``, the code streams ``{section: [bits, count]}`` that
    ``jcompress.entropy`` may code.

  >>> sections, meta = pack_sparse(np.arange(100.0, dtype="<f4"), np.arange(100) == 7, 32,
  ...                              lambda v: v.astype("<f4").tobytes())
  >>> meta["format"], meta["index_bits"], [len(b) for b in sections.values()]
  ('relative', 3, [1, 4])
  """
  flat, keep = np.asarray(values).reshape(-1), np.asarray(keep).reshape(-1).astype(bool)
  positions = np.flatnonzero(keep)
  options = {"dense": ({"values": pack(flat)}, {}),
             "bitmask": ({"mask": np.packbits(keep, bitorder="little").tobytes(),
                          "values": pack(flat[positions])}, {})}
  if positions.size:
    skips = np.diff(positions, prepend=-1) - 1
    entries = {b: positions.size + int((skips >> b).sum()) for b in range(2, 17)}
    bits = min(entries, key=lambda b: packed_size(entries[b], b)
               + packed_size(entries[b], value_bits))
    skips, real = _relative_codes(positions, bits)
    stored = np.zeros(skips.size, flat.dtype)
    stored[real] = flat[positions]
    options["relative"] = ({"index": pack_codes(skips, bits), "values": pack(stored)},
                           {"index_bits": bits, "entries": int(skips.size)})
  name = min(options, key=lambda k: sum(len(b) for b in options[k][0].values()))
  count = {"dense": flat.size, "bitmask": positions.size,
           "relative": options[name][1].get("entries", 0)}[name]
  symbols = {"mask": [1, int(flat.size)]} if name == "bitmask" else {}
  if name == "relative":
    symbols["index"] = [options[name][1]["index_bits"], int(count)]
  if codes:
    symbols["values"] = [value_bits, int(count)]
  return options[name][0], {"format": name, "kept": int(positions.size), **options[name][1],
                            "symbols": symbols}


def unpack_sparse(parts: dict[str, bytes], meta: dict, n: int, dtype: np.dtype,
                  unpack: Callable[[bytes, int], np.ndarray]) -> np.ndarray:
  """Inverse of :func:`pack_sparse`: the flat tensor of ``n`` entries, zero where
  nothing was stored (fillers hold zeros too, at zero positions).

  Args:
    parts: the sections (:func:`split`).
    meta: :func:`pack_sparse`'s meta.
    n: the tensor's size; dtype: its dtype.
    unpack: ``(bytes, count) -> 1-D array`` of entries.

  Raises:
    ValueError: an unknown ``format``, or sections too short for ``n`` entries
      (checked before anything of size ``n`` is allocated).
  """
  fmt = meta["format"]
  if fmt not in SPARSE_FORMATS:
    raise ValueError(f"unknown sparse format {fmt!r}; known: {', '.join(SPARSE_FORMATS)}")
  if fmt == "bitmask" and len(parts["mask"]) < -(-n // 8):
    raise ValueError(f"a {len(parts['mask'])}-byte mask cannot cover {n} entries "
                     f"({-(-n // 8)} bytes needed)")
  out = np.zeros(n, dtype)
  if fmt == "dense":
    out[:] = unpack(parts["values"], n)
  elif fmt == "bitmask":
    keep = np.unpackbits(np.frombuffer(parts["mask"], np.uint8), count=n,
                         bitorder="little").astype(bool)
    if int(keep.sum()) != meta["kept"]:
      raise ValueError(f"the mask keeps {int(keep.sum())} entries, the meta says "
                       f"{meta['kept']!r}")
    out[keep] = unpack(parts["values"], meta["kept"])
  elif fmt == "relative":
    codes = unpack_codes(parts["index"], meta["index_bits"], meta["entries"], signed=False)
    out[np.cumsum(codes.astype(np.int64) + 1) - 1] = unpack(parts["values"], meta["entries"])
  return out
