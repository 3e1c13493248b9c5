"""Sparse vs dense matmul of pruned layers: where does sparsity start saving time?

    .venv/bin/python benchmarks/sparse.py [--sparsities 0,50,70,80,90,95,98,99]
        [--batches 1,128] [--formats csr,ell,bcoo,compact] [--structure none]

For the dense layers of lenet300 (784x300, 300x100, 100x10) and fcn-large
(1000x512, 512x512 three times, 512x255), each kernel is magnitude-pruned with
``jcompress.transforms.prune`` (``--structure l2`` prunes whole output channels)
and multiplied by a random batch: densely (``x @ W`` with the zeros, the
reference) and in each ``jcompress.sparse`` format. Every function is jitted,
checked against the dense result, warmed up, then timed call by call with
``block_until_ready`` in rounds of one call each, so that machine load hits them
alike. Tables: per layer, the dense median and the median over rounds of the
time ratio format / dense (< 1: sparse is faster); per model (its layers in
sequence), the ratio of summed medians; then the crossover: the lowest swept
sparsity from which a format stays faster for the whole model.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import sparse
from jcompress.transforms import base, registry, prune

MODELS = {"lenet300": [(784, 300), (300, 100), (100, 10)],
          "fcn-large": [(1000, 512), (512, 512), (512, 512), (512, 512), (512, 255)]}


def _time(fns: dict, args: dict, budget: float, min_repeats: int) -> dict[str, np.ndarray]:
  """Seconds per call of each function, one call of each per round."""
  single = {}
  for name, fn in fns.items():
    for _ in range(2):
      jax.block_until_ready(fn(*args[name]))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args[name]))
    single[name] = time.perf_counter() - start
  repeats = max(min_repeats, int(budget / max(sum(single.values()), 1e-9)))
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args[name]))
      times[name].append(time.perf_counter() - start)
  return {name: np.asarray(t) for name, t in times.items()}


def _measure(shape, batch, sparsity, formats, structure, budget, min_repeats, rng):
  w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  method = registry.build("prune", ["w"], sparsity=str(sparsity), structure=structure)
  w = method.apply(*method.init({"w": w}))["w"]
  x = jnp.asarray(rng.standard_normal((batch, shape[0])), jnp.float32)
  dense = jax.jit(lambda x, w: x @ w)
  fns, args = {"dense": dense}, {"dense": (x, w)}
  reference = dense(x, w)
  for fmt in formats:
    m = sparse.from_dense(w, fmt)
    fns[fmt], args[fmt] = jax.jit(sparse.matmul), (x, m)
    np.testing.assert_allclose(fns[fmt](x, m), reference, rtol=1e-4, atol=1e-4)
  return _time(fns, args, budget, min_repeats)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sparsities", default="0,50,70,80,90,95,98,99", help="percent, comma-separated")
  p.add_argument("--batches", default="1,128")
  p.add_argument("--formats", default=",".join(sparse.FORMATS))
  p.add_argument("--structure", default="none", choices=prune.STRUCTURES,
                 help="none: single weights; l1/l2: whole output channels")
  p.add_argument("--budget", type=float, default=0.3, help="seconds of timed calls per point")
  p.add_argument("--min-repeats", type=int, default=15)
  args = p.parse_args()
  sparsities = [int(s) / 100 for s in args.sparsities.split(",")]
  batches = [int(b) for b in args.batches.split(",")]
  formats = args.formats.split(",")
  rng = np.random.default_rng(0)
  noop = np.median(_time({"noop": jax.jit(lambda x: x + 1)}, {"noop": (jnp.ones(()),)}, 0.2,
                         100)["noop"])
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, structure {args.structure}; "
        f"median us per call (a jitted no-op: {noop * 1e6:.0f} us), ratio = format / dense")
  shapes = sorted({s for layers in MODELS.values() for s in layers}, reverse=True)
  results = {}
  print(f"\n| layer | batch | sparsity | dense us | {' | '.join(formats)} | best |")
  print("|---|---:|---:|---:|" + "---:|" * len(formats) + "---|")
  for shape in shapes:
    for batch in batches:
      for s in sparsities:
        t = _measure(shape, batch, s, formats, args.structure, args.budget, args.min_repeats,
                     rng)
        results[shape, batch, s] = {k: float(np.median(v)) for k, v in t.items()}
        ratio = {f: float(np.median(t[f] / t["dense"])) for f in formats}
        print(f"| {shape[0]}x{shape[1]} | {batch} | {s:.0%} | "
              f"{results[shape, batch, s]['dense'] * 1e6:.0f} | "
              + " | ".join(f"{ratio[f]:.2f}" for f in formats)
              + f" | {min(formats, key=ratio.get)} |", flush=True)

  print(f"\n| model | batch | sparsity | dense us | {' | '.join(formats)} |")
  print("|---|---:|---:|---:|" + "---:|" * len(formats))
  totals = {}
  for model, layers in MODELS.items():
    for batch in batches:
      for s in sparsities:
        total = {k: sum(results[shape, batch, s][k] for shape in layers)
                 for k in ["dense", *formats]}
        totals[model, batch, s] = total
        print(f"| {model} | {batch} | {s:.0%} | {total['dense'] * 1e6:.0f} | "
              + " | ".join(f"{total[f] / total['dense']:.2f}" for f in formats) + " |")

  print("\ncrossover: lowest swept sparsity from which the format stays faster than dense")
  print(f"| model | batch | {' | '.join(formats)} |")
  print("|---|---:|" + "---|" * len(formats))
  for model in MODELS:
    for batch in batches:
      cells = []
      for f in formats:
        faster = [totals[model, batch, s][f] < totals[model, batch, s]["dense"]
                  for s in sparsities]
        start = next((i for i in range(len(sparsities)) if all(faster[i:])), None)
        cells.append("never" if start is None else f"{sparsities[start]:.0%}")
      print(f"| {model} | {batch} | {' | '.join(cells)} |")


if __name__ == "__main__":
  main()
