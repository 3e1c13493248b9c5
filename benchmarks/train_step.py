"""Train-step throughput of jcompress models, alone and fed by the data pipeline.

    .venv/bin/python benchmarks/train_step.py [--models lenet300,lenet5] [--batch-size 128]

For each model: images/s of the jitted train step on one device-resident batch
(the step alone), and of the same step fed by ``data.batches`` with prefetching
over real MNIST (needs ``--data-dir`` or ``JCOMPRESS_DATA_DIR``; falls back to the
embedded sample with ``--dataset mnist_sample``). The ratio fed/alone shows how
much the pipeline costs the step (1.00 = nothing).
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax
import optax

from jcompress import data, models
from jcompress.train.step import init_state, train_step


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
  args = p.parse_args()
  spec = data.spec(args.dataset)
  ds = data.load(args.dataset, args.data_dir)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, batch {args.batch_size}, "
        f"{args.dataset} ({ds.source})")
  print("| model | step alone (img/s) | fed by pipeline (img/s) | fed / alone |")
  print("|---|---:|---:|---:|")
  for name in args.models.split(","):
    model = models.create(name, num_classes=spec.num_classes, input_shape=spec.image_shape)
    tx = optax.sgd(0.01, momentum=0.9)
    step = jax.jit(lambda s, b, model=model, tx=tx: train_step(s, b, model=model, tx=tx),
                   donate_argnums=0)
    state = init_state(model, tx, spec.image_shape, seed=0)

    def stream(epoch=0):
      while True:
        yield from data.batches(ds.train_images, ds.train_labels, args.batch_size,
                                mean=spec.mean, std=spec.std, seed=0, epoch=epoch,
                                augment=spec.augment, drop_remainder=True)
        epoch += 1

    one = next(stream())
    probe, state = _images_per_sec(step, state, itertools.repeat(one), 5)
    n = args.steps or max(10, int(3 * probe / args.batch_size))
    alone, state = _images_per_sec(step, state, itertools.repeat(one), n)
    fed, state = _images_per_sec(step, state, stream(), n)
    print(f"| {name} | {alone:,.0f} | {fed:,.0f} | {fed / alone:.2f} |")


if __name__ == "__main__":
  main()
