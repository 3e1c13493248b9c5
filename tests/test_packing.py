import numpy as np
import pytest

from jcompress.transforms import packing


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("signed", [True, False])
def test_codes_roundtrip_bit_exact(bits, signed):
  rng = np.random.default_rng(bits)
  lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
  codes = rng.integers(lo, hi, size=37)
  codes[:2] = lo, hi - 1  # both ends of the range
  buf = packing.pack_codes(codes, bits)
  assert len(buf) == packing.packed_size(37, bits) == -(-37 * bits // 8)
  out = packing.unpack_codes(buf, bits, 37, signed)
  assert out.dtype == packing.code_dtype(bits, signed)
  np.testing.assert_array_equal(out, codes)


def test_codes_little_endian_layout():
  assert packing.pack_codes(np.array([1, 2, 3]), 2) == bytes([0b111001])
  assert packing.pack_codes(np.array([0xABC, 0x123]), 12) == bytes([0xBC, 0x3A, 0x12])
  assert packing.pack_codes(np.array([-1, 0]), 4) == bytes([0x0F])
  assert packing.pack_codes(np.zeros(0, np.int8), 4) == b""
  assert packing.unpack_codes(b"", 4, 0, True).shape == (0,)


def test_codes_errors():
  with pytest.raises(ValueError, match="do not fit in 3 bits"):
    packing.pack_codes(np.array([8]), 3)
  with pytest.raises(ValueError, match="do not fit in 3 bits"):
    packing.pack_codes(np.array([-5]), 3)
  with pytest.raises(ValueError, match="must be integers"):
    packing.pack_codes(np.array([0.5]), 3)
  for bits in (0, 17):
    with pytest.raises(ValueError, match="bits must be an integer in 1..16"):
      packing.pack_codes(np.array([0]), bits)
  with pytest.raises(ValueError, match="cannot hold 9 codes"):
    packing.unpack_codes(bytes(2), 2, 9, False)


@pytest.mark.parametrize("n", [0, 1, 4, 5, 6, 13])
def test_trits_roundtrip(n):
  values = np.random.default_rng(n).integers(-1, 2, size=n)
  buf = packing.pack_trits(values)
  assert len(buf) == -(-n // 5)
  out = packing.unpack_trits(buf, n)
  assert out.dtype == np.int8
  np.testing.assert_array_equal(out, values)


def test_trits_layout_and_errors():
  assert packing.pack_trits(np.ones(5, int)) == bytes([242])  # 2 * (1 + 3 + 9 + 27 + 81)
  # digits v + 1, least significant first; the byte is padded with zero trits (digit 1)
  assert packing.pack_trits(np.array([-1, 0, 1])) == bytes([0 + 1 * 3 + 2 * 9 + 1 * 27 + 1 * 81])
  with pytest.raises(ValueError, match="trits must be -1, 0 or 1"):
    packing.pack_trits(np.array([2]))
  with pytest.raises(ValueError, match="not 5 packed trits"):
    packing.unpack_trits(bytes([243]), 5)
  with pytest.raises(ValueError, match="cannot hold 6 trits"):
    packing.unpack_trits(bytes([0]), 6)


def test_sections_roundtrip():
  payload, layout = packing.concat({"codes": b"abc", "scale": b"\x00" * 4})
  assert layout == {"codes": [0, 3], "scale": [3, 4]}
  assert packing.split(payload, layout) == {"codes": b"abc", "scale": b"\x00" * 4}
  with pytest.raises(ValueError, match="'scale'.*past the end"):
    packing.split(payload[:5], layout)
