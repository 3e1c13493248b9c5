"""The MNIST baselines study's small convolutional net and its locally connected
twin.

Both read the input as an image and cut it into patches: the CNN slides one 5x5
kernel of 6 filters with stride 5, the LCN gives every 10x10 patch its own 25
filters (unshared weights, ``nn.ConvLocal``). Then three dense layers of 256 and
the classifier. The MNIST baselines study's counts for its 1000-dimensional
vectors (255 classes) are reproduced with the vectors laid out as (25, 40, 1)
images for the CNN (260,519 parameters) and (10, 100, 1) for the LCN (288,661);
MNIST and CIFAR images work as they are. Padding is ``SAME``, so no border pixel
is dropped when the stride does not divide the image.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from jcompress.models import register
from jcompress.models.blocks import batch_norm, check_image_shape, positive_ints


def _dense_head(x: jax.Array, width: int, num_classes: int, use_bn: bool,
                train: bool) -> jax.Array:
  """``fc1..fc3`` of ``width`` (batch norm, ReLU) and the classifier ``fc4``.

  Called inside a compact ``__call__``, so the layers belong to that module.
  """
  for i in range(1, 4):
    x = nn.Dense(width, name=f"fc{i}")(x)
    if use_bn:
      x = batch_norm(use_running_average=not train, name=f"fc{i}_bn")(x)
    x = nn.relu(x)
  return nn.Dense(num_classes, name="fc4")(x)


class CNN(nn.Module):
  """``conv1`` (+ ``conv1_bn``, ReLU), flatten, ``fc1..fc3``, ``fc4``.

  Attributes:
    num_classes: the output size.
    filters: the conv filters.
    kernel: the conv kernel size (square).
    stride: the conv stride.
    width: the width of the three hidden dense layers.
    batch_norm: batch norm after the conv (per channel) and each hidden dense layer.
  """
  num_classes: int
  filters: int = 6
  kernel: int = 5
  stride: int = 5
  width: int = 256
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Conv(self.filters, (self.kernel, self.kernel), strides=self.stride,
                padding="SAME", name="conv1")(x)
    if self.batch_norm:
      x = batch_norm(use_running_average=not train, name="conv1_bn")(x)
    x = nn.relu(x).reshape((x.shape[0], -1))
    return _dense_head(x, self.width, self.num_classes, self.batch_norm, train)


class LCN(nn.Module):
  """``local1`` (unshared 10x10 filters per patch, + ``local1_bn``, ReLU), flatten,
  ``fc1..fc3``, ``fc4``.

  Attributes:
    num_classes: the output size.
    filters: the filters per patch position.
    kernel: the patch size (square).
    stride: the patch stride.
    width: the width of the three hidden dense layers.
    batch_norm: batch norm after the local layer (per position and filter, as in
      the MNIST baselines study) and after each hidden dense layer.
  """
  num_classes: int
  filters: int = 25
  kernel: int = 10
  stride: int = 10
  width: int = 256
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.ConvLocal(self.filters, (self.kernel, self.kernel), strides=self.stride,
                     padding="SAME", name="local1")(x)
    x = x.reshape((x.shape[0], -1))
    if self.batch_norm:
      x = batch_norm(use_running_average=not train, name="local1_bn")(x)
    x = nn.relu(x)
    return _dense_head(x, self.width, self.num_classes, self.batch_norm, train)


# Recipe: the MNIST baselines study's (experiments/README.md, seed 000: CNN 98.45%, LCN
# 98.54% after 10 epochs of SGD momentum 0.9, cosine).
_RECIPE = {"epochs": 10, "lr": 0.05, "weight_decay": 1e-4}


@register("cnn", recipe=_RECIPE)
def _cnn(num_classes: int, input_shape: Sequence[int], filters: int = 6, kernel: int = 5,
         stride: int = 5, width: int = 256, batch_norm: bool = True) -> nn.Module:
  """The MNIST baselines study's patch CNN.

  Config:
    filters: conv filters (6).
    kernel: conv kernel size (5).
    stride: conv stride (5: non-overlapping patches, as in the MNIST baselines
      study; 1 for a classic sliding conv).
    width: hidden dense width (256).
    batch_norm: batch norm after the conv and the hidden dense layers (True).
  """
  check_image_shape("cnn", input_shape)
  return CNN(num_classes=num_classes, batch_norm=bool(batch_norm),
             **positive_ints("cnn", filters=filters, kernel=kernel, stride=stride,
                             width=width))


@register("lcn", recipe=_RECIPE)
def _lcn(num_classes: int, input_shape: Sequence[int], filters: int = 25, kernel: int = 10,
         stride: int | None = None, width: int = 256, batch_norm: bool = True) -> nn.Module:
  """The MNIST baselines study's locally connected net.

  Config:
    filters: filters per patch position (25).
    kernel: patch size (10).
    stride: patch stride (None: equal to ``kernel``, non-overlapping patches).
    width: hidden dense width (256).
    batch_norm: batch norm after the local layer and the hidden dense layers (True).
  """
  check_image_shape("lcn", input_shape)
  return LCN(num_classes=num_classes, batch_norm=bool(batch_norm),
             **positive_ints("lcn", filters=filters, kernel=kernel,
                             stride=kernel if stride is None else stride, width=width))
