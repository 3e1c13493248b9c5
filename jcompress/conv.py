"""Dense 2D convolution with a matrix-product input gradient on CPU.

XLA:CPU computes a dense convolution's input gradient (a convolution of the
output gradient with the flipped kernel) slowly when the conv widens the
channels, more slowly than the same work as one matrix product. Batch 128, one
thread, ms (min of 5 runs on the shared 2-core machine), XLA's input gradient vs
``g @ kernel^T`` and an overlap-add (:func:`_input_grad`):

* 5x5, 12x12, 20 -> 50 channels (LeNet-5's ``conv2``): 102 vs 48; 16 -> 50: 64 vs 27;
* 5x5, 28x28, 1 -> 20: 84 vs 30; 3x3, 32x32, 3 -> 32: 71 vs 28;
* 5x5, 16x16, 8 -> 16: 35 vs 33 (a tie);
* 5x5, 16x16, 16 -> 16: 23 vs 56; 20 -> 20: 58 vs 164; 3x3, 32 -> 32: 23 vs 44.

Hence the rule: the matmul input gradient for convs with C_out >= 2 C_in, XLA's
for the rest. In LeNet-5's train step it saves 10-15% of the step's CPU time
(alternated with XLA's gradient in one process). Kernel gradients as a patch
matmul were also 2-4x faster in isolation for C_in = 1 (and slower from C_in = 20
up), but slower inside the train step, where materializing the patches costs
more than XLA's convolution; they stay XLA's.

:func:`conv_general_dilated` is a drop-in for ``lax.conv_general_dilated``: pass
it as ``nn.Conv(..., conv_general_dilated=conv_general_dilated)``, so the module,
its ``kernel``/``bias`` parameters (checkpoints) and everything that recognizes
``nn.Conv`` (``jcompress.cost``, quantization, Tucker, sparse execution) stay as
they are. With ``impl`` resolving to ``"shifted"`` (CPU; see
:func:`jcompress.layers.resolve_impl`), a 2D NHWC/HWIO convolution with unit
strides and dilations, one group, non-negative padding and C_out >= 2 C_in runs
XLA's convolution forward under a ``jax.custom_vjp`` whose input gradient is
:func:`_input_grad` and whose kernel gradient is XLA's. Every other convolution,
and every other backend, is ``lax.conv_general_dilated``. The custom gradient
supports ``jit``, ``vmap`` and reverse-mode autodiff, not forward mode
(``jax.jvp``); use ``impl="xla"`` there.

3D convolutions (NDHWC/DHWIO, e.g. ``c3d``) are slower still on XLA:CPU, which
has no fast 3D kernel: 5x5 spatial, 3 frames, batch 128, two threads, ms (XLA's
3D conv vs the lowering below): 1 -> 8 channels on 8x32x32 clips 447 vs 38,
8 -> 16 on 6x14x14 51 vs 11, 4 -> 4 60 vs 7. With ``impl`` resolving to
``"shifted"``, a 3D conv with unit temporal stride, no dilation and one group is
computed by 2D convs over the frames (batch and output frames folded into one
axis): with ``kt C_in <= 16`` the ``kt`` temporal taps are stacked on the
channels (one 2D conv, ``kt C_in -> C_out``), otherwise each tap is its own 2D
conv and the ``kt`` results are summed; the 2D convs are this module's, so they
get its gradients. Stacking wider channels is slower (8 -> 16 stacked: 97 ms),
as XLA hands 2D convs with more than 16 channels to another kernel.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jcompress.layers import resolve_impl

Pads = tuple[tuple[int, int], tuple[int, int]]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
_DIMENSION_NUMBERS_3D = ("NDHWC", "DHWIO", "NDHWC")


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None, *, impl: str = "auto") -> jax.Array:
  """``lax.conv_general_dilated`` with a matrix-product input gradient for eligible CPU convs.

  Same arguments and result as ``lax.conv_general_dilated``; see the module
  docstring for which convolutions get the custom gradient.

  Args:
    lhs: the input.
    rhs: the kernel.
    window_strides: as in ``lax.conv_general_dilated``.
    padding: as in ``lax.conv_general_dilated``.
    lhs_dilation: as in ``lax.conv_general_dilated``.
    rhs_dilation: as in ``lax.conv_general_dilated``.
    dimension_numbers: as in ``lax.conv_general_dilated``.
    feature_group_count: as in ``lax.conv_general_dilated``.
    batch_group_count: as in ``lax.conv_general_dilated``.
    precision: as in ``lax.conv_general_dilated``.
    preferred_element_type: as in ``lax.conv_general_dilated``.
    impl: ``"auto"``, ``"shifted"`` or ``"xla"`` (see :func:`jcompress.layers.resolve_impl`).

  Returns:
    The convolution's output.

  Example:
    >>> x, k = jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 2))
    >>> loss = lambda x: conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=(
    ...     "NHWC", "HWIO", "NHWC"), impl="shifted").sum()
    >>> jax.grad(loss)(x)[0, :, :, 0]
    Array([[2., 4., 4., 2.],
           [4., 8., 8., 4.],
           [4., 8., 8., 4.],
           [2., 4., 4., 2.]], dtype=float32)
  """
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
          feature_group_count, batch_group_count, precision, preferred_element_type)
  if resolve_impl(impl) != "shifted":
    return lax.conv_general_dilated(*args)
  pads3 = _eligible_3d_pads(*args)
  if pads3 is not None:
    return _conv3d_as_2d(lhs, rhs, tuple(window_strides[1:]), pads3)
  pads = _eligible_pads(*args)
  if pads is None:
    return lax.conv_general_dilated(*args)
  return _conv(lhs, rhs, pads)


def _eligible_pads(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                   padding: str | Sequence[tuple[int, int]],
                   lhs_dilation: Sequence[int] | None, rhs_dilation: Sequence[int] | None,
                   dimension_numbers: Any, feature_group_count: int, batch_group_count: int,
                   precision: Any, preferred_element_type: Any) -> Pads | None:
  """The explicit pads of a conv that gets the matmul input gradient, else None."""
  if lhs.ndim != 4 or rhs.ndim != 4 or dimension_numbers is None:
    return None
  ones = (1, 1)
  if (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSION_NUMBERS)
      or tuple(window_strides) != ones or tuple(lhs_dilation or ones) != ones
      or tuple(rhs_dilation or ones) != ones or feature_group_count != 1
      or batch_group_count != 1 or precision is not None or preferred_element_type is not None
      or rhs.shape[3] < 2 * rhs.shape[2]):
    return None
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], ones, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return pads if min(min(p) for p in pads) >= 0 else None


def _eligible_3d_pads(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                      padding: str | Sequence[tuple[int, int]],
                      lhs_dilation: Sequence[int] | None, rhs_dilation: Sequence[int] | None,
                      dimension_numbers: Any, feature_group_count: int, batch_group_count: int,
                      precision: Any, preferred_element_type: Any
                      ) -> tuple[tuple[int, int], ...] | None:
  """The explicit (T, H, W) pads of a 3D conv that runs as 2D convs, else None."""
  if lhs.ndim != 5 or rhs.ndim != 5 or dimension_numbers is None:
    return None
  ones = (1, 1, 1)
  if (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSION_NUMBERS_3D)
      or window_strides[0] != 1 or tuple(lhs_dilation or ones) != ones
      or tuple(rhs_dilation or ones) != ones or feature_group_count != 1
      or batch_group_count != 1 or precision is not None or preferred_element_type is not None):
    return None
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:4], rhs.shape[:3], window_strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return pads if min(pads[0]) >= 0 else None


def _conv3d_as_2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                  pads: tuple[tuple[int, int], ...]) -> jax.Array:
  """A stride-1-in-time NDHWC/DHWIO conv as 2D convs over the frames."""
  x = jnp.pad(x, ((0, 0), pads[0], (0, 0), (0, 0), (0, 0)))
  kt, kh, kw, c, o = kernel.shape
  n, frames = x.shape[:2]
  out = frames - kt + 1
  conv2d = functools.partial(conv_general_dilated, window_strides=strides, padding=pads[1:],
                             dimension_numbers=_DIMENSION_NUMBERS)
  window = lambda d: x[:, d:d + out].reshape(n * out, *x.shape[2:])  # noqa: E731
  if kt * c <= 16:
    stacked = jnp.concatenate([window(d) for d in range(kt)], axis=-1)
    y = conv2d(stacked, kernel.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * c, o))
  else:
    y = functools.reduce(operator.add, (conv2d(window(d), kernel[d]) for d in range(kt)))
  return y.reshape(n, out, *y.shape[1:])


def _acc_dtype(*arrays: jax.Array) -> jnp.dtype:
  """Accumulates in at least float32, as XLA's convolution does."""
  return jnp.result_type(*(a.dtype for a in arrays), jnp.float32)


def _xla_conv(x: jax.Array, kernel: jax.Array, pads: Pads) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=_DIMENSION_NUMBERS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: jax.Array, kernel: jax.Array, pads: Pads) -> jax.Array:
  """XLA's stride-1 NHWC/HWIO conv, with the input gradient of :func:`_input_grad`."""
  return _xla_conv(x, kernel, pads)


def _conv_fwd(x: jax.Array, kernel: jax.Array, pads: Pads
              ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  return _conv(x, kernel, pads), (x, kernel)


def _conv_bwd(pads: Pads, residuals: tuple[jax.Array, jax.Array],
              g: jax.Array) -> tuple[jax.Array, jax.Array]:
  x, kernel = residuals
  dk, = jax.linear_transpose(lambda k: _xla_conv(x, k, pads), kernel)(g)  # XLA's own
  return _input_grad(g, kernel, pads, x.shape[1:3]).astype(x.dtype), dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def _input_grad(g: jax.Array, kernel: jax.Array, pads: Pads, in_hw: Sequence[int]) -> jax.Array:
  """Input gradient: per output pixel ``g @ kernel^T`` gives its kh * kw input taps,
  which are overlap-added into the padded input's gradient and cropped."""
  acc = _acc_dtype(g, kernel)
  kh, kw, c, o = kernel.shape
  n, ho, wo, _ = g.shape
  taps = jnp.dot(g.reshape(-1, o).astype(acc), kernel.reshape(-1, o).T.astype(acc))
  taps = taps.reshape(n, ho, wo, kh, kw, c)
  dxp = jnp.zeros((n, ho + kh - 1, wo + kw - 1, c), acc)
  for i in range(kh):
    # Kernel row i: overlap-add along W, then add into padded rows i .. i + ho - 1.
    row = functools.reduce(operator.add, (
        jnp.pad(taps[:, :, :, i, j], ((0, 0), (0, 0), (j, kw - 1 - j), (0, 0)))
        for j in range(kw)))
    start = (0, i, 0, 0)
    dxp = lax.dynamic_update_slice(dxp, lax.dynamic_slice(dxp, start, row.shape) + row, start)
  (lo_h, _), (lo_w, _) = pads
  return dxp[:, lo_h:lo_h + in_hw[0], lo_w:lo_w + in_hw[1]]
