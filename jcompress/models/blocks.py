"""Blocks shared by the model families: hard activations, squeeze-and-excitation,
the MobileNetV2/V3 inverted residual, the MobileNet width rounding, and the
validation of configs and input shapes.

>>> import jax.numpy as jnp
>>> from jcompress.models import blocks
>>> blocks.ensure_divisible(16 * 0.32, 8)
8
>>> blocks.hard_swish(jnp.array([-4.0, 0.0, 4.0])).tolist()
[-0.0, 0.0, 4.0]
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcompress.layers import DepthwiseConv

# PyTorch's BatchNorm2d defaults (momentum 0.1 of the new statistic, eps 1e-5), the
# reference implementations all the families here were trained with.
batch_norm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)

# The CIFAR-10 families' training recipe (``models.register``): the MicroBotNet reference
# code's at 90 instead of 200 epochs (experiments/README.md, training baselines: 79.01%
# with crop + flip augmentation, SGD momentum 0.9, cosine).
CIFAR10_RECIPE = {"epochs": 90, "lr": 0.1, "weight_decay": 5e-4, "warmup_epochs": 1}


def hard_sigmoid(x: jax.Array) -> jax.Array:
  """``relu6(x + 3) / 6`` (MobileNetV3)."""
  return jnp.minimum(jnp.maximum(x + 3.0, 0.0), 6.0) / 6.0


def hard_swish(x: jax.Array) -> jax.Array:
  """``x * relu6(x + 3) / 6`` (MobileNetV3)."""
  return x * hard_sigmoid(x)


def relu6(x: jax.Array) -> jax.Array:
  """``min(max(x, 0), 6)`` (MobileNetV2)."""
  return jnp.minimum(jnp.maximum(x, 0.0), 6.0)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu, "relu6": relu6, "hswish": hard_swish}


def ensure_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
  """Rounds a scaled channel count to the nearest multiple of ``divisor``.

  The result is at least ``min_value`` (default ``divisor``), and a rounding that
  lost more than 10% of ``value`` is bumped up by one ``divisor`` (the rule of the
  TensorFlow MobileNet code the MicroBotNet reference copied).

  Args:
    value: the channel count times the width multiplier.
    divisor: the granularity of the result.
    min_value: the smallest allowed result.

  Returns:
    The rounded channel count.
  """
  min_value = divisor if min_value is None else min_value
  rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


class SqueezeExcite(nn.Module):
  """Squeeze-and-excitation of MobileNetV3: global mean, ``fc1`` (c -> c/reduction,
  no bias), ReLU, ``fc2`` (c/reduction -> c, no bias), hard sigmoid, channel scaling.

  Attributes:
    reduction: the channel reduction of the bottleneck; must divide the channels.
    kernel_init: initializer of both dense kernels.
  """
  reduction: int = 4
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    if channels % self.reduction:
      raise ValueError(f"{self.name}: channels {channels} not divisible by "
                       f"reduction={self.reduction}")
    y = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
    y = nn.Dense(channels // self.reduction, use_bias=False, kernel_init=self.kernel_init,
                 name="fc1")(y)
    y = nn.relu(y)
    y = nn.Dense(channels, use_bias=False, kernel_init=self.kernel_init, name="fc2")(y)
    y = hard_sigmoid(y)
    return x * y.reshape((y.shape[0],) + (1,) * (x.ndim - 2) + (channels,))


def check_image_shape(model: str, input_shape: Sequence[int], min_size: int = 1) -> None:
  """Raises ``ValueError`` unless ``input_shape`` is ``(H, W, C)`` with H, W >= min_size.

  Args:
    model: the model's registry name, for the message.
    input_shape: the per-example input shape.
    min_size: the smallest height and width the model can reduce without
      running out of pixels.
  """
  if len(input_shape) != 3:
    raise ValueError(f"{model} takes images of shape (H, W, C), got input_shape="
                     f"{tuple(input_shape)}")
  if min(input_shape[:2]) < min_size:
    raise ValueError(f"{model} needs images of at least {min_size}x{min_size}, got "
                     f"input_shape={tuple(input_shape)}")


def positive_ints(model: str, **values: float) -> dict[str, int]:
  """``values`` as ints; ``ValueError`` naming the first that is not a positive integer."""
  for key, value in values.items():
    if int(value) != value or value < 1:
      raise ValueError(f"{model}: {key} must be a positive integer, got {value}")
  return {key: int(value) for key, value in values.items()}


def unit_rate(model: str, key: str, value: float) -> float:
  """``value`` as a float in [0, 1); ``ValueError`` naming ``key`` otherwise."""
  if not 0 <= value < 1:
    raise ValueError(f"{model}: {key} must be in [0, 1), got {value}")
  return float(value)


def multiplier(model: str, value: float) -> float:
  """A positive width multiplier as a float; ``ValueError`` otherwise."""
  if not value > 0:
    raise ValueError(f"{model}: width must be positive, got {value}")
  return float(value)


def conv_out_size(size: int, kernel: int, stride: int, padding: str) -> int:
  """The output length of a convolution or pooling window along one axis."""
  if padding == "SAME":
    return math.ceil(size / stride)
  if padding == "VALID":
    return (size - kernel) // stride + 1 if size >= kernel else 0
  raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")


class InvertedResidual(nn.Module):
  """MobileNetV2/V3 bottleneck: 1x1 ``expand`` (skipped when ``expansion`` equals
  the input channels), depthwise ``dw``, optional squeeze-excite ``se``, activation,
  linear 1x1 ``project``; a residual add when the stride is 1 and the channels are
  kept. Every conv is followed by batch norm (``expand_bn``, ``dw_bn``, then
  ``project_bn``, or ``residual_bn`` in residual blocks).

  Attributes:
    expansion: channels of the depthwise stage.
    out_channels: channels of the output.
    kernel: depthwise kernel size.
    stride: depthwise stride.
    se: whether squeeze-and-excitation follows the depthwise conv.
    activation: a key of ``ACTIVATIONS``.
    residual_bn: the name of the last batch norm in residual blocks (MicroBotNet
      calls it ``lastBN``).
    zero_gamma: initialise that batch norm's scale to zero, so each residual
      block starts as the identity.
    conv_init: initializer of the conv kernels.
    linear_init: initializer of the squeeze-excite kernels.
  """
  expansion: int
  out_channels: int
  kernel: int
  stride: int
  se: bool
  activation: str
  residual_bn: str = "project_bn"
  zero_gamma: bool = False
  conv_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  linear_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    residual = self.stride == 1 and x.shape[-1] == self.out_channels
    y = x
    if self.expansion != x.shape[-1]:
      y = nn.Conv(self.expansion, (1, 1), use_bias=False, kernel_init=self.conv_init,
                  name="expand")(y)
      y = act(batch_norm(use_running_average=not train, name="expand_bn")(y))
    y = DepthwiseConv((self.kernel, self.kernel), strides=(self.stride, self.stride),
                      kernel_init=self.conv_init, name="dw")(y)
    y = batch_norm(use_running_average=not train, name="dw_bn")(y)
    if self.se:
      y = SqueezeExcite(kernel_init=self.linear_init, name="se")(y)
    y = nn.Conv(self.out_channels, (1, 1), use_bias=False, kernel_init=self.conv_init,
                name="project")(act(y))
    if not residual:
      return batch_norm(use_running_average=not train, name="project_bn")(y)
    scale_init = nn.initializers.zeros if self.zero_gamma else nn.initializers.ones
    y = batch_norm(use_running_average=not train, scale_init=scale_init,
                   name=self.residual_bn)(y)
    return x + y
