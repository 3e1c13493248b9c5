"""Uniform k-bit quantization of tensors: codes, scales, zero points, fake-quant.

A tensor ``w`` becomes integer codes ``q`` with a float ``scale`` and an integer
``zero_point`` (round to nearest, ties to even), ``w ~ scale * (q - zero_point)``:

* ``symmetric``: ``zero_point = 0``, codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``
  (the restricted range, so ``-q`` is representable), ``scale = max|w| / qmax``.
* ``asymmetric``: codes in ``[0, 2^b - 1]`` over the range ``[min(w, 0), max(w, 0)]``
  (zero stays exactly representable; an all-positive tensor gets zero point 0).

Per ``tensor`` there is one scale; per ``channel`` one per output channel, the
last axis of a Flax kernel (Dense ``(in, out)``, Conv ``(kh, kw, in, out)``). The
error is at most half a step (``scale / 2``) for every weight. A tensor (or
channel) of zeros gets scale 1. The methods built on this are in
:mod:`jcompress.transforms.quantize`, integer execution in :mod:`jcompress.transforms.int8`.

>>> w = jnp.array([[-1.0, 0.5], [0.25, 2.0]])
>>> q = quantize_tensor(w, bits=4, granularity="channel")
>>> q.codes.tolist(), q.scale.shape
([[-7, 2], [2, 7]], (2,))
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.transforms import packing
from jcompress.transforms import select as sel

SCHEMES = ("symmetric", "asymmetric")
GRANULARITIES = ("tensor", "channel")
_FIELDS = ("codes", "scale", "zero_point", "bits")


class QTensor(NamedTuple):
  """A quantized tensor: ``scale * (codes - zero_point)`` approximates it.

  ``scale`` and ``zero_point`` have shape ``()`` per tensor or ``(out,)`` per
  channel; ``codes`` are int8/int16 (symmetric) or uint8/uint16 (asymmetric).
  """
  codes: jax.Array
  scale: jax.Array
  zero_point: jax.Array


def check_options(bits: int, scheme: str, granularity: str) -> None:
  """Raises ValueError naming ``--bits``, ``--scheme`` or ``--granularity``."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 16:
    raise ValueError(f"--bits must be an integer in 2..16, got {bits!r}")
  if scheme not in SCHEMES:
    raise ValueError(f"--scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
  if granularity not in GRANULARITIES:
    raise ValueError(f"--granularity must be one of {', '.join(GRANULARITIES)}, "
                     f"got {granularity!r}")


def code_range(bits: int, scheme: str) -> tuple[int, int]:
  """``(qmin, qmax)`` of the codes."""
  if scheme == "symmetric":
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
  return 0, 2 ** bits - 1


def quantize_tensor(w: jax.Array, bits: int = 8, scheme: str = "symmetric",
                    granularity: str = "tensor") -> QTensor:
  """Quantizes one tensor (round to nearest).

  Args:
    w: a float tensor; per channel needs at least one axis (the last).
    bits: code width, 2..16.
    scheme: ``symmetric`` or ``asymmetric``.
    granularity: ``tensor`` (one scale) or ``channel`` (one per last-axis entry).

  Returns:
    The :class:`QTensor`; ``dequantize_tensor`` of it is within ``scale / 2`` of ``w``.

  >>> quantize_tensor(jnp.array([0.0, 1.0, 3.0]), bits=2, scheme="asymmetric").codes.tolist()
  [0, 1, 3]
  """
  check_options(bits, scheme, granularity)
  w = jnp.asarray(w, jnp.float32)
  if granularity == "channel" and w.ndim == 0:
    raise ValueError("--granularity channel needs a tensor with an output-channel axis, "
                     "got a scalar")
  return _quantize_tensor(w, bits, scheme, granularity)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize_tensor(w, bits, scheme, granularity):
  axes = tuple(range(w.ndim - 1)) if granularity == "channel" else None
  qmin, qmax = code_range(bits, scheme)
  if scheme == "symmetric":
    amax = jnp.max(jnp.abs(w), axis=axes)
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    zero_point = jnp.zeros(scale.shape, jnp.int32)
  else:
    lo = jnp.minimum(jnp.min(w, axis=axes), 0.0)
    hi = jnp.maximum(jnp.max(w, axis=axes), 0.0)
    scale = jnp.where(hi > lo, (hi - lo) / qmax, 1.0)
    zero_point = jnp.clip(jnp.round(-lo / scale), qmin, qmax).astype(jnp.int32)
  codes = jnp.clip(jnp.round(w / scale) + zero_point, qmin, qmax)
  dtype = packing.code_dtype(bits, signed=scheme == "symmetric")
  return QTensor(codes.astype(dtype), scale.astype(jnp.float32), zero_point)


@jax.jit
def dequantize_tensor(q: QTensor) -> jax.Array:
  """``scale * (codes - zero_point)`` as float32."""
  steps = q.codes.astype(jnp.int32) - jnp.asarray(q.zero_point, jnp.int32)
  return steps.astype(jnp.float32) * q.scale


def quantize(params: Any, paths: Sequence[str], *, bits: int = 8, scheme: str = "symmetric",
             granularity: str = "tensor") -> tuple[Any, Callable[[Any], Any]]:
  """Quantizes the tensors at ``paths`` of a param pytree.

  Returns:
    ``(quantized, dequantize)``: ``quantized`` is ``params`` with each selected
    leaf replaced by its :class:`QTensor`; ``dequantize(quantized)`` gives back
    float params of the original structure.

  >>> params = {"fc1": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  >>> q, dequantize = quantize(params, ["fc1/kernel"], bits=4)
  >>> q["fc1"]["kernel"].codes.dtype, dequantize(q)["fc1"]["kernel"].shape
  (dtype('int8'), (3, 2))
  """
  flat = sel.flatten(params)
  _check_paths(flat, paths)
  out = {p: quantize_tensor(v, bits, scheme, granularity) if p in paths else v
         for p, v in flat.items()}
  return sel.unflatten(out), dequantize


def dequantize(quantized: Any) -> Any:
  """Replaces every :class:`QTensor` leaf of ``quantized`` by its float values."""
  return jax.tree.map(lambda x: dequantize_tensor(x) if isinstance(x, QTensor) else x,
                      quantized, is_leaf=lambda x: isinstance(x, QTensor))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fake_quant(w, scale, zero_point, qmin, qmax):
  q = jnp.clip(jnp.round(w / scale) + zero_point, qmin, qmax)
  return (q - zero_point) * scale


def _fake_quant_fwd(w, scale, zero_point, qmin, qmax):
  q = jnp.round(w / scale) + zero_point
  inside = (q >= qmin) & (q <= qmax)
  return (jnp.clip(q, qmin, qmax) - zero_point) * scale, (inside, scale, zero_point)


def _fake_quant_bwd(qmin, qmax, residuals, g):
  del qmin, qmax
  inside, scale, zero_point = residuals
  return jnp.where(inside, g, 0.0), jnp.zeros_like(scale), jnp.zeros_like(zero_point)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(w: jax.Array, scale: jax.Array, zero_point: jax.Array, *, bits: int,
               scheme: str = "symmetric") -> jax.Array:
  """Quantize-dequantize ``w`` with a straight-through estimator (for QAT).

  The forward value is ``dequantize_tensor`` of the codes of ``w`` under the given
  ``scale``/``zero_point``. The gradient with respect to ``w`` is the identity
  where ``w`` lies inside the clip range, i.e. its unclipped code
  ``round(w / scale) + zero_point`` is within ``[qmin, qmax]``, and zero where
  the code was clipped; ``scale`` and ``zero_point`` get no gradient (they are
  statistics of the weights, not learned).

  >>> g = jax.grad(lambda w: fake_quant(w, 0.5, 0, bits=2).sum())(jnp.array([0.3, 0.9]))
  >>> g.tolist()  # 0.9 / 0.5 rounds to 2 > qmax = 1: clipped
  [1.0, 0.0]
  """
  qmin, qmax = code_range(bits, scheme)
  return _fake_quant(jnp.asarray(w, jnp.float32), jnp.asarray(scale, jnp.float32),
                     jnp.asarray(zero_point, jnp.float32), qmin, qmax)


def _check_paths(flat: dict[str, Any], paths: Sequence[str]) -> None:
  sel.check_present(flat, paths)


def _to_state(tensors: dict[str, QTensor], bits: int) -> dict:
  flat = {}
  for path, q in tensors.items():
    flat.update({f"{path}/codes": q.codes, f"{path}/scale": q.scale,
                 f"{path}/zero_point": q.zero_point,
                 f"{path}/bits": jnp.asarray(bits, jnp.int32)})
  return sel.unflatten(flat)


def qtensors(cstate: Any) -> dict[str, QTensor]:
  """``{kernel path: QTensor}`` from the ``cstate`` of ``quantize``/``qat``."""
  flat = sel.flatten(cstate)
  paths = dict.fromkeys(p.rsplit("/", 1)[0] for p in flat)
  for path in paths:
    missing = [f for f in _FIELDS if f"{path}/{f}" not in flat]
    if missing:
      raise ValueError(f"{path}: not a quantized tensor (cstate lacks {', '.join(missing)})")
  return {p: QTensor(flat[f"{p}/codes"], flat[f"{p}/scale"], flat[f"{p}/zero_point"])
          for p in paths}
