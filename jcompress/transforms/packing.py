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

import contextlib
import contextvars
import functools
import itertools
import math
from typing import Callable, Iterator

import numpy as np

TRITS_PER_BYTE = 5
# How :func:`pack_sparse` sizes a candidate form: ``(sections, symbols) -> bytes``
# (None: the raw bytes). ``export`` sets its entropy coder's size (:func:`sized_by`).
_SIZE: contextvars.ContextVar[Callable[[dict, dict], int] | None] = contextvars.ContextVar(
    "sparse_size", default=None)
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


SPARSE_FORMATS = ("dense", "bitmask", "relative", "nm")
MAX_NM_GROUP = 64  # the widest N:M group looked for


def _groups(a: np.ndarray, m: int) -> np.ndarray:
  """``a``'s entries in groups of ``m`` consecutive ones along axis -2, ``(G, m)``
  (the groups in C order of the other axes, then of the group along the axis)."""
  return np.moveaxis(np.asarray(a), -2, -1).reshape(-1, m)


def _ungroup(groups: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of :func:`_groups` for a tensor of ``shape``."""
  moved = shape[:-2] + (shape[-1], shape[-2])
  return np.moveaxis(groups.reshape(moved), -1, -2)


@functools.lru_cache(maxsize=64)
def _combinations(n: int, m: int) -> np.ndarray:
  """The ``C(m, n)`` bit patterns of ``m`` bits with ``n`` set, increasing (uint64)."""
  return np.sort(np.array([sum(1 << c for c in combo)
                           for combo in itertools.combinations(range(m), n)], np.uint64))


def nm_coding(n: int, m: int, groups: int) -> tuple[str, int, int]:
  """``(coding, bits, count)`` of the in-group positions of ``groups`` N:M groups, the
  smaller of ``combination`` (per group the rank of its pattern among the ``C(m, n)``,
  ``ceil(log2 C(m, n))`` bits, kept only up to 16 bits) and ``index`` (per kept entry
  its place in its group, ``ceil(log2 m)`` bits); a tie goes to ``index``.

  >>> nm_coding(2, 4, 10), nm_coding(1, 4, 10)
  (('combination', 3, 10), ('index', 2, 10))
  """
  index = ("index", max(1, (m - 1).bit_length()), groups * n)
  combos = math.comb(m, n)
  if combos > 1 << 16:
    return index
  combination = ("combination", (combos - 1).bit_length(), groups)
  return combination if combination[1] * groups < index[1] * index[2] else index


def nm_pattern(keep: np.ndarray) -> tuple[int, int] | None:
  """``(N, M)`` when every ``M`` consecutive entries along axis -2 of ``keep`` (a
  kernel's input axis) hold exactly ``N`` True (``0 < N < M <= 64``); among several
  such ``M``, the one whose positions take the fewest bits. None otherwise (also
  for a tensor of fewer than 2 axes).

  >>> nm_pattern(np.array([[1, 0], [0, 1], [1, 1], [0, 0]], bool))
  (1, 2)
  """
  keep = np.asarray(keep, bool)
  if keep.ndim < 2 or keep.size == 0:
    return None
  k = keep.shape[-2]
  rows = np.moveaxis(keep, -2, -1).reshape(-1, k)
  cum = np.concatenate([np.zeros((rows.shape[0], 1), np.int64), np.cumsum(rows, 1)], 1)
  best, best_bits = None, None
  for m in range(2, min(k, MAX_NM_GROUP) + 1):
    if k % m:
      continue
    counts = cum[:, m::m] - cum[:, :-1:m]
    n = int(counts.flat[0])
    if 0 < n < m and (counts == n).all():
      _, bits, count = nm_coding(n, m, keep.size // m)
      if best is None or bits * count < best_bits:
        best, best_bits = (n, m), bits * count
  return best


def _pack_nm(values: np.ndarray, keep: np.ndarray, n: int, m: int,
             pack: Callable[[np.ndarray], bytes]) -> tuple[dict[str, bytes], dict]:
  """The ``nm`` form: the kept entries group by group (:func:`_groups` order, in
  place order within a group), then their in-group positions (:func:`nm_coding`)."""
  keep_g = _groups(keep, m)
  coding, bits, count = nm_coding(n, m, keep_g.shape[0])
  if coding == "combination":
    patterns = (keep_g.astype(np.uint64) << np.arange(m, dtype=np.uint64)).sum(
        1, dtype=np.uint64)
    codes = np.searchsorted(_combinations(n, m), patterns)
  else:
    codes = np.nonzero(keep_g)[1]
  return ({"positions": pack_codes(codes, bits),
           "values": pack(_groups(values.reshape(keep.shape), m)[keep_g])},
          {"n": n, "m": m, "position_coding": coding, "position_bits": bits,
           "entries": int(count)})


def _unpack_nm(parts: dict[str, bytes], meta: dict, n_total: int) -> np.ndarray:
  """The ``(G, m)`` keep mask of an ``nm`` tensor, every field checked first."""
  n, m, shape = meta["n"], meta["m"], tuple(meta["shape"])
  if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m <= MAX_NM_GROUP
          and len(shape) >= 2 and math.prod(shape) == n_total and shape[-2] % m == 0):
    raise ValueError(f"bad N:M meta: {n!r}:{m!r} of a tensor of shape {list(shape)}")
  groups = n_total // m
  coding, bits, count = nm_coding(n, m, groups)
  if (coding, bits, count) != (meta["position_coding"], meta["position_bits"], meta["entries"]):
    raise ValueError(f"N:M positions coded {meta['position_coding']!r} at "
                     f"{meta['position_bits']!r} bits, expected {coding!r} at {bits}")
  if meta["kept"] != groups * n:
    raise ValueError(f"an {n}:{m} tensor of {n_total} entries keeps {groups * n}, the meta "
                     f"says {meta['kept']!r}")
  codes = unpack_codes(parts["positions"], bits, count, signed=False).astype(np.int64)
  keep = np.zeros((groups, m), bool)
  if coding == "combination":
    table = _combinations(n, m)
    if codes.size and codes.max() >= table.size:
      raise ValueError(f"an N:M position code is {int(codes.max())}, above {table.size - 1}")
    keep[:] = (table[codes][:, None] >> np.arange(m, dtype=np.uint64)) & np.uint64(1)
  else:
    codes = codes.reshape(groups, n)
    if codes.size and (codes.max() >= m or (np.diff(codes, axis=1) <= 0).any()):
      raise ValueError(f"N:M positions are not increasing places in groups of {m}")
    np.put_along_axis(keep, codes, True, 1)
  return keep


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
  """Stores the entries of ``values`` where ``keep`` holds, in the smallest of four
  forms: ``dense`` (every entry, zero where not kept), ``bitmask`` (a 1-bit mask of
  the shape, then the kept entries), ``relative`` (per entry the zeros skipped before it,
  ``index_bits`` wide, with filler entries for longer runs, as in Deep
  Compression) or, where ``keep`` is an N:M pattern along its axis -2
  (:func:`nm_pattern`: ``prune --structure N:M``), ``nm``: the N kept entries of
  each group of M and their in-group ``positions``, ``position_bits`` wide: per
  group the rank of its pattern or per kept entry its place (:func:`nm_coding`);
  no mask and no gaps. Smallest raw, or as :func:`sized_by` measures it (the
  entropy-coded size, when ``export`` codes the streams).

  Args:
    values: the tensor (C order; any shape of ``keep``'s size): float32 weights, or
      integer codes.
    keep: booleans: where the stored entries are. Give it the tensor's shape for
      the ``nm`` form (a flat ``keep`` never takes it).
    value_bits: bits one entry takes (32 for float32, k for k-bit codes).
    pack: packs a 1-D array of entries (fillers are zeros of ``values``' dtype).
    codes: ``pack`` is :func:`pack_codes` at ``value_bits``: the values section is
      declared a code stream too.

  Returns:
    ``(sections, meta)``: sections ``values`` (+ ``mask``, ``index`` or
    ``positions``) for :func:`concat`; meta ``format``, ``kept`` (and
    ``index_bits``, ``entries``; ``nm``: ``n``, ``m``, ``position_coding``,
    ``position_bits``, ``entries``), and ``symbols``, the code streams ``{section: [bits, count]}`` that
    ``jcompress.entropy`` may code.

  >>> sections, meta = pack_sparse(np.arange(100.0, dtype="<f4"), np.arange(100) == 7, 32,
  ...                              lambda v: v.astype("<f4").tobytes())
  >>> meta["format"], meta["index_bits"], [len(b) for b in sections.values()]
  ('relative', 3, [1, 4])
  """
  shaped = np.asarray(keep, bool)
  flat, keep = np.asarray(values).reshape(-1), shaped.reshape(-1)
  positions = np.flatnonzero(keep)
  options = {"dense": ({"values": pack(np.where(keep, flat, 0).astype(flat.dtype))}, {}),
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
  nm = nm_pattern(shaped)
  if nm is not None:
    options["nm"] = _pack_nm(np.asarray(values), shaped, *nm, pack)
  symbols = {k: _symbols(k, extra, flat.size, positions.size, value_bits, codes)
             for k, (_, extra) in options.items()}
  size = _SIZE.get() or (lambda sections, _: sum(len(b) for b in sections.values()))
  name = min(options, key=lambda k: size(options[k][0], symbols[k]))
  return options[name][0], {"format": name, "kept": int(positions.size), **options[name][1],
                            "symbols": symbols[name]}


def _symbols(name: str, extra: dict, n: int, kept: int, value_bits: int, codes: bool
             ) -> dict[str, list[int]]:
  """The code streams ``{section: [bits, count]}`` of one :func:`pack_sparse` form."""
  count = {"dense": n, "bitmask": kept, "nm": kept, "relative": extra.get("entries", 0)}[name]
  out = {"mask": [1, int(n)]} if name == "bitmask" else {}
  if name == "relative":
    out["index"] = [extra["index_bits"], int(count)]
  if name == "nm":
    out["positions"] = [extra["position_bits"], extra["entries"]]
  if codes:
    out["values"] = [value_bits, int(count)]
  return out


@contextlib.contextmanager
def sized_by(size: Callable[[dict, dict], int]) -> Iterator[None]:
  """Within it, :func:`pack_sparse` keeps the form that ``size(sections, symbols)``
  finds smallest (``export`` passes its entropy coder's output size: a 1-bit mask
  that codes to a few bytes can beat relative indices that are smaller raw)."""
  token = _SIZE.set(size)
  try:
    yield
  finally:
    _SIZE.reset(token)


def unpack_sparse(parts: dict[str, bytes], meta: dict, n: int, dtype: np.dtype,
                  unpack: Callable[[bytes, int], np.ndarray]) -> np.ndarray:
  """Inverse of :func:`pack_sparse`: the flat tensor of ``n`` entries, zero where
  nothing was stored (fillers hold zeros too, at zero positions).

  Args:
    parts: the sections (:func:`split`).
    meta: :func:`pack_sparse`'s meta (``nm`` also reads the tensor's ``shape``).
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
  elif fmt == "nm":
    keep = _unpack_nm(parts, meta, n)
    groups = np.zeros(keep.shape, dtype)
    groups[keep] = unpack(parts["values"], meta["kept"])
    out[:] = _ungroup(groups, tuple(meta["shape"])).reshape(-1)
  return out
