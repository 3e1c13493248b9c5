"""A small 3D-conv video classifier shaped like the Tucker-2 study's network.

Two 3D convolutions (each with ReLU and max pooling) then three dense layers, the
layout of the network whose Tucker compression the Tucker-2 study timed (441,920
parameters there; its last two dense layers, 10,752 and 168 weights, fit
128 -> 84 -> 2).
Inputs are ``(T, H, W, C)`` clips, e.g. moving MNIST's ``(8, 32, 32, 1)``.

Paths: ``conv1``, ``conv2``, ``fc1``, ``fc2``, ``fc3``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from jcompress.conv import conv_general_dilated
from jcompress.layers import max_pool
from jcompress.models import register
from jcompress.models.blocks import conv_out_size, multiplier

KERNEL = (3, 5, 5)
POOLS = ((1, 2, 2), (2, 2, 2))


class C3D(nn.Module):
  """``conv1`` (3x5x5, ReLU, 1x2x2 max pool), ``conv2`` (3x5x5, ReLU, 2x2x2 max
  pool), ``fc1``, ``fc2`` (ReLU), ``fc3``.

  Attributes:
    num_classes: the output size.
    filters: the filters of ``conv1`` and ``conv2``.
    hidden: the widths of ``fc1`` and ``fc2``.
  """
  num_classes: int
  filters: tuple[int, int] = (16, 32)
  hidden: tuple[int, int] = (128, 84)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, (features, pool) in enumerate(zip(self.filters, POOLS), start=1):
      x = nn.relu(nn.Conv(features, KERNEL, padding="VALID", name=f"conv{i}",
                          conv_general_dilated=conv_general_dilated)(x))
      x = max_pool(x, pool, strides=pool)
    x = x.reshape((x.shape[0], -1))
    for i, features in enumerate(self.hidden, start=1):
      x = nn.relu(nn.Dense(features, name=f"fc{i}")(x))
    return nn.Dense(self.num_classes, name="fc3")(x)


def _features_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
  """The (T, H, W) left after both conv + pool stages."""
  shape = tuple(input_shape[:3])
  for pool in POOLS:
    shape = tuple(conv_out_size(conv_out_size(n, k, 1, "VALID"), p, p, "VALID")
                  for n, k, p in zip(shape, KERNEL, pool))
  return shape


# Recipe: the Tucker-2 study's C3D baseline (experiments/README.md, seed 001: 4.55% error
# on moving MNIST after 5 epochs of SGD momentum 0.9, cosine).
@register("c3d", recipe={"epochs": 5, "lr": 0.01, "weight_decay": 5e-4})
def _c3d(num_classes: int, input_shape: Sequence[int], width: float = 1.0) -> nn.Module:
  """The Tucker-2 study's 3D-conv video classifier.

  Config:
    width: multiplier of the conv filters (16, 32) and dense widths (128, 84).
  """
  if len(input_shape) != 4:
    raise ValueError(f"c3d takes clips of shape (T, H, W, C), got input_shape="
                     f"{tuple(input_shape)}")
  if min(_features_shape(input_shape)) < 1:
    raise ValueError(f"c3d needs clips of at least 6x16x16, got input_shape="
                     f"{tuple(input_shape)}")
  w = multiplier("c3d", width)
  return C3D(num_classes=num_classes,
             filters=(max(1, round(16 * w)), max(1, round(32 * w))),
             hidden=(max(1, round(128 * w)), max(1, round(84 * w))))
