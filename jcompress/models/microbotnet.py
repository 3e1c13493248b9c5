"""MicroBotNet: FD-MobileNetV3 "Imp2" in its small mode.

A MobileNetV3-small body with fast downsampling: a stride-2 stem and ten
bottlenecks (inverted residuals with linear bottlenecks, squeeze-and-excitation,
h-swish), then a 1x1 conv, global pooling, a 1x1 conv to 1024 and the classifier.
At ``width=0.32`` on 32x32x3 with 10 classes it has 236,658 parameters and
782,368 conv and dense MACs (the notes' profiler reported 932,886 MACs counting
more ops); at ``width=1.0`` 2,044,298 parameters.

Paths: ``stem_conv``, ``stem_bn``, ``block1..block10`` (``expand``, ``expand_bn``,
``dw``, ``dw_bn``, ``se/fc1``, ``se/fc2``, ``project`` and ``project_bn``, or
``lastBN`` in residual blocks), ``head_conv``, ``head_bn``, ``feature_conv``,
``classifier``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcompress.models import register
from jcompress.models.blocks import (CIFAR10_RECIPE, InvertedResidual, batch_norm,
                                     check_image_shape, ensure_divisible, hard_swish,
                                     multiplier, unit_rate)

# (kernel, expansion, out channels, squeeze-excite, activation, stride) at width 1.
SMALL_CONFIG = (
    (3, 72, 24, False, "relu", 2),
    (5, 96, 40, True, "hswish", 2),
    (5, 240, 40, True, "hswish", 1),
    (5, 120, 48, True, "hswish", 1),
    (5, 144, 48, True, "hswish", 1),
    (5, 288, 96, True, "hswish", 2),
    (5, 576, 96, True, "hswish", 1),
    (5, 576, 96, True, "hswish", 1),
    (5, 576, 96, True, "hswish", 1),
    (5, 576, 96, True, "hswish", 1),
)
# The reference initialisation: Kaiming normal (fan out) convs, N(0, 0.001) linears.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
linear_init = nn.initializers.normal(0.001)


class MicroBotNet(nn.Module):
  """FD-MobileNetV3 Imp2 (small mode) with a width multiplier.

  Attributes:
    num_classes: the output size.
    width: the width multiplier (0.32 is MicroBotNet).
    dropout: dropout rate before the classifier.
    zero_gamma: zero-initialise the ``lastBN`` scales.
  """
  num_classes: int
  width: float = 0.32
  dropout: float = 0.2
  zero_gamma: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    w = self.width
    x = nn.Conv(ensure_divisible(16 * w), (3, 3), strides=2, use_bias=False,
                kernel_init=conv_init, name="stem_conv")(x)
    x = hard_swish(batch_norm(use_running_average=not train, name="stem_bn")(x))
    expansion = 0
    for i, (kernel, exp, out, se, act, stride) in enumerate(SMALL_CONFIG, start=1):
      expansion = ensure_divisible(exp * w)
      x = InvertedResidual(expansion, ensure_divisible(out * w), kernel, stride, se, act,
                           residual_bn="lastBN", zero_gamma=self.zero_gamma,
                           conv_init=conv_init, linear_init=linear_init,
                           name=f"block{i}")(x, train)
    # The reference scales the last expansion by the width a second time.
    x = nn.Conv(ensure_divisible(expansion * w), (1, 1), use_bias=False,
                kernel_init=conv_init, name="head_conv")(x)
    x = hard_swish(batch_norm(use_running_average=not train, name="head_bn")(x))
    x = jnp.mean(x, axis=(1, 2), keepdims=True)
    features = ensure_divisible(1024 * w) if w > 1 else 1024
    x = nn.Conv(features, (1, 1), use_bias=False, kernel_init=conv_init,
                name="feature_conv")(x)
    x = hard_swish(x).reshape((x.shape[0], -1))
    x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
    return nn.Dense(self.num_classes, kernel_init=linear_init, name="classifier")(x)


@register("microbotnet", recipe=CIFAR10_RECIPE)
def _microbotnet(num_classes: int, input_shape: Sequence[int], width: float = 0.32,
                 dropout: float = 0.2, zero_gamma: bool = False) -> nn.Module:
  """MicroBotNet (FD-MobileNetV3 "Imp2", small mode).

  Config:
    width: width multiplier (0.32; 1.0 is FD-MobileNetV3 Imp2 small).
    dropout: dropout before the classifier (0.2).
    zero_gamma: zero-initialise the scale of each residual block's ``lastBN``
      (False, as the reference's default).
  """
  check_image_shape("microbotnet", input_shape)
  return MicroBotNet(num_classes=num_classes, width=multiplier("microbotnet", width),
                     dropout=unit_rate("microbotnet", "dropout", dropout),
                     zero_gamma=bool(zero_gamma))
