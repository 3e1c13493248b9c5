"""Entropy-coded exports: exact round trips, smaller files, checked tables."""

import json
import struct
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import entropy, export
from jcompress.transforms import base, packing, registry


def _skewed(n, bits, seed=0):
  p = 0.5 ** np.arange(1, (1 << bits) + 1)
  return np.random.default_rng(seed).choice(1 << bits, size=n, p=p / p.sum())


@pytest.mark.parametrize("coder", ["huffman", "ans"])
@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_symbols_round_trip_exactly(coder, bits):
  symbols = _skewed(5000, bits)
  data = entropy.encode_symbols(symbols, bits, coder)
  np.testing.assert_array_equal(entropy.decode_symbols(data, bits, 5000, coder), symbols)
  entropy_bytes = -np.sum(np.log2(np.bincount(symbols)[symbols] / symbols.size)) / 8
  assert len(data) < entropy_bytes * (1.3 if coder == "huffman" else 1.05) + 4 * (1 << bits) + 40


def test_one_symbol_takes_only_its_table():
  data = entropy.encode_symbols(np.full(1000, 3), 4, "ans")
  assert len(data) == 2 + 4
  np.testing.assert_array_equal(entropy.decode_symbols(data, 4, 1000, "ans"), np.full(1000, 3))


def test_compress_keeps_raw_sections_where_coding_does_not_win():
  uniform = np.random.default_rng(0).integers(0, 16, 4000)
  payload, layout = packing.concat({"values": packing.pack_codes(uniform, 4), "scale": b"abcd"})
  meta = {"layout": layout, "symbols": {"values": [4, 4000]}}
  assert entropy.compress(payload, meta, "best") == (payload, meta)  # ~4 bits each already
  skewed = _skewed(4000, 4)
  payload, layout = packing.concat({"values": packing.pack_codes(skewed, 4), "scale": b"abcd"})
  meta = {"layout": layout, "symbols": {"values": [4, 4000]}}
  small, coded = entropy.compress(payload, meta, "best")
  assert len(small) < 0.55 * len(payload) and coded["layout"]["scale"][1] == 4  # ~2 bits
  assert entropy.expand(small, coded, limit=4000) == (payload, meta)


def test_bad_tables_and_counts_are_refused_before_decoding():
  skewed = _skewed(4000, 4)
  payload, layout = packing.concat({"values": packing.pack_codes(skewed, 4)})
  small, coded = entropy.compress(payload, {"layout": layout, "symbols": {"values": [4, 4000]}})
  with pytest.raises(ValueError, match="at most 100 allowed"):
    entropy.expand(small, coded, limit=100)
  huge = {**coded, "entropy": {"values": [coded["entropy"]["values"][0], 4, 10 ** 12]}}
  with pytest.raises(ValueError, match="at most"):
    entropy.expand(small, huge, limit=4000)
  wrong = {**coded, "entropy": {"values": [coded["entropy"]["values"][0], 4, 3999]}}
  with pytest.raises(ValueError, match="entropy table counts 4000 symbols, the meta 3999"):
    entropy.expand(small, wrong, limit=4000)
  with pytest.raises(ValueError, match="bad entropy record"):
    entropy.expand(small, {**coded, "entropy": {"values": ["zip", 4, 4000]}}, limit=4000)
  with pytest.raises(ValueError, match="--entropy must be one of"):
    entropy.compress(payload, coded, "lzma")


def _pruned_shared():
  rng = np.random.default_rng(0)
  params = {"fc": {"kernel": jnp.asarray(rng.normal(size=(300, 100)), jnp.float32),
                   "bias": jnp.zeros(100)}}
  methods = [registry.build("prune", ["fc/kernel"], sparsity="0.9"),
             registry.build("share", ["fc/kernel"], bits=5)]
  return methods, *base.stack(methods).init(params)


@pytest.mark.parametrize("coder", ["huffman", "ans", "best"])
def test_export_decodes_to_the_same_values_and_is_smaller(tmp_path, coder):
  methods, trainable, cstate = _pruned_shared()
  raw = export.save_params(tmp_path / "raw.jcm", methods, trainable, cstate, coder="none")
  coded = export.save_params(tmp_path / "c.jcm", methods, trainable, cstate, coder=coder)
  assert coded["param_bytes"] < raw["param_bytes"]
  assert sum(coded[f"{r}_bytes"] for r in entropy.ROLES) == coded["param_bytes"]
  assert coded["indices_bytes"] > 0  # positions too, unless coded in the dense stream
  _, want = export.load(tmp_path / "raw.jcm")
  header, got = export.load(tmp_path / "c.jcm")
  np.testing.assert_array_equal(got["params"]["fc"]["kernel"], want["params"]["fc"]["kernel"])
  kernel = next(e for e in header["tensors"] if e["path"] == "fc/kernel")
  assert set(kernel["meta"]["entropy"]) <= {"index", "values"}


def test_the_sparse_form_is_chosen_by_its_coded_size():
  # 4-bit codes, 92% zeros: relative indices are smallest raw, but coded, the dense
  # stream (zero a symbol of p = 0.92) beats the indices plus their fillers.
  rng = np.random.default_rng(0)
  skewed = np.minimum(_skewed(784 * 300, 4, seed=1) + 1, 15).reshape(784, 300)
  codes = np.where(rng.random((784, 300)) < 0.08, skewed, 0)
  args = (codes, codes != 0, 4, lambda v: packing.pack_codes(v, 4), True)
  sizes = {}
  for coder in ("none", "ans"):
    size = entropy.coded_size(coder)
    with packing.sized_by(size):
      sections, meta = packing.pack_sparse(*args)
    sizes[coder] = (meta["format"], size(sections, meta["symbols"]))
  raw_sections, raw_meta = packing.pack_sparse(*args)  # no sized_by: the raw sizes
  assert sizes["none"][0] == raw_meta["format"] == "relative" != sizes["ans"][0]
  assert sizes["ans"][1] < entropy.coded_size("ans")(raw_sections, raw_meta["symbols"])


def test_a_corrupt_coded_tensor_is_a_clear_error(tmp_path):
  methods, trainable, cstate = _pruned_shared()
  path = tmp_path / "c.jcm"
  export.save_params(path, methods, trainable, cstate, coder="ans")
  blob = bytearray(path.read_bytes())
  header, start = export.read_header(path)
  kernel = next(e for e in header["tensors"] if e["path"] == "fc/kernel")
  name = next(iter(kernel["meta"]["entropy"]))
  offset = start + kernel["offset"] + kernel["meta"]["layout"][name][0]
  blob[offset + 2:offset + 8] = b"\xff" * 6  # the symbol bitmap and the first count
  path.write_bytes(bytes(blob))
  with pytest.raises(ValueError, match=r"fc/kernel.*corrupt"):
    export.load(path)
  assert json.loads(json.dumps(header))  # the header itself stays readable


def test_the_header_is_compressed_and_a_zlib_bomb_is_refused(tmp_path):
  methods, trainable, cstate = _pruned_shared()
  path = tmp_path / "c.jcm"
  sizes = export.save_params(path, methods, trainable, cstate)
  blob = path.read_bytes()
  assert blob[:8] == export.MAGIC_Z
  header, start = export.read_header(path)
  assert sizes["header_bytes"] == start < len(json.dumps(header))
  bomb = zlib.compress(b" " * (export.MAX_HEADER + 10), 9)  # ~64 KB inflating past the cap
  bad = tmp_path / "bomb.jcm"
  bad.write_bytes(export.MAGIC_Z + struct.pack("<I", len(bomb)) + bomb)
  with pytest.raises(ValueError, match="inflates past"):
    export.read_header(bad)
  bad.write_bytes(export.MAGIC_Z + struct.pack("<I", 5) + b"xxxxx")
  with pytest.raises(ValueError, match=r"header is corrupt \(zlib\)"):
    export.read_header(bad)
