"""Shared building blocks used by several model families.

Depthwise and grouped convolution. XLA:CPU lowers convolutions with
``feature_group_count > 1`` to a slow generic loop: on 128x8x8x184 a 5x5
depthwise conv takes 100-140 ms forward and 450-600 ms forward+backward on 2
cores, and a grouped conv's gradient can take seconds (``benchmarks/depthwise.py``).
On CPU we therefore compute them differently:

* depthwise (one input channel per group): a sum of ``kh * kw`` shifted, strided
  slices of the padded input times one kernel tap each, which XLA fuses into a
  single vectorized loop; a ``jax.custom_vjp`` computes the input gradient as
  another shifted sum (polyphase for strides > 1, so no multiplications by
  inserted zeros) and the kernel gradient as one multi-output reduction over
  cache-sized batch tiles;
* grouped with several input channels per group: one dense convolution per
  group, which XLA:CPU (and its autodiff) runs at dense-conv speed.

Max pooling. XLA:CPU differentiates ``nn.max_pool`` (a ``reduce_window``) with
``select_and_scatter``, ~60 ms of LeNet-5's train step at batch 128 on one
thread. On CPU :func:`max_pool` computes non-overlapping windows (stride equal to
the window, ``VALID`` padding) as a reshape and a max over the window axes, and
its ``jax.custom_vjp`` routes each window's gradient to the first maximum in
row-major window order, as ``select_and_scatter`` does: a few compares and selects.

Elsewhere XLA's own grouped convolution and pooling are the right choice, so
``impl="auto"`` picks by ``jax.default_backend()`` at trace time (see
:func:`resolve_impl`); ``jcompress.conv`` does the same for dense convolutions.

When the shifted sum's only consumer is a sum reduction (a toy loss like
``jnp.sum(y * t)``), XLA:CPU's YNNPACK fusion pulls the sum into the reduction
and materializes every slice, ~10x slower; batch norm or a nonlinearity in
between, as in real networks, avoids it. Benchmark with ``jax.vjp`` instead.
"""

from __future__ import annotations

import functools
import itertools
import operator
import os
from typing import Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPL_ENV = "JCOMPRESS_DEPTHWISE_IMPL"
IMPLS = ("auto", "shifted", "xla")
Padding = Union[str, Sequence[tuple[int, int]]]
Pads = tuple[tuple[int, int], tuple[int, int]]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# Batch tile of the kernel-gradient reduction: small enough that a tile of
# activations stays in cache across the kh * kw products (measured ~2x faster
# than one reduction over the whole batch on 128x8x8x184).
_KERNEL_GRAD_TILE = 8


def resolve_impl(impl: str = "auto") -> str:
  """Resolves an implementation name to ``"shifted"`` (the CPU paths) or ``"xla"``.

  An explicit ``"shifted"`` or ``"xla"`` wins. ``"auto"`` defers to the
  ``JCOMPRESS_DEPTHWISE_IMPL`` environment variable when it is set to one of
  those, else picks ``"shifted"`` when ``jax.default_backend()`` is ``"cpu"``
  and ``"xla"`` on GPU/TPU. This runs at trace time: changing the variable
  does not retrace functions that are already jitted.

  Args:
    impl: ``"auto"``, ``"shifted"`` or ``"xla"``.

  Returns:
    ``"shifted"`` or ``"xla"``.

  Example:
    >>> resolve_impl("xla")
    'xla'
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  env = os.environ.get(IMPL_ENV, "auto")
  if env not in IMPLS:
    raise ValueError(f"{IMPL_ENV} must be one of {IMPLS}, got {env!r}")
  if env != "auto":
    return env
  return "shifted" if jax.default_backend() == "cpu" else "xla"


def depthwise_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
                   padding: Padding = "SAME", impl: str = "auto") -> jax.Array:
  """Depthwise 2D convolution of NHWC ``x`` with an HWIO kernel of shape (kh, kw, 1, C).

  Equal to ``lax.conv_general_dilated(..., feature_group_count=C)``; see the
  module docstring for how ``impl`` picks the computation. The ``"shifted"``
  path supports reverse-mode autodiff (``jax.grad``, ``jax.vjp``), ``jit`` and
  ``vmap``, not forward mode (``jax.jvp``, ``jax.jacfwd``): use ``"xla"`` there.

  Args:
    x: input of shape (N, H, W, C).
    kernel: kernel of shape (kh, kw, 1, C).
    strides: (stride_h, stride_w).
    padding: ``"SAME"``, ``"SAME_LOWER"``, ``"VALID"`` or ((lo_h, hi_h), (lo_w, hi_w)).
    impl: ``"auto"``, ``"shifted"`` or ``"xla"`` (see :func:`resolve_impl`).

  Returns:
    The output of shape (N, H_out, W_out, C).

  Example:
    >>> x = jnp.ones((2, 5, 5, 3))
    >>> depthwise_conv(x, jnp.ones((3, 3, 1, 3)), (2, 2), impl="shifted")[0, :, :, 0]
    Array([[4., 6., 4.],
           [6., 9., 6.],
           [4., 6., 4.]], dtype=float32)
  """
  _check_input(x)
  c = x.shape[-1]
  if kernel.ndim != 4 or kernel.shape[2:] != (1, c):
    raise ValueError(
        f"kernel must have shape (kh, kw, 1, {c}) for input {x.shape}, got {kernel.shape}")
  return grouped_conv(x, kernel, c, strides, padding, impl)


def grouped_conv(x: jax.Array, kernel: jax.Array, groups: int, strides: Sequence[int] = (1, 1),
                 padding: Padding = "SAME", impl: str = "auto") -> jax.Array:
  """Grouped 2D convolution of NHWC ``x`` with an HWIO kernel (kh, kw, C / groups, C_out).

  Equal to ``lax.conv_general_dilated(..., feature_group_count=groups)``. With
  ``impl`` resolving to ``"shifted"``: when every group has one input channel
  (depthwise, with channel multiplier ``C_out / C``) the shifted-slice
  depthwise path of :func:`depthwise_conv`; otherwise one dense convolution
  per group, concatenated.

  Args:
    x: input of shape (N, H, W, C).
    kernel: kernel of shape (kh, kw, C // groups, C_out), C_out divisible by ``groups``.
    groups: number of groups, dividing C.
    strides: (stride_h, stride_w).
    padding: ``"SAME"``, ``"SAME_LOWER"``, ``"VALID"`` or ((lo_h, hi_h), (lo_w, hi_w)).
    impl: ``"auto"``, ``"shifted"`` or ``"xla"`` (see :func:`resolve_impl`).

  Returns:
    The output of shape (N, H_out, W_out, C_out).

  Example:
    >>> x = jnp.ones((2, 8, 8, 4))
    >>> grouped_conv(x, jnp.ones((3, 3, 2, 6)), groups=2, impl="shifted").shape
    (2, 8, 8, 6)
  """
  _check_input(x)
  c = x.shape[-1]
  if groups < 1 or c % groups:
    raise ValueError(f"groups={groups} must be a positive divisor of the {c} input channels")
  if kernel.ndim != 4 or kernel.shape[2] * groups != c or kernel.shape[3] % groups:
    raise ValueError(f"kernel must have shape (kh, kw, {c // groups}, a multiple of {groups}) "
                     f"for input {x.shape} and groups={groups}, got {kernel.shape}")
  strides = _check_strides(strides)
  pads = _explicit_pads(padding, x.shape[1:3], kernel.shape[:2], strides)
  if resolve_impl(impl) == "xla":
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DIMENSION_NUMBERS,
                                    feature_group_count=groups)
  if groups == c:
    multiplier = kernel.shape[3] // c
    x = jnp.repeat(x, multiplier, axis=-1) if multiplier > 1 else x
    return _depthwise_shifted(x, kernel, strides, pads)
  x_groups, kernel_groups = jnp.split(x, groups, axis=-1), jnp.split(kernel, groups, axis=-1)
  return jnp.concatenate([
      lax.conv_general_dilated(xg, kg, strides, pads, dimension_numbers=_DIMENSION_NUMBERS)
      for xg, kg in zip(x_groups, kernel_groups)], axis=-1)


def max_pool(x: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding: Padding = "VALID", impl: str = "auto") -> jax.Array:
  """Max pooling of (N, *spatial, C) ``x``, equal to ``nn.max_pool`` in values and gradients.

  With ``impl`` resolving to ``"shifted"`` (CPU), non-overlapping windows
  (``strides`` equal to ``window_shape``, ``VALID`` padding; trailing rows that
  fill no window are dropped, as ``nn.max_pool`` does) are a reshape and a max
  over the window axes, differentiated by a ``jax.custom_vjp`` that gives each
  window's gradient to its first maximum in row-major window order, like
  ``nn.max_pool``'s ``select_and_scatter``; a window holding a NaN gets no
  gradient. That path supports ``jit``, ``vmap`` and reverse-mode autodiff, not
  forward mode (use ``impl="xla"`` there). Everything else is ``nn.max_pool``.

  Args:
    x: input of shape (N, *spatial, C), one spatial axis per window axis.
    window_shape: the window size per spatial axis.
    strides: the stride per spatial axis; None means 1, as in ``nn.max_pool``.
    padding: ``"SAME"``, ``"VALID"`` or one (lo, hi) pair per spatial axis.
    impl: ``"auto"``, ``"shifted"`` or ``"xla"`` (see :func:`resolve_impl`).

  Returns:
    The pooled array of shape (N, *spatial_out, C).

  Example:
    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> max_pool(x, (2, 2), strides=(2, 2), impl="shifted")[0, :, :, 0]
    Array([[ 5.,  7.],
           [13., 15.]], dtype=float32)
  """
  window = tuple(int(w) for w in window_shape)
  if strides is None:
    strides = (1,) * len(window)
  no_padding = padding == "VALID" or (not isinstance(padding, str)
                                      and all(tuple(p) == (0, 0) for p in padding))
  if (resolve_impl(impl) == "xla" or tuple(strides) != window or not no_padding
      or x.ndim != len(window) + 2):
    return nn.max_pool(x, window, tuple(strides), padding)
  return _max_pool_blocks(x, window)


def _blocks(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
  """(N, *spatial, C) -> (N, o_1, w_1, ..., o_d, w_d, C), cropping rows outside the windows."""
  out = tuple(size // w for size, w in zip(x.shape[1:-1], window))
  cropped = (x.shape[0], *(o * w for o, w in zip(out, window)), x.shape[-1])
  if cropped != x.shape:
    x = lax.slice(x, (0,) * x.ndim, cropped)
  return x.reshape(x.shape[0], *(v for o, w in zip(out, window) for v in (o, w)), x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_blocks(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
  """Non-overlapping max pooling: the max over the window axes of :func:`_blocks`."""
  return jnp.max(_blocks(x, window), axis=tuple(range(2, 2 * len(window) + 1, 2)))


def _max_pool_blocks_fwd(x: jax.Array, window: tuple[int, ...]
                         ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  y = _max_pool_blocks(x, window)
  return y, (x, y)


def _max_pool_blocks_bwd(window: tuple[int, ...], residuals: tuple[jax.Array, jax.Array],
                         g: jax.Array) -> tuple[jax.Array]:
  x, y = residuals
  blocks = _blocks(x, window)
  taken = jnp.zeros(y.shape, bool)
  grads = {}
  for offset in itertools.product(*map(range, window)):  # row-major window order
    index = (slice(None),) + tuple(v for o in offset for v in (slice(None), o))
    hit = (blocks[index] == y) & ~taken
    taken = taken | hit
    grads[offset] = jnp.where(hit, g, jnp.zeros((), g.dtype))

  def interleave(prefix: tuple[int, ...]) -> jax.Array:
    # Window axis k goes right after output axis k: (N, o_1, w_1, ..., o_d, w_d, C).
    k = len(prefix)
    if k == len(window):
      return grads[prefix]
    return jnp.stack([interleave(prefix + (a,)) for a in range(window[k])], axis=k + 2)

  dx = interleave(()).reshape(x.shape[0], *(o * w for o, w in zip(y.shape[1:-1], window)),
                              x.shape[-1])
  zero = jnp.zeros((), dx.dtype)
  return (lax.pad(dx, zero, [(0, full - part, 0) for full, part in zip(x.shape, dx.shape)]),)


_max_pool_blocks.defvjp(_max_pool_blocks_fwd, _max_pool_blocks_bwd)


class DepthwiseConv(nn.Module):
  """Depthwise conv with a (kh, kw, 1, C) ``kernel`` parameter, like ``nn.Conv``
  with ``feature_group_count=C`` so checkpoints are interchangeable.

  Attributes:
    kernel_size: (kh, kw).
    strides: (stride_h, stride_w).
    padding: as in :func:`depthwise_conv`.
    use_bias: adds a (C,) ``bias`` parameter.
    kernel_init: initializer of ``kernel``.
    impl: ``"auto"``, ``"shifted"`` or ``"xla"`` (see :func:`resolve_impl`).
  """
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Padding = "SAME"
  use_bias: bool = False
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, 1, c), jnp.float32)
    y = depthwise_conv(x, kernel.astype(x.dtype), self.strides, self.padding, self.impl)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (c,), jnp.float32).astype(x.dtype)
    return y


def _check_input(x: jax.Array) -> None:
  if x.ndim != 4:
    raise ValueError(f"x must be NHWC (4 dimensions), got shape {x.shape}")


def _check_strides(strides: Sequence[int]) -> tuple[int, int]:
  strides = tuple(int(s) for s in strides)
  if len(strides) != 2 or min(strides) < 1:
    raise ValueError(f"strides must be two positive integers, got {strides}")
  return strides


def _explicit_pads(padding: Padding, in_hw: Sequence[int], kernel_hw: Sequence[int],
                   strides: tuple[int, int]) -> Pads:
  """((lo_h, hi_h), (lo_w, hi_w)) for ``padding``; raises on empty outputs."""
  if isinstance(padding, str):
    if padding not in ("SAME", "SAME_LOWER", "VALID"):
      raise ValueError("padding must be 'SAME', 'SAME_LOWER', 'VALID' or two (lo, hi) pairs, "
                       f"got {padding!r}")
    pads = tuple(tuple(p) for p in lax.padtype_to_pads(in_hw, kernel_hw, strides, padding))
  else:
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(pads) != 2 or min(min(p) for p in pads) < 0:
      raise ValueError(f"explicit padding must be two non-negative (lo, hi) pairs, got {padding!r}")
  for size, k, (lo, hi) in zip(in_hw, kernel_hw, pads):
    if size + lo + hi < k:
      raise ValueError(f"kernel {tuple(kernel_hw)} is larger than the padded input {tuple(in_hw)} "
                       f"with padding {pads}")
  return pads


def _out_size(size: int, k: int, s: int, pad: tuple[int, int]) -> int:
  return (size + pad[0] + pad[1] - k) // s + 1


def _tap(xp: jax.Array, offset: tuple[int, int], strides: tuple[int, int],
         out_hw: tuple[int, int]) -> jax.Array:
  """xp[:, i::s_h, j::s_w, :] cut to ``out_hw``: the inputs kernel tap (i, j) multiplies."""
  (i, j), (sh, sw), (ho, wo) = offset, strides, out_hw
  n, _, _, c = xp.shape
  return lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                   (1, sh, sw, 1))


def _acc_dtype(*arrays: jax.Array) -> jnp.dtype:
  """Accumulates in at least float32, as XLA's convolution does."""
  return jnp.result_type(*(a.dtype for a in arrays), jnp.float32)


def _pad_hw(x: jax.Array, pads: Pads) -> jax.Array:
  zero = jnp.zeros((), x.dtype)
  return lax.pad(x, zero, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shifted(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                       pads: Pads) -> jax.Array:
  """Depthwise conv as a sum of shifted slices; ``kernel`` is (kh, kw, 1, C)."""
  acc = _acc_dtype(x, kernel)
  kh, kw = kernel.shape[:2]
  out_hw = tuple(_out_size(*a) for a in zip(x.shape[1:3], (kh, kw), strides, pads))
  xp = _pad_hw(x, pads).astype(acc)
  taps = kernel[:, :, 0, :].astype(acc)
  y = functools.reduce(operator.add, (_tap(xp, (i, j), strides, out_hw) * taps[i, j]
                                      for i in range(kh) for j in range(kw)))
  return y.astype(jnp.result_type(x, kernel))


def _depthwise_shifted_fwd(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                           pads: Pads) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  return _depthwise_shifted(x, kernel, strides, pads), (x, kernel)


def _depthwise_shifted_bwd(strides: tuple[int, int], pads: Pads,
                           residuals: tuple[jax.Array, jax.Array],
                           g: jax.Array) -> tuple[jax.Array, jax.Array]:
  x, kernel = residuals
  acc = _acc_dtype(x, kernel, g)
  g = g.astype(acc)
  dx = _input_grad(g, kernel[:, :, 0, :].astype(acc), strides, pads, x.shape[1:3])
  dk = _kernel_grad(_pad_hw(x, pads).astype(acc), g, kernel.shape[:2], strides)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_depthwise_shifted.defvjp(_depthwise_shifted_fwd, _depthwise_shifted_bwd)


def _input_grad(g: jax.Array, taps: jax.Array, strides: tuple[int, int], pads: Pads,
                in_hw: Sequence[int]) -> jax.Array:
  """Gradient wrt the input: a transposed depthwise conv of ``g`` by (kh, kw, C) ``taps``.

  Per axis, padded input row u = s * m + a (phase a < s) received
  g[m - l] * w[a + s * l] for l = 0, 1, ...: each phase is a stride-1 shifted
  sum over its own sub-kernel, and the phases interleave into the gradient.
  Only phases' rows m >= lo // s are computed, so stride 1 does no extra work.
  """
  n, ho, wo, c = g.shape
  # Per axis: first phase row m0, phase row count, most taps per phase - 1, crop start.
  geometry = []
  for s, k, (lo, _), size in zip(strides, taps.shape[:2], pads, in_hw):
    m0, m_end = lo // s, -(-(lo + size) // s)
    geometry.append((m0, m_end - m0, -(-k // s) - 1, lo - m0 * s))
  (sh, sw), (kh, kw) = strides, taps.shape[:2]
  (m0h, cnt_h, ph, crop_h), (m0w, cnt_w, pw, crop_w) = geometry
  # g[m - l] for phase row m = m0 + r lives at gq[r + p - l].
  zero = jnp.zeros((), g.dtype)
  gq = lax.pad(g, zero, ((0, 0, 0), (ph - m0h, m0h + cnt_h - ho, 0),
                         (pw - m0w, m0w + cnt_w - wo, 0), (0, 0, 0)))
  phases = []
  for a in range(sh):
    row = []
    for b in range(sw):
      terms = [_tap(gq, (ph - li, pw - lj), (1, 1), (cnt_h, cnt_w)) * taps[a + sh * li, b + sw * lj]
               for li in range(len(range(a, kh, sh))) for lj in range(len(range(b, kw, sw)))]
      row.append(functools.reduce(operator.add, terms) if terms
                 else jnp.zeros((n, cnt_h, cnt_w, c), g.dtype))
    phases.append(jnp.stack(row, axis=3))
  dxp = jnp.stack(phases, axis=2).reshape(n, cnt_h * sh, cnt_w * sw, c)
  return dxp[:, crop_h:crop_h + in_hw[0], crop_w:crop_w + in_hw[1]]


def _kernel_grad(xp: jax.Array, g: jax.Array, kernel_hw: Sequence[int],
                 strides: tuple[int, int]) -> jax.Array:
  """Gradient wrt the (kh, kw, 1, C) kernel: sum over batch and space of tap slice * g."""
  kh, kw = kernel_hw
  out_hw = g.shape[1:3]

  def tap_sums(xp_tile, g_tile):
    # One variadic reduce: a single pass over the tile for all kh * kw sums.
    products = tuple(_tap(xp_tile, (i, j), strides, out_hw) * g_tile
                     for i in range(kh) for j in range(kw))
    zeros = tuple(jnp.zeros((), g.dtype) for _ in products)
    sums = lax.reduce(products, zeros, lambda a, b: tuple(map(operator.add, a, b)), (0, 1, 2))
    return jnp.stack(sums)

  n, tile = g.shape[0], _KERNEL_GRAD_TILE
  whole = n - n % tile
  total = jnp.zeros((kh * kw, g.shape[-1]), g.dtype)
  if whole:
    tiled = (xp[:whole].reshape(whole // tile, tile, *xp.shape[1:]),
             g[:whole].reshape(whole // tile, tile, *g.shape[1:]))
    total, _ = lax.scan(lambda carry, tiles: (carry + tap_sums(*tiles), None), total, tiled)
  if whole < n:
    total = total + tap_sums(xp[whole:], g[whole:])
  return total.reshape(kh, kw, 1, -1)
