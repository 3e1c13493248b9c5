"""An L1 penalty on the selected kernels (a regularizer-style method): no codec, no
change to the weights; only a loss term, so the train step needs no edit.

Also defines an option ``threshold`` that ``ttq`` defines differently, so the
command line must qualify it (``--shrink.threshold``, ``--ttq.threshold``).
"""

import jax.numpy as jnp

from jcompress.transforms import base, registry
from jcompress.transforms import select as sel


def shrink_method(paths, *, strength=1e-4, threshold=0.0):
  chosen = list(paths)

  def loss(inputs, extra):
    flat = sel.flatten(inputs.trainable)
    penalty = sum(jnp.sum(jnp.maximum(jnp.abs(flat[p]) - threshold, 0.0)) for p in chosen)
    return inputs.loss + strength * penalty

  return base.Method("shrink", lambda params: (params, {}), lambda t, c: t, loss=loss)


registry.register(
    "shrink",
    base.Option("strength", float, 1e-4, "weight of the L1 penalty", range="[0, inf)"),
    base.Option("threshold", float, 0.0, "magnitude below which weights are not penalised",
                range="[0, inf)"),
    help="an L1 penalty on the selected kernels (no codec: stored as float32)")(shrink_method)
