"""Entropy coding of an exported tensor's code streams (Deep Compression's third stage).

A codec declares which of its byte sections hold fixed-width codes, in its meta:
``"symbols": {section: [bits, count]}`` (weight codes, shared-weight indices,
relative position indices, a 1-bit mask). :func:`compress` replaces each such
section by the smaller of itself and its entropy-coded form, and records what it
did in ``meta["entropy"]``; :func:`expand` restores the exact bytes before the
codec's ``decode`` runs, so no codec knows about it.

Coders, both from ``constriction`` (Bamler et al.; Rust, exact and fast):
``huffman`` (a per-section Huffman code, as Han et al. 2016 use) and ``ans``
(asymmetric numeral systems with the section's empirical distribution, within a
few bytes of its entropy, where Huffman loses up to a bit per symbol on skewed
streams). ``best`` keeps, per section, the smaller of the raw codes and ANS (ANS is
never more than its few bytes of flush above Huffman, and constriction's Huffman
coder takes a Python call per symbol: it runs only when asked for). A coded section is a table (a bitmap of the symbols present, then their
uint32 counts: the decoder rebuilds the same model from it) followed by the coded
words, so the bytes reported are everything a decoder needs.

>>> codes = np.array([0] * 900 + [1] * 60 + [2, 3, 3, 2] * 10, np.uint8)
>>> payload, meta = packing.concat({"values": packing.pack_codes(codes, 2)})
>>> meta = {"layout": meta, "symbols": {"values": [2, 1000]}}
>>> small, coded = compress(payload, meta, "ans")
>>> len(payload), len(small), coded["entropy"]["values"][0]
(250, 97, 'ans')
>>> expand(small, coded, limit=1000) == (payload, meta)
True
"""

from __future__ import annotations


import numpy as np

from jcompress.transforms import packing

CODERS = ("none", "huffman", "ans", "best")
MAX_BITS = 12  # widest codes coded (the table has a bit per possible symbol)


def _unpack(raw: bytes, bits: int, count: int) -> np.ndarray:
  return packing.unpack_codes(raw, bits, count, signed=False).astype(np.int64)


def _table(counts: np.ndarray) -> bytes:
  present = counts > 0
  return (np.packbits(present, bitorder="little").tobytes()
          + counts[present].astype("<u4").tobytes())


def _read_table(data: bytes, bits: int, count: int) -> tuple[np.ndarray, np.ndarray, int]:
  """``(the present symbols, their counts, bytes the table takes)``; checks them
  against ``count`` before the caller allocates anything of that size."""
  width = -(-(1 << bits) // 8)
  if len(data) < width:
    raise ValueError("entropy table truncated")
  present = np.unpackbits(np.frombuffer(data[:width], np.uint8), count=1 << bits,
                          bitorder="little").astype(bool)
  m = int(present.sum())
  if m == 0 or len(data) < width + 4 * m:
    raise ValueError("entropy table truncated or empty")
  counts = np.frombuffer(data[width:width + 4 * m], "<u4").astype(np.int64)
  if counts.min() == 0 or int(counts.sum()) != count:
    raise ValueError(f"entropy table counts {int(counts.sum())} symbols, the meta {count}")
  return np.flatnonzero(present), counts, width + 4 * m


def encode_symbols(symbols: np.ndarray, bits: int, coder: str) -> bytes:
  """The table and the ``coder`` (``huffman`` or ``ans``) code of ``symbols``
  (integers in ``[0, 2**bits)``)."""
  import constriction  # a compiled extension: loaded when an export codes something

  counts = np.bincount(symbols, minlength=1 << bits)
  present = counts > 0
  ranks = (np.cumsum(present) - 1)[symbols].astype(np.int32)  # the present symbols, dense
  freqs = counts[present].astype(np.float64)
  if freqs.size == 1:  # one symbol: its count says everything
    return _table(counts)
  if coder == "ans":
    model = constriction.stream.model.Categorical(freqs / freqs.sum(), perfect=False)
    encoder = constriction.stream.stack.AnsCoder()
    encoder.encode_reverse(ranks, model)
    words = encoder.get_compressed()
  elif coder == "huffman":
    tree = constriction.symbol.huffman.EncoderHuffmanTree(freqs)
    encoder = constriction.symbol.QueueEncoder()
    for rank in ranks.tolist():
      encoder.encode_symbol(rank, tree)
    words, _ = encoder.get_compressed()
  else:
    raise ValueError(f"unknown entropy coder {coder!r}; known: huffman, ans")
  return _table(counts) + np.asarray(words, "<u4").tobytes()


def decode_symbols(data: bytes, bits: int, count: int, coder: str) -> np.ndarray:
  """Inverse of :func:`encode_symbols`: ``count`` symbols (``count`` checked
  against the table before decoding)."""
  import constriction

  symbols, counts, start = _read_table(data, bits, count)
  if symbols.size == 1:
    return np.full(count, symbols[0], np.int64)
  body = data[start:]
  if len(body) % 4:
    raise ValueError("entropy-coded words truncated")
  words = np.frombuffer(body, "<u4").astype(np.uint32)
  freqs = counts.astype(np.float64)
  try:
    if coder == "ans":
      model = constriction.stream.model.Categorical(freqs / freqs.sum(), perfect=False)
      ranks = np.asarray(constriction.stream.stack.AnsCoder(words).decode(model, count))
    elif coder == "huffman":
      tree = constriction.symbol.huffman.DecoderHuffmanTree(freqs)
      decoder = constriction.symbol.QueueDecoder(words)
      ranks = np.fromiter((decoder.decode_symbol(tree) for _ in range(count)), np.int64,
                          count)
    else:
      raise ValueError(f"unknown entropy coder {coder!r}")
  except (RuntimeError, AssertionError, OverflowError) as e:
    raise ValueError(f"entropy-coded words do not decode ({e})") from None
  if ranks.size != count or ranks.min() < 0 or ranks.max() >= symbols.size:
    raise ValueError("entropy-coded words decode to symbols outside the table")
  return symbols[ranks]


def compress(payload: bytes, meta: dict, coder: str = "best") -> tuple[bytes, dict]:
  """``(payload, meta)`` with each declared code section replaced by its entropy-coded
  form where that is smaller (``coder``: one of :data:`CODERS`)."""
  if coder not in CODERS:
    raise ValueError(f"--entropy must be one of {', '.join(CODERS)}, got {coder!r}")
  declared = meta.get("symbols") or {}
  if coder == "none" or not declared or "layout" not in meta:
    return payload, meta
  sections = packing.split(payload, meta["layout"])
  done = {}
  for name, (bits, count) in declared.items():
    raw = sections.get(name)
    if raw is None or not 1 <= bits <= MAX_BITS or count == 0:
      continue
    symbols = _unpack(raw, bits, count)
    chosen = "ans" if coder == "best" else coder
    coded = encode_symbols(symbols, bits, chosen)
    if len(coded) < len(raw):
      sections[name], done[name] = coded, [chosen, bits, count]
  if not done:
    return payload, meta
  payload, layout = packing.concat(sections)
  return payload, {**meta, "layout": layout, "entropy": done}


def expand(payload: bytes, meta: dict, limit: int) -> tuple[bytes, dict]:
  """Inverse of :func:`compress`: the codec's own bytes and meta. ``limit`` bounds
  every section's symbol count (the tensor's size, say) before decoding."""
  done = meta.get("entropy")
  if done is None:
    return payload, meta
  if not isinstance(done, dict):
    raise ValueError("bad entropy record")
  sections = packing.split(payload, meta["layout"])
  for name, record in done.items():
    if not (isinstance(record, list) and len(record) == 3 and record[0] in ("huffman", "ans")
            and all(isinstance(v, int) and not isinstance(v, bool) for v in record[1:])):
      raise ValueError(f"bad entropy record for section {name!r}: {record!r}")
    coder, bits, count = record
    if not (1 <= bits <= MAX_BITS and 0 < count <= limit) or name not in sections:
      raise ValueError(f"entropy-coded section {name!r}: {count} codes of {bits} bits "
                       f"(at most {limit} allowed) or missing")
    symbols = decode_symbols(sections[name], bits, count, coder)
    sections[name] = packing.pack_codes(symbols, bits)
  payload, layout = packing.concat(sections)
  meta = {k: v for k, v in meta.items() if k != "entropy"}
  return payload, {**meta, "layout": layout}


def coded_size(coder: str):
  """``(sections, symbols) -> bytes`` after :func:`compress` with ``coder``: how
  ``export`` has ``packing.pack_sparse`` choose among its forms."""
  def size(sections: dict[str, bytes], symbols: dict) -> int:
    payload, layout = packing.concat(sections)
    return len(compress(payload, {"layout": layout, "symbols": symbols}, coder)[0])
  return size


def split_bytes(meta: dict, length: int) -> dict[str, int]:
  """Bytes of a stored tensor by role: ``indices`` (the declared code streams:
  weight codes, shared-weight indices), ``positions`` (sparse masks, relative
  indices and N:M in-group positions), ``codebook`` (codebooks, scales, zero
  points) and ``other`` (float32 values: kept weights, factors, a tensor with no
  layout)."""
  layout = meta.get("layout")
  if not isinstance(layout, dict):
    return {"other": length}
  out = dict.fromkeys(ROLES, 0)
  for name, (_, size) in layout.items():
    role = ("positions" if name in ("mask", "index", "positions") else
            "indices" if name in (meta.get("symbols") or {}) else
            "codebook" if name in ("codebook", "scale", "scales", "zero_point") else "other")
    out[role] += size
  return out


ROLES = ("indices", "positions", "codebook", "other")
