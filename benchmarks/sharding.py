"""Data-parallel train-step throughput with 1, 2 and 4 host devices, and the ratio to 1.

    .venv/bin/python benchmarks/sharding.py [--models lenet300,lenet5] [--devices 1,2,4]
                                            [--batch-size 128]

XLA fixes the number of host devices when it starts, so each count runs in its own
process with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``. The step is
jitted as ``jcompress train`` jits it (``parallel.jit_step``: state replicated,
the global batch split over a ``data`` mesh) and timed on one resident batch of
the embedded MNIST sample. The N host devices share the machine's cores, so a
ratio above 1 needs cores to spare; the extra devices add partitioning, one
all-reduce of the gradients per step and replicated optimizer updates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import optax

from jcompress import data, models, parallel
from jcompress.train.step import init_state, train_step


def _measure(name: str, batch_size: int, seconds: float) -> dict:
  """Images per second of the data-parallel step over all devices of this process."""
  spec = data.spec("mnist_sample")
  ds = data.load("mnist_sample", verbose=False)
  mesh = parallel.data_mesh()
  parallel.check_batch_size(batch_size, mesh)
  model = models.create(name, num_classes=spec.num_classes, input_shape=spec.image_shape)
  tx = optax.sgd(0.01, momentum=0.9)
  state = parallel.replicate(init_state(model, tx, spec.image_shape, seed=0), mesh)
  step = parallel.jit_step(lambda s, b: train_step(s, b, model=model, tx=tx), mesh)
  batch = next(data.batches(ds.train_images, ds.train_labels, batch_size, mean=spec.mean,
                            std=spec.std, seed=0, drop_remainder=True,
                            sharding=parallel.batch_sharding(mesh)))
  for _ in range(3):  # compile and warm up
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  steps, start = 0, time.perf_counter()
  while steps < 10 or time.perf_counter() - start < seconds:
    state, metrics = step(state, batch)
    steps += 1
    if steps % 10 == 0:
      jax.block_until_ready(metrics)
  jax.block_until_ready(metrics)
  return {"devices": mesh.size, "img_s": steps * batch_size / (time.perf_counter() - start)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="lenet300,lenet5", help="comma-separated model names")
  p.add_argument("--devices", default="1,2,4", help="host device counts, the first the reference")
  p.add_argument("--batch-size", type=int, default=128, help="global batch (default %(default)s)")
  p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per case")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    print(json.dumps(_measure(args.worker, args.batch_size, args.seconds)))
    return
  counts = [int(n) for n in args.devices.split(",")]
  print(f"{os.cpu_count()} CPU cores, global batch {args.batch_size}; each device count in "
        "its own process")
  print("| model | " + " | ".join(f"{n} dev (img/s)" for n in counts) + " | " +
        " | ".join(f"{n} / {counts[0]}" for n in counts[1:]) + " |")
  print("|---|" + "---:|" * (2 * len(counts) - 1))
  for name in args.models.split(","):
    rates = []
    for n in counts:
      env = {**os.environ, "JAX_PLATFORMS": "cpu",
             "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
      out = subprocess.run([sys.executable, __file__, "--worker", name, "--batch-size",
                            str(args.batch_size), "--seconds", str(args.seconds)],
                           env=env, capture_output=True, text=True, check=True)
      result = json.loads(out.stdout.strip().splitlines()[-1])
      if result["devices"] != n:
        raise RuntimeError(f"asked for {n} host devices, the worker saw {result['devices']}")
      rates.append(result["img_s"])
    print(f"| {name} | " + " | ".join(f"{r:,.0f}" for r in rates) + " | " +
          " | ".join(f"{r / rates[0]:.2f}" for r in rates[1:]) + " |")


if __name__ == "__main__":
  main()
