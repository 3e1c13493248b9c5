"""Train-step throughput of jcompress models, alone and fed by the data pipeline.

    .venv/bin/python benchmarks/train_step.py [--models lenet300,lenet5] [--batch-size 128]
        [--dtype float32,bfloat16]

For each model: images/s of the jitted train step on one device-resident batch
(the step alone), and of the same step fed by ``data.batches`` with prefetching
over real MNIST (needs ``--data-dir`` or ``JCOMPRESS_DATA_DIR``; falls back to the
embedded sample with ``--dataset mnist_sample``). The ratio fed/alone shows how
much the pipeline costs the step (1.00 = nothing). With several ``--dtype`` values
(``train --dtype``: bfloat16 is mixed precision), each model gets a row per dtype,
side by side (the step alone timed in ``--rounds`` alternating runs, the median
shown), and ``vs first`` is the step alone's speed over the first dtype's.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from jcompress import data, models
from jcompress.train.step import DTYPES, init_state, train_step


def _images_per_sec(step, state, batches, n_steps: int) -> tuple[float, object]:
  for batch in itertools.islice(batches, 3):  # compile and warm up
    state, m = step(state, batch)
  jax.block_until_ready(m)
  start = time.perf_counter()
  count = 0
  for batch in itertools.islice(batches, n_steps):
    state, m = step(state, batch)
    count += batch["label"].shape[0]
  jax.block_until_ready(m)
  return count / (time.perf_counter() - start), state


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="lenet300,lenet5", help="comma-separated model names")
  p.add_argument("--dataset", default="mnist", choices=data.names())
  p.add_argument("--data-dir", help="offline dataset folder (default $JCOMPRESS_DATA_DIR)")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--steps", type=int, default=0, help="timed steps (default: about 3 s worth)")
  p.add_argument("--rounds", type=int, default=3, help="alternating timed runs of the "
                 "step alone per dtype; the median is shown (default 3)")
  p.add_argument("--dtype", default="float32", help="comma-separated compute dtypes "
                 f"({', '.join(DTYPES)}) of the train step, each timed (default float32)")
  args = p.parse_args()
  dtypes = args.dtype.split(",")
  if not set(dtypes) <= set(DTYPES):
    p.error(f"--dtype: expected {', '.join(DTYPES)}, got {args.dtype!r}")
  spec = data.spec(args.dataset)
  ds = data.load(args.dataset, args.data_dir)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, batch {args.batch_size}, "
        f"{args.dataset} ({ds.source})")
  print("| model | dtype | step alone (img/s) | fed by pipeline (img/s) | fed / alone "
        "| vs first |")
  print("|---|---|---:|---:|---:|---:|")

  def stream(epoch=0):
    while True:
      yield from data.batches(ds.train_images, ds.train_labels, args.batch_size,
                              mean=spec.mean, std=spec.std, seed=0, epoch=epoch,
                              augment=spec.augment, drop_remainder=True)
      epoch += 1

  one = next(stream())
  for name in args.models.split(","):
    model = models.create(name, num_classes=spec.num_classes, input_shape=spec.image_shape)
    tx = optax.sgd(0.01, momentum=0.9)
    state = init_state(model, tx, spec.image_shape, seed=0)
    runs = {}
    for dtype in dtypes:  # compile each, then time them alternately
      step = jax.jit(lambda s, b, model=model, tx=tx, dtype=dtype: train_step(
          s, b, model=model, tx=tx, dtype=dtype), donate_argnums=0)
      probe, copy = _images_per_sec(step, jax.tree.map(jnp.copy, state),
                                    itertools.repeat(one), 5)
      runs[dtype] = [step, copy, probe, []]
    n = args.steps or max(10, int(3 * min(r[2] for r in runs.values()) / args.batch_size))
    for _ in range(args.rounds):
      for run in runs.values():
        rate, run[1] = _images_per_sec(run[0], run[1], itertools.repeat(one), n)
        run[3].append(rate)
    first = statistics.median(runs[dtypes[0]][3])
    for dtype, (step, copy, _, rates) in runs.items():
      alone = statistics.median(rates)
      fed, _ = _images_per_sec(step, copy, stream(), n)
      print(f"| {name} | {dtype} | {alone:,.0f} | {fed:,.0f} | {fed / alone:.2f} | "
            f"{alone / first:.2f} |", flush=True)

if __name__ == "__main__":
  main()
