"""SqueezeNet (Iandola et al. 2016) for CIFAR-sized images.

SqueezeNet 1.1's channels (a 3x3 stem of 64, Fire modules 2-9), with batch norm
after every conv and the paper's simple bypass around Fire modules 3, 5, 7 and 9.
For 32x32 inputs the stem has stride 1 and 2x2 max pools follow the stem, Fire 3
and Fire 5. The classifier is a 1x1 ``conv10`` then global average pooling; unlike
the paper no ReLU follows ``conv10``, so the logits can be negative.

Paths: ``conv1``, ``conv1_bn``, ``fire2..fire9`` (``squeeze``, ``squeeze_bn``,
``expand1x1``, ``expand1x1_bn``, ``expand3x3``, ``expand3x3_bn``), ``conv10``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcompress.layers import max_pool
from jcompress.models import register
from jcompress.models.blocks import (CIFAR10_RECIPE, batch_norm, check_image_shape,
                                     ensure_divisible, multiplier, unit_rate)

# Fire modules 2..9: (squeeze, expand 1x1, expand 3x3) channels at width 1.
FIRE_CONFIG = (
    (16, 64, 64), (16, 64, 64), (32, 128, 128), (32, 128, 128),
    (48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256),
)
_POOL_AFTER_FIRE = frozenset({3, 5})


class Fire(nn.Module):
  """Squeeze (1x1) then concatenated expand 1x1 and 3x3, each conv with batch norm.

  Attributes:
    squeeze: squeeze channels.
    expand1x1: 1x1 expand channels.
    expand3x3: 3x3 expand channels.
  """
  squeeze: int
  expand1x1: int
  expand3x3: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    def conv_bn(y, features, kernel, name):
      y = nn.Conv(features, (kernel, kernel), use_bias=False, name=name)(y)
      return batch_norm(use_running_average=not train, name=f"{name}_bn")(y)

    s = nn.relu(conv_bn(x, self.squeeze, 1, "squeeze"))
    y = jnp.concatenate([conv_bn(s, self.expand1x1, 1, "expand1x1"),
                         conv_bn(s, self.expand3x3, 3, "expand3x3")], axis=-1)
    return nn.relu(y)


class SqueezeNet(nn.Module):
  """SqueezeNet 1.1 with batch norm and simple bypass.

  Attributes:
    num_classes: the output size.
    width: multiplier of every channel count (rounded to multiples of 8).
    dropout: dropout rate before ``conv10``.
    bypass: add the input of Fire modules 3, 5, 7, 9 to their output.
  """
  num_classes: int
  width: float = 1.0
  dropout: float = 0.5
  bypass: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Conv(ensure_divisible(64 * self.width), (3, 3), use_bias=False, name="conv1")(x)
    x = nn.relu(batch_norm(use_running_average=not train, name="conv1_bn")(x))
    x = max_pool(x, (2, 2), strides=(2, 2))
    for i, channels in enumerate(FIRE_CONFIG, start=2):
      y = Fire(*(ensure_divisible(c * self.width) for c in channels), name=f"fire{i}")(
          x, train)
      x = x + y if self.bypass and i % 2 == 1 else y
      if i in _POOL_AFTER_FIRE:
        x = max_pool(x, (2, 2), strides=(2, 2))
    x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
    x = nn.Conv(self.num_classes, (1, 1), name="conv10")(x)
    return jnp.mean(x, axis=(1, 2))


# Recipe: MicroBotNet's measured CIFAR-10 recipe at lr 0.02 (at 0.1 and 0.05 the loss
# rose in tests/test_zoo_train.py's 24 steps); not measured on SqueezeNet beyond them.
@register("squeezenet", recipe=CIFAR10_RECIPE | {"lr": 0.02})
def _squeezenet(num_classes: int, input_shape: Sequence[int], width: float = 1.0,
                dropout: float = 0.5, bypass: bool = True) -> nn.Module:
  """SqueezeNet, CIFAR-sized.

  Config:
    width: channel multiplier (1.0).
    dropout: dropout before ``conv10`` (0.5).
    bypass: simple bypass around Fire 3, 5, 7, 9 (True).
  """
  check_image_shape("squeezenet", input_shape, min_size=8)
  return SqueezeNet(num_classes=num_classes, width=multiplier("squeezenet", width),
                    dropout=unit_rate("squeezenet", "dropout", dropout), bypass=bool(bypass))
