"""Tucker-factorized layers as they run: the factor sequence instead of the kernel.

:func:`factorized_execution` makes each factorized ``nn.Conv`` / ``nn.Dense`` run
as a 1x1 conv to ``R_in``, the spatial core conv and a 1x1 conv to ``C_out``
(``--execution factorized``); :func:`factorized_costs` counts what that runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp  # noqa: F401  (doctests)
import numpy as np

from jcompress import cost
from jcompress.transforms import registry  # noqa: F401  (doctests)
from jcompress.transforms import select as sel
from jcompress.transforms.ranks import layer_cost, layer_name


def factorized_layers(trainable: Any) -> dict[str, tuple[jax.Array, jax.Array, jax.Array]]:
  """``{layer: (core, u_in, u_out)}`` of every factorized kernel in ``trainable``.

  >>> m = registry.build("tucker", ["fc1/kernel"], ranks="0.25")
  >>> list(factorized_layers(m.init({"fc1": {"kernel": jnp.ones((8, 8))}})[0]))
  ['fc1']
  """
  flat = sel.flatten(trainable)
  return {layer_name(p[:-len("_core")]): (leaf, flat[p[:-len("_core")] + "_u_in"],
                                          flat[p[:-len("_core")] + "_u_out"])
          for p, leaf in flat.items()
          if p.endswith("_core") and p[:-len("_core")] + "_u_in" in flat}


def _module_layer(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


def _run_factored(module: nn.Module, x: jax.Array, core, u_in, u_out) -> jax.Array:
  if isinstance(module, nn.Dense):
    y = ((x @ u_in) @ core) @ u_out.T
  else:
    if module.feature_group_count != 1:
      raise ValueError(f"{_module_layer(module)} is a grouped conv "
                       f"(feature_group_count={module.feature_group_count}); "
                       f"its Tucker factors cannot run factorized")
    # The core conv reuses the layer's own strides, padding and dilation logic.
    spatial = module.clone(parent=None, name=None, features=core.shape[-1], use_bias=False)
    y = spatial.apply({"params": {"kernel": core}}, x @ u_in) @ u_out.T
  if module.use_bias:
    y = y + module.get_variable("params", "bias")
  return y


@contextlib.contextmanager
def factorized_execution(trainable: Any, cstate: Any = None) -> Iterator[None]:
  """Within it, every ``nn.Conv`` / ``nn.Dense`` whose kernel ``trainable`` factorizes
  runs the factor sequence (1x1 conv, core conv, 1x1 conv + bias) instead of its
  full kernel; the other modules run as usual.

  Args:
    trainable: the ``tucker`` method's trainable tree (it may be traced: enter the
      context inside the jitted function).
    cstate: unused (the factors carry their ranks); accepted so callers pass the
      method state as it is.

  >>> model = nn.Dense(8, name="fc")
  >>> params = {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}
  >>> m = registry.build("tucker", ["kernel"], ranks="0.125")
  >>> trainable, cstate = m.init(params)
  >>> with factorized_execution(trainable, cstate):
  ...   y = model.apply({"params": m.apply(trainable, cstate)}, jnp.ones((1, 8)))
  >>> [round(v, 4) for v in y[0, :2].tolist()]
  [8.0, 8.0]
  """
  del cstate
  layers = factorized_layers(trainable)
  running = []  # the core conv of a factorized layer runs as an ordinary conv

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (running or context.method_name != "__call__"
        or not isinstance(module, (nn.Conv, nn.Dense)) or _module_layer(module) not in layers):
      return next_fun(*args, **kwargs)
    running.append(module)
    try:
      return _run_factored(module, args[0], *layers[_module_layer(module)])
    finally:
      running.pop()

  with nn.intercept_methods(interceptor):
    yield


def layer_macs(model: nn.Module, params: Any, trainable: Any, x: jax.Array
               ) -> dict[str, tuple[int, int]]:
  """``{layer: (original MACs, executed MACs)}`` of every conv / dense layer of
  ``model`` on input ``x`` (whole batch), the executed count being what
  :func:`factorized_execution` runs (the first 1x1 conv at input resolution).

  Args:
    model: the Flax module.
    params: the model's params (``Method.apply`` output is fine).
    trainable: the ``tucker`` method's trainable tree.
    x: an input batch (only its shape is used).

  >>> model = nn.Dense(8, name="fc")
  >>> params = {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}
  >>> m = registry.build("tucker", ["kernel"], ranks="0.125")
  >>> layer_macs(model, params, m.init(params)[0], jnp.ones((2, 8)))
  {'': (128, 34)}
  """
  layers = factorized_layers(trainable)
  seen: dict[str, tuple[int, int]] = {}

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (nn.Conv, nn.Dense)):
      name = _module_layer(module)
      shape = module.get_variable("params", "kernel").shape
      where = math.prod(args[0].shape[:-1]), math.prod(y.shape[:-1])
      ranks = tuple(layers[name][0].shape[-2:]) if name in layers else None
      seen[name] = layer_cost(shape, None, where)[0], layer_cost(shape, ranks, where)[0]
    return y

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda p, v: model.apply({"params": p}, v), params, x)
  return seen


def factorized_costs(summary: cost.Summary, trainable: Any) -> cost.Summary:
  """``summary`` with each layer that ``trainable`` Tucker-factorizes counted as the
  factor sequence that runs: its tensors are the factors (32-bit, as exported),
  its MACs, nonzero MACs and FLOPs (``outputs * (2 fan_in - 1)`` per
  stage) those of the 1x1 conv at input resolution, the core conv and the 1x1
  conv at output resolution; its kind gets a ``tucker_`` prefix. Other rows are
  unchanged, so is the summary of a model without factors.

  Args:
    summary: ``cost.summarize`` of the model with the rebuilt kernels.
    trainable: the plan's trainable tree (with ``<layer>/kernel_core`` ...).

  Returns:
    The summary of what factorized execution runs.
  """
  layers = factorized_layers(trainable)
  rows = []
  for row in summary.layers:
    if row.path not in layers or not row.macs:
      rows.append(row)
      continue
    factors = [np.asarray(f) for f in layers[row.path]]
    core, u_in, u_out = factors
    *spatial, r_in, r_out = core.shape
    c_in, c_out, k = u_in.shape[0], u_out.shape[0], math.prod(spatial)
    in_pos, out_pos = math.prod(row.input_shape[:-1]), math.prod(row.output_shape[:-1])
    calls = row.macs // (out_pos * k * c_in * c_out)  # a shared layer runs more than once
    stages = [(in_pos, c_in, r_in, u_in), (out_pos, k * r_in, r_out, core),
              (out_pos, r_out, c_out, u_out)]
    macs = [calls * pos * fan_in * outs for pos, fan_in, outs, _ in stages]
    kernel = f"{row.path}/kernel" if row.path else "kernel"
    tensors = []
    for t in row.tensors:
      tensors += [cost.TensorCost(kernel + suffix, f.shape, int(np.count_nonzero(f)), 32.0)
                  for suffix, f in zip(("_core", "_u_in", "_u_out"), (core, u_in, u_out))
                  ] if t.path == kernel else [t]
    rows.append(dataclasses.replace(
        row, kind=f"tucker_{row.kind}", tensors=tuple(tensors), macs=sum(macs),
        nonzero_macs=sum(m * int(np.count_nonzero(f)) // f.size
                         for m, (*_, f) in zip(macs, stages)),
        flops=sum(calls * pos * outs * (2 * fan_in - 1) for pos, fan_in, outs, _ in stages),
        weight_bits=32.0))
  return dataclasses.replace(summary, layers=tuple(rows))
