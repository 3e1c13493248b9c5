"""Uniform k-bit weight quantization: post-training (``quantize``), quantization-aware
training (``qat``), int8 integer execution and export payloads.

A tensor ``w`` becomes integer codes ``q`` with a float ``scale`` and an integer
``zero_point`` (round to nearest, ties to even), ``w ~ scale * (q - zero_point)``:

* ``symmetric``: ``zero_point = 0``, codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``
  (the restricted range, so ``-q`` is representable), ``scale = max|w| / qmax``.
* ``asymmetric``: codes in ``[0, 2^b - 1]`` over the range ``[min(w, 0), max(w, 0)]``
  (zero stays exactly representable; an all-positive tensor gets zero point 0).

Per ``tensor`` there is one scale; per ``channel`` one per output channel, the
last axis of a Flax kernel (Dense ``(in, out)``, Conv ``(kh, kw, in, out)``). The
error is at most half a step (``scale / 2``) for every weight. A tensor (or
channel) of zeros gets scale 1.

Methods (``jcompress compress --method quantize|qat --bits B``):

* ``quantize`` (post-training): ``init`` stores codes in ``cstate``; ``apply``
  gives the model their dequantized values. Fine-tuning with it is a no-op for the
  selected tensors: ``optimizer`` freezes their (unused) float copies in
  ``trainable`` and only the rest trains (biases, batch norm, other layers).
* ``qat``: ``trainable`` keeps full-precision latent kernels; ``apply``
  fake-quantizes them with the scales in ``cstate`` and a straight-through
  estimator, and ``update`` re-quantizes ``cstate`` from the new latent weights
  after every optimizer step (so ``cstate`` always holds the codes to export).

Both methods' ``cstate`` maps each selected kernel path to ``{"codes", "scale",
"zero_point", "bits"}``, which is what :func:`int8_execution` and
:func:`export_arrays` read.

>>> w = jnp.array([[-1.0, 0.5], [0.25, 2.0]])
>>> q = quantize_tensor(w, bits=4, granularity="channel")
>>> q.codes.tolist(), q.scale.shape
([[-7, 2], [2, 7]], (2,))
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import flax.linen as nn
from flax.linen.linear import canonicalize_padding
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jcompress.transforms import base, packing
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


# --- Methods ---------------------------------------------------------------------

BITS = base.Option("bits", int, 8, "bits per weight code, 2..16")
SCHEME = base.Option("scheme", str, "symmetric",
                     "symmetric (zero point 0) or asymmetric (min/max range)", SCHEMES)
GRANULARITY = base.Option("granularity", str, "tensor",
                          "one scale per tensor or per output channel (last axis)",
                          GRANULARITIES)


def _check_paths(flat: dict[str, Any], paths: Sequence[str]) -> None:
  missing = [p for p in paths if p not in flat]
  if missing:
    raise ValueError(f"selected parameter paths not in the params: {', '.join(missing)}")


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


def _factory(paths: list[str], bits: int, scheme: str, granularity: str, *,
             qat: bool) -> base.Method:
  check_options(bits, scheme, granularity)
  chosen = list(paths)

  def quantize_all(flat):
    return {p: quantize_tensor(flat[p], bits, scheme, granularity) for p in chosen}

  def init(params):
    flat = sel.flatten(params)
    _check_paths(flat, chosen)
    return params, _to_state(quantize_all(flat), bits)

  def apply(trainable, cstate):
    flat = sel.flatten(trainable)
    qs = qtensors(cstate)
    if qat:
      flat.update({p: fake_quant(flat[p], qs[p].scale, qs[p].zero_point, bits=bits,
                                 scheme=scheme) for p in chosen})
    else:
      flat.update({p: dequantize_tensor(qs[p]) for p in chosen})
    return sel.unflatten(flat)

  def update(trainable, cstate, step):
    del step
    if not qat:
      return trainable, cstate
    return trainable, _to_state(quantize_all(sel.flatten(trainable)), bits)

  def optimizer(trainable, base_tx):
    if qat:
      return base_tx
    labels = sel.unflatten({p: "frozen" if p in chosen else "base" for p in sel.flatten(trainable)})
    return optax.partition({"base": base_tx, "frozen": optax.set_to_zero()}, labels)

  def bits_fn(trainable, cstate):
    del trainable, cstate
    return {p: float(bits) for p in chosen}

  return base.Method("qat" if qat else "quantize", init, apply, update, optimizer, bits_fn)


@base.register("quantize", BITS, SCHEME, GRANULARITY,
               help="post-training uniform k-bit weight quantization (codes frozen)")
def quantize_method(paths: list[str], *, bits: int = 8, scheme: str = "symmetric",
                    granularity: str = "tensor") -> base.Method:
  """Post-training quantization of the kernels at ``paths``.

  >>> m = base.build("quantize", ["fc1/kernel"], bits=4)
  >>> trainable, cstate = m.init({"fc1": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}})
  >>> cstate["fc1"]["kernel"]["codes"].tolist(), m.bits(trainable, cstate)
  ([[7, 7], [7, 7], [7, 7]], {'fc1/kernel': 4.0})
  """
  return _factory(paths, bits, scheme, granularity, qat=False)


@base.register("qat", BITS, SCHEME, GRANULARITY,
               help="quantization-aware training: fake-quant with a straight-through estimator")
def qat_method(paths: list[str], *, bits: int = 8, scheme: str = "symmetric",
               granularity: str = "tensor") -> base.Method:
  """Quantization-aware training of the kernels at ``paths`` (see :func:`fake_quant`).

  >>> m = base.build("qat", ["fc1/kernel"], bits=4)
  >>> trainable, cstate = m.init({"fc1": {"kernel": jnp.ones((3, 2))}})
  >>> m.apply(trainable, cstate)["fc1"]["kernel"].shape
  (3, 2)
  """
  return _factory(paths, bits, scheme, granularity, qat=True)


# --- Integer execution -----------------------------------------------------------

def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Dynamic per-tensor symmetric int8 quantization: ``(x_int8, scale)``, ``x ~ scale * x_int8``."""
  amax = jnp.max(jnp.abs(x))
  scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
  return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def _check_int8(codes: jax.Array) -> None:
  if codes.dtype != jnp.int8:
    raise ValueError(f"integer execution needs int8 codes (--scheme symmetric, --bits <= 8), "
                     f"got {codes.dtype}")


def int8_dense(x: jax.Array, codes: jax.Array, scale: jax.Array,
               bias: jax.Array | None = None) -> jax.Array:
  """``x @ w + bias`` as int8 x int8 with int32 accumulation.

  ``x`` is quantized per tensor on the fly; the int32 result is rescaled by
  ``scale_x * scale`` (``scale`` per tensor or per output channel).

  >>> q = quantize_tensor(jnp.eye(3), bits=8)
  >>> y = int8_dense(jnp.array([[1.0, -2.0, 0.5]]), q.codes, q.scale)
  >>> np.round(np.asarray(y, np.float64), 3).tolist()  # activations rounded to 8 bits
  [[1.008, -2.0, 0.504]]
  """
  _check_int8(codes)
  x8, x_scale = quantize_activations(x)
  acc = lax.dot_general(x8, codes, (((x.ndim - 1,), (0,)), ((), ())),
                        preferred_element_type=jnp.int32)
  y = acc.astype(jnp.float32) * (x_scale * scale)
  return y if bias is None else y + bias


def _conv_dims(ndim: int) -> lax.ConvDimensionNumbers:
  # Channels-last input/output and (*spatial, in, out) kernels, as Flax lays them out.
  spatial = tuple(range(1, ndim - 1))
  return lax.ConvDimensionNumbers((0, ndim - 1) + spatial, (ndim - 1, ndim - 2)
                                  + tuple(range(ndim - 2)), (0, ndim - 1) + spatial)


def int8_conv(x: jax.Array, codes: jax.Array, scale: jax.Array, bias: jax.Array | None = None,
              *, strides: Sequence[int] | None = None,
              padding: str | Sequence[tuple[int, int]] = "SAME",
              input_dilation: Sequence[int] | None = None,
              kernel_dilation: Sequence[int] | None = None,
              feature_group_count: int = 1) -> jax.Array:
  """An N-d convolution (``x``: ``(batch, *spatial, in)``, codes ``(*window, in/groups,
  out)``) as int8 x int8 with int32 accumulation, like ``nn.Conv``.

  >>> q = quantize_tensor(jnp.ones((1, 1, 1, 2)), bits=8)
  >>> int8_conv(jnp.ones((1, 2, 2, 1)), q.codes, q.scale).shape
  (1, 2, 2, 2)
  """
  _check_int8(codes)
  x8, x_scale = quantize_activations(x)
  acc = lax.conv_general_dilated(
      x8, codes, window_strides=strides or (1,) * (x.ndim - 2), padding=padding,
      lhs_dilation=input_dilation, rhs_dilation=kernel_dilation,
      dimension_numbers=_conv_dims(x.ndim), feature_group_count=feature_group_count,
      preferred_element_type=jnp.int32)
  y = acc.astype(jnp.float32) * (x_scale * scale)
  return y if bias is None else y + bias


def _conv_options(module: nn.Conv, x: jax.Array, path: str) -> dict:
  size = module.kernel_size
  n = 1 if isinstance(size, int) else len(size)

  def per_axis(v):
    return (1,) * n if v is None else (v,) * n if isinstance(v, int) else tuple(v)

  padding = canonicalize_padding(module.padding, n)
  if isinstance(padding, str) and padding not in ("SAME", "VALID"):
    raise ValueError(f"{path}: integer execution supports SAME, VALID or explicit padding, "
                     f"not {padding}")
  if module.mask is not None:
    raise ValueError(f"{path}: integer execution does not support a conv mask")
  if x.ndim != n + 2:
    raise ValueError(f"{path}: integer execution needs inputs (batch, *spatial, channels), "
                     f"got shape {x.shape}")
  return dict(strides=per_axis(module.strides), padding=padding,
              input_dilation=per_axis(module.input_dilation),
              kernel_dilation=per_axis(module.kernel_dilation),
              feature_group_count=module.feature_group_count)


@contextlib.contextmanager
def int8_execution(cstate: Any) -> Iterator[None]:
  """Runs the quantized ``nn.Dense``/``nn.Conv`` layers of any Flax model in int8.

  Inside the context, a Dense or Conv module whose ``<module path>/kernel`` is in
  ``cstate`` (of the ``quantize``/``qat`` methods, int8 codes) computes
  :func:`int8_dense`/:func:`int8_conv` from the codes and its own bias instead of
  its float kernel; other modules run unchanged. It acts at trace time: enter it
  around the ``model.apply`` call, or inside the function you ``jax.jit``.
  Against the weight-only (dequantized float) forward, only the activations'
  8-bit rounding differs (see the tests for the tolerance).

  >>> m = base.build("quantize", ["kernel"])  # a lone Dense: its kernel path is "kernel"
  >>> trainable, cstate = m.init({"kernel": jnp.eye(2), "bias": jnp.ones(2)})
  >>> with int8_execution(cstate):
  ...   y = nn.Dense(2).apply({"params": m.apply(trainable, cstate)}, jnp.ones((1, 2)))
  >>> y.tolist()
  [[2.0, 2.0]]

  Raises:
    ValueError: a tensor's codes are not int8, or a conv uses options the integer
      path does not support (the message names the path).
  """
  qs = qtensors(cstate)
  for path, q in qs.items():
    if q.codes.dtype != jnp.int8:
      raise ValueError(f"{path}: integer execution needs int8 codes (--scheme symmetric, "
                       f"--bits <= 8), got {q.codes.dtype}")

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv))
        or module.is_initializing()):
      return next_fun(*args, **kwargs)
    path = "/".join((*module.path, "kernel"))
    if path not in qs:
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    bias = module.get_variable("params", "bias") if module.use_bias else None
    if isinstance(module, nn.Dense):
      return int8_dense(x, qs[path].codes, qs[path].scale, bias)
    return int8_conv(x, qs[path].codes, qs[path].scale, bias, **_conv_options(module, x, path))

  with nn.intercept_methods(interceptor):
    yield


# --- Export ----------------------------------------------------------------------

def export_arrays(trainable: Any, cstate: Any, masks: dict[str, Any] | None = None
                  ) -> dict[str, tuple[bytes, dict]]:
  """The bytes to store per quantized tensor of ``quantize``/``qat``.

  Each payload holds the codes packed at ``bits`` bits (:func:`packing.pack_codes`),
  the float32 little-endian scales and, for ``asymmetric``, the zero points packed
  at ``bits`` bits unsigned. The meta dict (JSON-able) gives the shape, ``bits``,
  ``scheme`` and the byte ``layout`` of these sections.

  With ``masks`` (``{path: bool array}`` of an earlier pruning step), a
  symmetric tensor stores only its kept codes, with their positions as a bitmask
  or relative indices (:func:`packing.pack_sparse`, whichever is smallest; meta
  ``format``): pruned and quantized in one encoding, as Deep Compression stores
  them. Asymmetric tensors keep dense codes (a pruned weight's code is its
  channel's zero point, not 0).

  >>> m = base.build("quantize", ["w"], bits=4)
  >>> out = export_arrays(*m.init({"w": jnp.ones((5, 2))}))
  >>> len(out["w"][0]), out["w"][1]["layout"]
  (9, {'codes': [0, 5], 'scale': [5, 4]})
  """
  del trainable  # the codes of both methods live in cstate
  out = {}
  flat = sel.flatten(cstate)
  for path, q in qtensors(cstate).items():
    bits = int(flat[f"{path}/bits"])
    codes = np.asarray(q.codes)
    signed = np.issubdtype(codes.dtype, np.signedinteger)
    sparse = {}
    if signed and masks is not None and path in masks:
      code_sections, sparse = packing.pack_sparse(
          codes, np.asarray(masks[path]), bits, lambda v, b=bits: packing.pack_codes(v, b))
    else:
      code_sections = {"codes": packing.pack_codes(codes, bits)}
    sections = {**code_sections, "scale": np.asarray(q.scale, "<f4").tobytes()}
    if not signed:
      sections["zero_point"] = packing.pack_codes(np.asarray(q.zero_point), bits)
    payload, layout = packing.concat(sections)
    out[path] = payload, {"shape": list(codes.shape), "bits": bits,
                          "scheme": "symmetric" if signed else "asymmetric",
                          "channels": int(np.size(q.scale)) if np.ndim(q.scale) else 0,
                          "layout": layout, **sparse}
  return out


def import_arrays(exported: dict[str, tuple[bytes, dict]]) -> dict[str, jax.Array]:
  """Inverse of :func:`export_arrays`: ``{path: dequantized kernel}``, bit-identical to
  the kernels ``apply`` gives the model."""
  out = {}
  for path, (payload, meta) in exported.items():
    parts = packing.split(payload, meta["layout"])
    shape, bits, signed = tuple(meta["shape"]), meta["bits"], meta["scheme"] == "symmetric"
    scale_shape = (meta["channels"],) if meta["channels"] else ()
    n = int(np.prod(shape))
    if "format" in meta:  # pruned, then quantized: kept codes and their positions
      codes = packing.unpack_sparse(parts, meta, n, packing.code_dtype(bits, True),
                                    lambda buf, k: packing.unpack_codes(buf, bits, k, True))
    else:
      codes = packing.unpack_codes(parts["codes"], bits, n, signed)
    scale = np.frombuffer(parts["scale"], "<f4").reshape(scale_shape)
    zero_point = (np.zeros(scale_shape, np.int32) if signed else packing.unpack_codes(
        parts["zero_point"], bits, int(np.prod(scale_shape)), False).astype(np.int32)
        .reshape(scale_shape))
    out[path] = dequantize_tensor(QTensor(jnp.asarray(codes.reshape(shape)),
                                          jnp.asarray(scale), jnp.asarray(zero_point)))
  return out
