"""MobileNetV2 (Sandler et al. 2018) for CIFAR-sized images.

Inverted residuals with linear bottlenecks and a width multiplier. As in the usual
CIFAR adaptation, the stem and the second stage keep stride 1, so a 32x32 image
reaches the head at 4x4 (ImageNet's network downsamples 32x).

Paths: ``stem_conv``, ``stem_bn``, ``block1..block17`` (``expand``, ``expand_bn``,
``dw``, ``dw_bn``, ``project``, ``project_bn``), ``head_conv``, ``head_bn``,
``classifier``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcompress.models import register
from jcompress.models.blocks import (CIFAR10_RECIPE, InvertedResidual, batch_norm,
                                     check_image_shape, ensure_divisible, multiplier, relu6,
                                     unit_rate)

# (expansion factor, out channels, repeats, stride of the first repeat) at width 1.
CIFAR_CONFIG = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class MobileNetV2(nn.Module):
  """MobileNetV2 with a width multiplier.

  Attributes:
    num_classes: the output size.
    width: the width multiplier of every layer (the 1280-channel head grows only
      above 1, as in the paper).
    dropout: dropout rate before the classifier.
  """
  num_classes: int
  width: float = 1.0
  dropout: float = 0.2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    w = self.width
    x = nn.Conv(ensure_divisible(32 * w), (3, 3), use_bias=False, kernel_init=conv_init,
                name="stem_conv")(x)
    x = relu6(batch_norm(use_running_average=not train, name="stem_bn")(x))
    index = 0
    for factor, out, repeats, first_stride in CIFAR_CONFIG:
      for r in range(repeats):
        index += 1
        x = InvertedResidual(round(x.shape[-1] * factor), ensure_divisible(out * w), 3,
                             first_stride if r == 0 else 1, False, "relu6",
                             conv_init=conv_init, name=f"block{index}")(x, train)
    head = ensure_divisible(1280 * w) if w > 1 else 1280
    x = nn.Conv(head, (1, 1), use_bias=False, kernel_init=conv_init, name="head_conv")(x)
    x = relu6(batch_norm(use_running_average=not train, name="head_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                    name="classifier")(x)


# Recipe: MicroBotNet's measured CIFAR-10 recipe at lr 0.05 (at 0.1 the loss rose in
# tests/test_zoo_train.py's 24 steps); not measured on MobileNetV2 beyond them.
@register("mobilenetv2", recipe=CIFAR10_RECIPE | {"lr": 0.05})
def _mobilenetv2(num_classes: int, input_shape: Sequence[int], width: float = 1.0,
                 dropout: float = 0.2) -> nn.Module:
  """MobileNetV2, CIFAR-sized.

  Config:
    width: width multiplier (1.0).
    dropout: dropout before the classifier (0.2).
  """
  check_image_shape("mobilenetv2", input_shape)
  return MobileNetV2(num_classes=num_classes, width=multiplier("mobilenetv2", width),
                     dropout=unit_rate("mobilenetv2", "dropout", dropout))
