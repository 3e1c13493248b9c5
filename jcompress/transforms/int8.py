"""Integer execution of quantized layers: int8 x int8 products with int32 accumulation.

``--execution int8`` of the ``quantize``/``qat`` methods: inside
:func:`int8_execution`, every ``nn.Dense``/``nn.Conv`` whose kernel was quantized
to 8 symmetric bits computes from its codes, its activations quantized per
tensor on the fly.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
from flax.linen.linear import canonicalize_padding
import jax
import jax.numpy as jnp
import numpy as np  # noqa: F401  (doctests)
from jax import lax

from jcompress.transforms import registry  # noqa: F401  (doctests)
from jcompress.transforms.uniform import qtensors, quantize_tensor  # noqa: F401

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

  >>> m = registry.build("quantize", ["kernel"])  # a lone Dense: its kernel path is "kernel"
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
