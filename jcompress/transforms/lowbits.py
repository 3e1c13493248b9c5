"""Integer codes of at most 4 bits packed into uint8 host arrays and unpacked inside a
traced graph: how ``export --format stablehlo`` holds sub-byte codes (StableHLO stores
an int4 constant in a whole byte, so a packed uint8 constant is what takes 4 bits).

Codes are stored in a container of 1, 2 or 4 bits (3 bits take 4), ``8 // container``
per byte, the first code in the least significant bits; signed codes in two's
complement over the container. Wider codes stay in their own integer type.

>>> codes = np.array([[-7, 7, 0], [3, -1, 1]], np.int8)
>>> packed = pack(codes, 4)
>>> packed.dtype, packed.size, unpack(packed, 4, codes.shape, signed=True).tolist()
(dtype('uint8'), 3, [[-7, 7, 0], [3, -1, 1]])
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def container(bits: int) -> int | None:
  """The bits each code takes packed (1, 2 or 4), or None above 4 bits."""
  return next((c for c in (1, 2, 4) if bits <= c), None)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """``codes`` (any shape, C order) as a flat uint8 array, ``8 // container(bits)``
  per byte; the last byte padded with zero codes."""
  width = container(bits)
  if width is None:
    raise ValueError(f"codes of {bits} bits do not pack below a byte")
  per = 8 // width
  flat = (np.asarray(codes).astype(np.int64).reshape(-1) & ((1 << width) - 1)).astype(np.uint8)
  flat = np.pad(flat, (0, -flat.size % per)).reshape(-1, per)
  shifts = (np.arange(per) * width).astype(np.uint8)
  return np.bitwise_or.reduce(flat << shifts, axis=1).astype(np.uint8)


def unpack(packed: jax.Array, bits: int, shape: tuple[int, ...], signed: bool) -> jax.Array:
  """Inverse of :func:`pack`, in jnp (traceable): int32 codes of ``shape``."""
  width = container(bits)
  per = 8 // width
  shifts = jnp.arange(per, dtype=jnp.uint8) * width
  codes = ((jnp.asarray(packed)[:, None] >> shifts) & ((1 << width) - 1)).reshape(-1)
  codes = codes[:math.prod(shape)].astype(jnp.int32).reshape(shape)
  if signed:
    half = 1 << (width - 1)
    codes = (codes ^ half) - half
  return codes


def constant(codes: np.ndarray, bits: int, signed: bool) -> Callable[[], jax.Array]:
  """``() -> codes`` for a traced graph: unpacked from :func:`pack`'s bytes at up to
  4 bits, else ``codes`` in their own integer type."""
  codes = np.asarray(codes)
  if container(bits) is None:
    return lambda: jnp.asarray(codes)
  packed, shape = pack(codes, bits), codes.shape
  return lambda: unpack(packed, bits, shape, signed)
