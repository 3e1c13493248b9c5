"""Integer (int8 x int8 -> int32) vs float32 execution of dense and conv layers.

    .venv/bin/python benchmarks/int8.py [--batch-sizes 1,128] [--min-time 0.1] [--repeats 7]

LeNet-300-100 and LeNet-5 layer shapes, each timed in the same run as:

* ``fp32``: the float layer (``x @ w`` / ``lax.conv_general_dilated``);
* ``weight-only``: dequantize the int8 codes, then the float layer (what the
  ``quantize`` method's ``apply`` does);
* ``int8``: :func:`quantize.int8_dense` / :func:`quantize.int8_conv`, including the
  dynamic per-tensor quantization of the activations and the rescale;
* ``int8 core``: the integer dot/conv alone on pre-quantized inputs.

Ratios are times over fp32 (above 1 = slower). Each time is the fastest of
``--repeats`` loops of about ``--min-time`` seconds, the variants taking turns so
they share the background load; the load average is printed because the machine
may be shared.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jcompress.transforms import quantize as qz

# (name, kind, input shape without batch, kernel shape)
LAYERS = [
    ("lenet300 fc1", "dense", (784,), (784, 300)),
    ("lenet300 fc2", "dense", (300,), (300, 100)),
    ("lenet5 conv1", "conv", (28, 28, 1), (5, 5, 1, 20)),
    ("lenet5 conv2", "conv", (12, 12, 20), (5, 5, 20, 50)),
    ("lenet5 fc1", "dense", (800,), (800, 500)),
]
_DIMS = ("NHWC", "HWIO", "NHWC")


def _seconds(fns: dict, args: dict, min_time: float, repeats: int) -> dict[str, float]:
  """Per variant, the fastest of ``repeats`` timed loops; the variants take turns
  within each repeat so that they see the same background load."""
  loops = {}
  for v, fn in fns.items():
    jax.block_until_ready(fn(*args[v]))  # compile and warm up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_time:
      jax.block_until_ready(fn(*args[v]))
      n += 1
    loops[v] = n
  best = {v: float("inf") for v in fns}
  for _ in range(repeats):
    for v, fn in fns.items():
      start = time.perf_counter()
      for _ in range(loops[v]):
        out = fn(*args[v])
      jax.block_until_ready(out)
      best[v] = min(best[v], (time.perf_counter() - start) / loops[v])
  return best


def _variants(kind: str):
  if kind == "dense":
    float_op = lambda x, w: x @ w
    int_core = lambda x8, codes: lax.dot_general(x8, codes, (((1,), (0,)), ((), ())),
                                                 preferred_element_type=jnp.int32)
    int_layer = lambda x, q, b: qz.int8_dense(x, q.codes, q.scale, b)
  else:
    float_op = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                                     dimension_numbers=_DIMS)
    int_core = lambda x8, codes: lax.conv_general_dilated(
        x8, codes, (1, 1), "VALID", dimension_numbers=_DIMS, preferred_element_type=jnp.int32)
    int_layer = lambda x, q, b: qz.int8_conv(x, q.codes, q.scale, b, padding="VALID")
  return {
      "fp32": jax.jit(lambda x, w, q, b: float_op(x, w) + b),
      "weight-only": jax.jit(lambda x, w, q, b: float_op(x, qz.dequantize_tensor(q)) + b),
      "int8": jax.jit(lambda x, w, q, b: int_layer(x, q, b)),
      "int8 core": jax.jit(lambda x8, codes: int_core(x8, codes)),
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch-sizes", default="1,128", help="comma-separated batch sizes")
  p.add_argument("--min-time", type=float, default=0.1, help="seconds per timed loop")
  p.add_argument("--repeats", type=int, default=7)
  args = p.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}")
  print("| layer | batch | fp32 (us) | weight-only / fp32 | int8 / fp32 | int8 core / fp32 |")
  print("|---|---:|---:|---:|---:|---:|")
  rng = np.random.default_rng(0)
  for name, kind, in_shape, k_shape in LAYERS:
    w = jnp.asarray(rng.normal(size=k_shape) / np.sqrt(np.prod(k_shape[:-1])), jnp.float32)
    b = jnp.zeros(k_shape[-1], jnp.float32)
    q = qz.quantize_tensor(w, 8, "symmetric", "channel")
    fns = _variants(kind)
    for batch in map(int, args.batch_sizes.split(",")):
      x = jnp.asarray(rng.uniform(size=(batch, *in_shape)), jnp.float32)
      x8, _ = qz.quantize_activations(x)
      inputs = {v: (x, w, q, b) for v in fns}
      inputs["int8 core"] = (x8, q.codes)
      t = _seconds(fns, inputs, args.min_time, args.repeats)
      print(f"| {name} | {batch} | {t['fp32'] * 1e6:.1f} | {t['weight-only'] / t['fp32']:.2f} "
            f"| {t['int8'] / t['fp32']:.2f} | {t['int8 core'] / t['fp32']:.2f} |")


if __name__ == "__main__":
  main()
