"""Tucker-2 factorized layers: measured vs theoretical speed-up.

For lenet5 (28x28x1) and c3d (8x32x32x1 clips) at a few ``--energy`` thresholds,
factorizes every kernel the ``tucker`` method accepts and times the jitted forward
pass, per factorized layer (on the input it sees in the network) and for the whole
network, original vs :func:`jcompress.transforms.tucker.factorized_execution`.
Prints the theoretical MAC ratio (original / executed, from ``layer_macs``), the
measured time ratio (original / factorized, medians over repeats, both timed
alternately in each repeat), and their quotient (1.0 = the MAC saving is fully
realised). Weights are a random init, so ranks are those of random spectra.

    .venv/bin/python benchmarks/tucker.py [--repeats 20] [--energy 0.5 0.8] [--batch 1 32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcompress import models
from jcompress.transforms import base, tucker
from jcompress.transforms import select as sel

MODELS = (("lenet5", 10, (28, 28, 1)), ("c3d", 2, (8, 32, 32, 1)))


def _time_pair(f: Callable, f_args: tuple, g: Callable, g_args: tuple, repeats: int
               ) -> tuple[float, float]:
  """Median seconds of ``f`` and ``g`` (compiled first), alternating in each repeat."""
  jax.block_until_ready(f(*f_args))
  jax.block_until_ready(g(*g_args))
  tf, tg = [], []
  for _ in range(repeats):
    for fn, args, out in ((f, f_args, tf), (g, g_args, tg)):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      out.append(time.perf_counter() - start)
  return statistics.median(tf), statistics.median(tg)


def _layer_inputs(model: nn.Module, params: Any, x: jax.Array
                  ) -> dict[str, tuple[nn.Module, jax.Array]]:
  """Each conv / dense layer as an unbound module with the input it gets."""
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (nn.Conv, nn.Dense)):
      seen["/".join(module.path)] = module.clone(parent=None, name=None), args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply({"params": params}, x)
  return seen


def _row(label: str, macs: tuple[int, int], times: tuple[float, float]) -> str:
  theory, measured = macs[0] / macs[1], times[0] / times[1]
  return (f"  {label:<22} {theory:7.2f}x {times[0] * 1e3:9.3f} {times[1] * 1e3:9.3f} "
          f"{measured:7.2f}x {measured / theory:7.2f}")


def run(name: str, num_classes: int, shape: tuple[int, ...], energy: float, batch: int,
        repeats: int) -> None:
  model = models.create(name, num_classes=num_classes, input_shape=shape)
  x = jax.random.normal(jax.random.key(1), (batch, *shape))
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  method = base.build("tucker", sel.select(params), energy=energy)
  trainable, cstate = method.init(params)
  layers = tucker.factorized_layers(trainable)
  macs = tucker.layer_macs(model, params, trainable, x)
  print(f"{name} energy={energy} batch={batch}: factorized "
        f"{', '.join(f'{k} {tuple(v[0].shape[-2:])}' for k, v in layers.items()) or 'nothing'}")
  print(f"  {'layer':<22} {'MACs':>8} {'orig ms':>9} {'fact ms':>9} {'time':>8} {'quot':>7}")
  inputs = _layer_inputs(model, params, x)
  flat = sel.flatten(params)
  for layer, factors in layers.items():
    module, h = inputs[layer]
    layer_params = {"kernel": flat[layer + "/kernel"], "bias": flat[layer + "/bias"]}
    factored = dict(zip(("kernel_core", "kernel_u_in", "kernel_u_out"), factors))

    def original(p, h, module=module):
      return module.apply({"params": p}, h)

    def fact(f, b, h, module=module):
      with tucker.factorized_execution(f):
        return module.apply({"params": {"kernel": jnp.zeros(()), "bias": b}}, h)

    times = _time_pair(jax.jit(original), (layer_params, h), jax.jit(fact),
                       (factored, layer_params["bias"], h), repeats)
    print(_row(layer, macs[layer], times))

  def whole(p, x):
    return model.apply({"params": p}, x)

  def whole_fact(t, x):
    with tucker.factorized_execution(t, cstate):
      return model.apply({"params": method.apply(t, cstate)}, x)

  times = _time_pair(jax.jit(whole), (params, x), jax.jit(whole_fact), (trainable, x), repeats)
  total = tuple(sum(v[i] for v in macs.values()) for i in (0, 1))
  print(_row("network", total, times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--energy", type=float, nargs="+", default=[0.5, 0.8])
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; MACs = theoretical "
        f"original/executed, time = measured original/factorized, quot = time/MACs")
  for name, classes, shape in MODELS:
    for energy in args.energy:
      for batch in args.batch:
        run(name, classes, shape, energy, batch, args.repeats)


if __name__ == "__main__":
  main()
