"""A depthwise-separable conv net in MobileNetV1's style, small and large.

A 3x3 stem, then blocks of a 3x3 depthwise conv and a 1x1 pointwise conv (each
with batch norm and ReLU), global average pooling and the classifier. The MNIST
baselines study scored such nets (its logs give 332,179 and 1,221,392
parameters) without recording their layout; these two sizes are MobileNetV1's
first stages sized to land near those counts on 32x32 images: small stops at 512
channels, large adds four more 512-channel blocks.

Paths: ``stem_conv``, ``stem_bn``, ``block1..blockN`` (``dw``, ``dw_bn``, ``pw``,
``pw_bn``), ``classifier``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcompress.layers import DepthwiseConv
from jcompress.models import register
from jcompress.models.blocks import (CIFAR10_RECIPE, batch_norm, check_image_shape,
                                     ensure_divisible, multiplier)

# (pointwise channels, depthwise stride) per block at width 1.
_SMALL = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2))
SIZES = {"small": _SMALL, "large": _SMALL + ((512, 1),) * 4}


class SeparableBlock(nn.Module):
  """``dw`` (3x3 depthwise, stride) + ``dw_bn`` + ReLU, ``pw`` (1x1) + ``pw_bn`` + ReLU.

  Attributes:
    channels: output channels of the pointwise conv.
    stride: stride of the depthwise conv.
  """
  channels: int
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = DepthwiseConv((3, 3), strides=(self.stride, self.stride), name="dw")(x)
    x = nn.relu(batch_norm(use_running_average=not train, name="dw_bn")(x))
    x = nn.Conv(self.channels, (1, 1), use_bias=False, name="pw")(x)
    return nn.relu(batch_norm(use_running_average=not train, name="pw_bn")(x))


class DSC(nn.Module):
  """MobileNetV1-style depthwise-separable net.

  Attributes:
    num_classes: the output size.
    size: ``small`` or ``large`` (a key of ``SIZES``).
    width: multiplier of every channel count (rounded to multiples of 8).
  """
  num_classes: int
  size: str = "small"
  width: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Conv(ensure_divisible(32 * self.width), (3, 3), use_bias=False, name="stem_conv")(x)
    x = nn.relu(batch_norm(use_running_average=not train, name="stem_bn")(x))
    for i, (channels, stride) in enumerate(SIZES[self.size], start=1):
      x = SeparableBlock(ensure_divisible(channels * self.width), stride,
                         name=f"block{i}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="classifier")(x)


# Recipe: MicroBotNet's measured CIFAR-10 recipe; not measured on these models here.
@register("dsc", recipe=CIFAR10_RECIPE)
@register("dsc-small", recipe=CIFAR10_RECIPE)
@register("dsc-large", recipe=CIFAR10_RECIPE, size="large")
def _dsc(num_classes: int, input_shape: Sequence[int], size: str = "small",
         width: float = 1.0) -> nn.Module:
  """The depthwise-separable conv net (MobileNetV1 style) of the MNIST baselines
  study.

  Config:
    size: ``small`` (6 blocks) or ``large`` (10 blocks); ``small`` by default.
    width: channel multiplier (1.0).
  """
  check_image_shape("dsc", input_shape)
  if size not in SIZES:
    raise ValueError(f"dsc: size must be one of {sorted(SIZES)}, got {size!r}")
  return DSC(num_classes=num_classes, size=size, width=multiplier("dsc", width))
