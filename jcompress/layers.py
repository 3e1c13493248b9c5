"""Shared building blocks used by several model families."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def depthwise_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
                   padding: str = "SAME") -> jax.Array:
  """Depthwise 2D convolution of NHWC ``x`` with an HWIO kernel of shape (kh, kw, 1, C)."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=tuple(strides), padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


class DepthwiseConv(nn.Module):
  """Depthwise conv with a (kh, kw, 1, C) ``kernel`` parameter, like ``nn.Conv``
  with ``feature_group_count=C`` so checkpoints are interchangeable."""
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: str = "SAME"
  use_bias: bool = False
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, 1, c), jnp.float32)
    y = depthwise_conv(x, kernel.astype(x.dtype), self.strides, self.padding)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (c,), jnp.float32).astype(x.dtype)
    return y
