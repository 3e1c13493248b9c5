"""LeNet-300-100 and the Caffe LeNet-5 (Han et al. 2015's MNIST baselines)."""

from __future__ import annotations

import functools

import flax.linen as nn

from jcompress.conv import conv_general_dilated
from jcompress.layers import max_pool
from jcompress.models import register


class LeNet300(nn.Module):
  """784-300-100-10 with ReLU: paths ``fc1``, ``fc2``, ``fc3``."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(300, name="fc1")(x))
    x = nn.relu(nn.Dense(100, name="fc2")(x))
    return nn.Dense(self.num_classes, name="fc3")(x)


class LeNet5(nn.Module):
  """Caffe LeNet-5: conv5x5-20, pool, conv5x5-50, pool, fc-500, fc-classes.

  ``width`` scales the 20 / 50 / 500 channels (rounded; a narrow student for
  distillation). The convs are ``nn.Conv`` with ``jcompress.conv``'s CPU
  gradients and the pools ``jcompress.layers.max_pool`` (LeNet-5's train step on
  CPU spends most of its time in XLA's gradients of both)."""
  num_classes: int = 10
  width: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(nn.Conv, padding="VALID", conv_general_dilated=conv_general_dilated)
    x = conv(_scaled(20, self.width), (5, 5), name="conv1")(x)
    x = max_pool(x, (2, 2), strides=(2, 2))
    x = conv(_scaled(50, self.width), (5, 5), name="conv2")(x)
    x = max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(_scaled(500, self.width), name="fc1")(x))
    return nn.Dense(self.num_classes, name="fc2")(x)


# Recipes: the training baselines of experiments/README.md (SGD momentum 0.9, cosine;
# LeNet-300-100 98.62%, LeNet-5 99.14% on MNIST). LeNet-5 diverges at lr 0.05.
@register("lenet300", recipe={"epochs": 20, "lr": 0.1, "weight_decay": 1e-4})
def _lenet300(num_classes, input_shape):
  del input_shape  # flattens any input
  return LeNet300(num_classes=num_classes)


def _scaled(channels: int, width: float) -> int:
  return max(1, round(channels * width))


@register("lenet5", recipe={"epochs": 15, "lr": 0.01, "weight_decay": 5e-4})
def _lenet5(num_classes, input_shape, width: float = 1.0):
  if min(input_shape[:2]) < 12:
    raise ValueError(f"lenet5 needs inputs of at least 12x12, got {input_shape}")
  if not width > 0:
    raise ValueError(f"lenet5: --width must be positive, got {width}")
  return LeNet5(num_classes=num_classes, width=width)
