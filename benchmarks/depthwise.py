"""Depthwise and grouped convolution: XLA's grouped conv vs jcompress.layers' shifted path.

Times the forward pass and forward+backward (gradients wrt input and kernel)
on MicroBotNet-like shapes (CIFAR 32x32 inputs, width 0.32) and prints median
milliseconds and the speed-up ``xla / ours``. Forward+backward is ``jax.vjp``
with a fixed cotangent, returning the output and both gradients. Both
implementations are timed alternately in each repeat, so load from other
processes hits both alike.

    .venv/bin/python benchmarks/depthwise.py [--batch 128] [--repeats 10] [--skip-grouped]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, NamedTuple

import jax

from jcompress.layers import grouped_conv


class Case(NamedTuple):
  hw: int
  channels: int
  out_channels: int
  groups: int
  kernel: int
  stride: int


DEPTHWISE_CASES = (
    Case(16, 24, 24, 24, 3, 2),
    Case(8, 32, 32, 32, 5, 1),
    Case(8, 184, 184, 184, 5, 1),
    Case(4, 96, 96, 96, 5, 2),
    Case(2, 184, 184, 184, 5, 1),
)
GROUPED_CASES = (
    Case(16, 32, 32, 2, 3, 1),
    Case(8, 64, 64, 4, 3, 1),
    Case(8, 64, 64, 8, 3, 2),
)


def _timed_pair(fns: dict[str, Callable], args: tuple, repeats: int) -> dict[str, float]:
  """Median ms of each jitted fn after two warm-up calls, alternating fns per repeat."""
  for fn in fns.values():
    for _ in range(2):
      jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append((time.perf_counter() - start) * 1e3)
  return {name: statistics.median(ts) for name, ts in times.items()}


def bench_case(case: Case, batch: int, repeats: int) -> dict[str, dict[str, float]]:
  """Forward and forward+backward median ms of impl 'xla' and 'shifted' on one case."""
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (batch, case.hw, case.hw, case.channels))
  kernel = jax.random.normal(kk, (case.kernel, case.kernel, case.channels // case.groups,
                                  case.out_channels)) * 0.1
  strides = (case.stride, case.stride)
  out_hw = -(-case.hw // case.stride)
  cotangent = jax.random.normal(kg, (batch, out_hw, out_hw, case.out_channels))

  def fwd(impl):
    return jax.jit(lambda x, k: grouped_conv(x, k, case.groups, strides, "SAME", impl))

  def fwd_bwd(impl):
    def run(x, k):
      y, vjp = jax.vjp(lambda x, k: grouped_conv(x, k, case.groups, strides, "SAME", impl), x, k)
      return y, *vjp(cotangent)
    return jax.jit(run)

  return {"fwd": _timed_pair({i: fwd(i) for i in ("xla", "shifted")}, (x, kernel), repeats),
          "fwd+bwd": _timed_pair({i: fwd_bwd(i) for i in ("xla", "shifted")}, (x, kernel), repeats)}


def _describe(case: Case, batch: int) -> str:
  shape = f"{batch}x{case.hw}x{case.hw}x{case.channels}"
  if case.groups != case.channels or case.out_channels != case.channels:
    shape += f"->{case.out_channels} g{case.groups}"
  return f"{shape} k{case.kernel} s{case.stride}"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--skip-grouped", action="store_true", help="only the depthwise cases")
  args = parser.parse_args(argv)
  print(f"backend={jax.default_backend()} devices={jax.devices()} "
        f"median of {args.repeats} runs, ms")
  header = (f"{'shape':<30} {'fwd xla':>9} {'fwd ours':>9} {'ratio':>7} "
            f"{'f+b xla':>9} {'f+b ours':>9} {'ratio':>7}")
  cases = DEPTHWISE_CASES + (() if args.skip_grouped else GROUPED_CASES)
  print(header)
  print("-" * len(header))
  for case in cases:
    res = bench_case(case, args.batch, args.repeats)
    cells = []
    for phase in ("fwd", "fwd+bwd"):
      xla, ours = res[phase]["xla"], res[phase]["shifted"]
      cells.append(f"{xla:9.2f} {ours:9.2f} {xla / ours:6.1f}x")
    print(f"{_describe(case, args.batch):<30} {' '.join(cells)}", flush=True)


if __name__ == "__main__":
  main()
