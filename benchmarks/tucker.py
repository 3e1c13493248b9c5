"""Tucker-2 factorized layers: measured vs theoretical speed-up.

For lenet5 (28x28x1) and c3d (8x32x32x1 clips) at a few ``--energy`` thresholds,
factorizes every kernel the ``tucker`` method accepts and prints seed 001's table
(:func:`jcompress.bench.compare`, what ``jcompress bench`` prints for workdirs):
per conv / dense layer and for the whole network, params, FLOPs and the jitted
forward time original vs factorized execution (medians over repeats, both timed
alternately in each repeat). Weights are a random init, so ranks are those of
random spectra.

    .venv/bin/python benchmarks/tucker.py [--repeats 20] [--energy 0.5 0.8] [--batch 1 32]
"""

from __future__ import annotations

import argparse

import jax

from jcompress import bench, models
from jcompress.transforms import base
from jcompress.transforms import select as sel

MODELS = (("lenet5", 10, (28, 28, 1)), ("c3d", 2, (8, 32, 32, 1)))


def run(name: str, num_classes: int, shape: tuple[int, ...], energy: float, batch: int,
        repeats: int) -> None:
  model = models.create(name, num_classes=num_classes, input_shape=shape)
  variables = jax.jit(model.init)(jax.random.key(0), jax.numpy.zeros((1, *shape)))
  plan = [base.build("tucker", sel.select(variables["params"]), energy=energy)]
  trainable, cstate = base.stack(plan).init(variables["params"])
  table = bench.compare(model, variables, plan, trainable, cstate, shape, batch_size=batch,
                        repeats=repeats, seed=1)
  print(f"\n{name} energy={energy} batch={batch}: measured {table.measured_speedup:.2f}x, "
        f"theoretical (FLOPs) {table.theoretical_speedup:.2f}x")
  print(bench.render(table))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--energy", type=float, nargs="+", default=[0.5, 0.8])
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
  for name, classes, shape in MODELS:
    for energy in args.energy:
      for batch in args.batch:
        run(name, classes, shape, energy, batch, args.repeats)


if __name__ == "__main__":
  main()
