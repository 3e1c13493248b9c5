"""Input-pipeline speed: first load (decode) vs cached load, and batches per second.

Throughput is one full training epoch of ``jcompress.data.batches`` (shuffled; CIFAR-10
with crop + flip) at batch 128, each batch waited for on device, with and without
prefetch. The "step" columns add a simulated train step that sleeps ``--step-ms``
per batch (releasing the GIL as a device step does), to show how much of the
pipeline prefetch hides behind the step::

  python benchmarks/data_pipeline.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax

from jcompress import data


def _epoch_seconds(ds: data.Dataset, batch_size: int, prefetch: int, step_s: float) -> float:
  spec = data.spec(ds.name)
  start = time.perf_counter()
  for batch in data.batches(ds.train_images, ds.train_labels, batch_size, mean=spec.mean,
                            std=spec.std, seed=0, epoch=0, augment=spec.augment,
                            drop_remainder=True, prefetch=prefetch):
    jax.block_until_ready(batch)
    time.sleep(step_s)
  return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", default=os.environ.get("JCOMPRESS_DATA_DIR"),
                      help="offline data directory (default $JCOMPRESS_DATA_DIR)")
  parser.add_argument("--datasets", nargs="+", default=["mnist", "cifar10"])
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--prefetch", type=int, default=2)
  parser.add_argument("--step-ms", type=float, default=5.0)
  args = parser.parse_args(argv)

  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"batch {args.batch_size}, simulated step {args.step_ms:g} ms")
  print(f"{'dataset':<9} {'decode s':>9} {'cached s':>9} {'img/s sync':>11} "
        f"{'img/s pf=' + str(args.prefetch):>11} {'step sync':>10} "
        f"{'step pf=' + str(args.prefetch):>10}")
  for name in args.datasets:
    with tempfile.TemporaryDirectory() as cache:  # a cold cache, then a warm one
      start = time.perf_counter()
      data.load(name, args.data_dir, cache_dir=cache, verbose=False)
      decode = time.perf_counter() - start
      start = time.perf_counter()
      ds = data.load(name, args.data_dir, cache_dir=cache, verbose=False)
      cached = time.perf_counter() - start
    n = data.num_batches(len(ds.train_images), args.batch_size, True) * args.batch_size
    _epoch_seconds(ds, args.batch_size, 0, 0.0)  # warm up allocators and transfers
    rates = [n / _epoch_seconds(ds, args.batch_size, prefetch, step_ms / 1000)
             for step_ms in (0.0, args.step_ms) for prefetch in (0, args.prefetch)]
    print(f"{name:<9} {decode:>9.2f} {cached:>9.2f} {rates[0]:>11.0f} {rates[1]:>11.0f} "
          f"{rates[2]:>10.0f} {rates[3]:>10.0f}")
  print("img/s: training images per second through data.batches (higher is better); "
        "step columns include the simulated step.")


if __name__ == "__main__":
  main()
