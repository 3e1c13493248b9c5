"""N:M-sparse vs dense matmul of N:M-pruned layers on XLA:CPU (``--execution nm``).

    .venv/bin/python benchmarks/nm_sparsity.py [--structures 2:4,1:4] [--batches 1,128]
        [--rounds 30]

For LeNet-300-100's dense layers (784x300, 300x100) and LeNet-5's fc1 (800x500),
each kernel is pruned with ``prune --structure N:M`` and multiplied by a random
batch in these forms, side by side in one run:

* ``dense``: ``x @ W`` with the zeros (the reference, what ``--execution float`` runs);
* ``gather``: ``jcompress.nm``'s gathered form, ``x[:, idx]`` (``(B, out, K)``) and an
  ``einsum`` with the compact values (``--execution nm`` below 8 rows);
* ``take``: per group of M inputs the N kept ones by ``take_along_axis`` on ``x``
  reshaped to ``(B, 1, in / M, M)``, then an ``einsum`` (another gathered form);
* ``expand``: the compact values scattered into the dense kernel in the graph,
  then ``x @ W`` (``--execution nm`` from 8 rows).

The compact arrays are arguments of the jitted functions, not constants (as
constants XLA folds ``expand`` into the dense kernel). Each function is checked
against the dense result, warmed up, then timed call by call with
``block_until_ready`` in ``--rounds`` rounds of one call each, so machine load
hits the forms alike. The table gives the dense median and, per form, the median
over rounds of its time / dense (below 1: faster than dense), and the bytes of
the compact arrays against the dense float32 kernel.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import nm
from jcompress.transforms import registry, prune  # noqa: F401  (registers prune)

LAYERS = {"lenet300 fc1": (784, 300), "lenet300 fc2": (300, 100), "lenet5 fc1": (800, 500)}


def _take(x, idx, values, m):
  """Per group of ``m`` inputs, the kept ones by ``take_along_axis``, then a dot."""
  out, k = idx.shape
  places = (idx % m).reshape(out, -1, k * m // x.shape[1])  # (out, groups, n)
  groups = x.reshape(x.shape[0], 1, -1, m)
  picked = jnp.take_along_axis(groups, places[None], axis=-1, mode="promise_in_bounds")
  return jnp.einsum("bogn,ogn->bo", picked, values.reshape(places.shape))


def _forms(n: int, m: int) -> dict:
  gather = nm.NMMatrix(n, m, (0, 0), (), "gather")
  expand = nm.NMMatrix(n, m, (0, 0), (), "expand")
  return {
      "dense": jax.jit(lambda x, w, idx, values: x @ w),
      "gather": jax.jit(lambda x, w, idx, values: nm.matmul(
          x, gather.replace(shape=w.shape, arrays=(idx, values)))),
      "take": jax.jit(lambda x, w, idx, values: _take(x, idx, values, m)),
      "expand": jax.jit(lambda x, w, idx, values: nm.matmul(
          x, expand.replace(shape=w.shape, arrays=(idx, values)))),
  }


def _time(fns: dict, args: tuple, rounds: int) -> dict[str, list[float]]:
  for fn in fns.values():
    for _ in range(2):
      jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return times


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--structures", default="2:4,1:4")
  p.add_argument("--batches", default="1,128")
  p.add_argument("--rounds", type=int, default=30, help="timed calls of each form")
  args = p.parse_args()
  rng = np.random.default_rng(0)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; median us per call over "
        f"{args.rounds} rounds; ratio = form / dense (median over rounds)")
  forms = ["gather", "take", "expand"]
  print(f"\n| layer | N:M | batch | dense us | {' | '.join(forms)} | compact / dense bytes |")
  print("|---|---|---:|---:|" + "---:|" * len(forms) + "---:|")
  for name, shape in LAYERS.items():
    for structure in args.structures.split(","):
      n, m = map(int, structure.split(":"))
      method = registry.build("prune", ["w"], structure=structure)
      w = method.apply(*method.init({"w": jnp.asarray(rng.standard_normal(shape),
                                                      jnp.float32)}))["w"]
      mat = nm.from_dense(w, n, m)
      fns = _forms(n, m)
      for batch in (int(b) for b in args.batches.split(",")):
        x = jnp.asarray(rng.standard_normal((batch, shape[0])), jnp.float32)
        call = (x, w, *mat.arrays)
        reference = fns["dense"](*call)
        for form in forms:
          np.testing.assert_allclose(fns[form](*call), reference, rtol=1e-4, atol=1e-4)
        t = _time(fns, call, args.rounds)
        ratio = {f: statistics.median(a / b for a, b in zip(t[f], t["dense"])) for f in forms}
        print(f"| {name} {shape[0]}x{shape[1]} | {structure} | {batch} | "
              f"{statistics.median(t['dense']) * 1e6:.0f} | "
              + " | ".join(f"{ratio[f]:.2f}" for f in forms)
              + f" | {mat.nbytes / (4 * w.size):.2f} |", flush=True)


if __name__ == "__main__":
  main()
