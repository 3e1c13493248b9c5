"""The maxout network (Goodfellow et al. 2013) of the MNIST baselines study, in
its two sizes.

Every hidden layer is a dense layer of ``width * pieces`` units, batch norm, and a
max over groups of ``pieces`` consecutive units. The MNIST baselines study's
sizes (1000-dim input, 255 classes): large = 3 layers of 500 units x 2 pieces
(2,136,755 params), small = 4 layers of 250 units x 4 pieces (1,826,005 params).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from jcompress.models import register
from jcompress.models.blocks import batch_norm, positive_ints


class Maxout(nn.Module):
  """``fc1..fc{depth}`` (+ ``fc{i}_bn``, max over pieces), then ``fc{depth+1}``.

  Attributes:
    num_classes: the output size.
    width: the maxout units per hidden layer (after the max).
    pieces: the linear pieces each unit maxes over.
    depth: the number of hidden maxout layers.
    batch_norm: batch norm on the ``width * pieces`` pre-activations.
  """
  num_classes: int
  width: int = 500
  pieces: int = 2
  depth: int = 3
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for i in range(1, self.depth + 1):
      x = nn.Dense(self.width * self.pieces, name=f"fc{i}")(x)
      if self.batch_norm:
        x = batch_norm(use_running_average=not train, name=f"fc{i}_bn")(x)
      x = x.reshape((x.shape[0], self.width, self.pieces)).max(axis=-1)
    return nn.Dense(self.num_classes, name=f"fc{self.depth + 1}")(x)


# Recipe: the one the MNIST baselines study (experiments/README.md, seed 000) gives the
# fully connected FCN; not measured on maxout beyond tests/test_zoo_train.py's few steps.
_RECIPE = {"epochs": 10, "lr": 0.05, "weight_decay": 1e-4}


@register("maxout", recipe=_RECIPE)
@register("maxout-large", recipe=_RECIPE)
@register("maxout-small", recipe=_RECIPE, width=250, pieces=4, depth=4)
def _maxout(num_classes: int, input_shape: Sequence[int], width: int = 500, pieces: int = 2,
            depth: int = 3, batch_norm: bool = True) -> nn.Module:
  """The maxout net (Goodfellow et al. 2013); the defaults are its large size.

  Config:
    width: maxout units per hidden layer (500; 250 for ``maxout-small``).
    pieces: linear pieces per unit (2; 4 for ``maxout-small``).
    depth: hidden maxout layers (3; 4 for ``maxout-small``).
    batch_norm: batch norm before each max (True).
  """
  del input_shape  # flattens any input
  return Maxout(num_classes=num_classes, batch_norm=bool(batch_norm),
                **positive_ints("maxout", width=width, pieces=pieces, depth=depth))
