"""Tucker-2 factorized layers: measured vs theoretical speed-up.

For lenet5 (28x28x1) and c3d (8x32x32x1 clips) at a few ``--energy`` thresholds,
factorizes every kernel the ``tucker`` method accepts and prints seed 001's table
(:func:`jcompress.bench.compare`, what ``jcompress bench`` prints for workdirs):
per conv / dense layer and for the whole network, params, FLOPs and the jitted
forward time original vs factorized execution (medians over repeats, both timed
alternately in each repeat). Weights are a random init, so ranks are those of
random spectra.

``--forms`` instead times one factorized conv (LeNet-5's ``conv2``: 12x12x20 ->
8x8x50, 5x5, at ranks ``--ranks R_IN R_OUT``, default 7 16 as the 30% MAC
budget gives) in the equivalent forms the library could run, each against the
original conv in the same rounds: the three layers (1x1, KxK core, 1x1; what
factorized execution runs), the input factor merged into the core (one KxK conv
C_in -> R_out, then 1x1), the output factor merged into it (1x1, then one KxK
conv R_in -> C_out), and the core as an im2col matrix product.

``--front`` times what Tucker leaves alone in LeNet-5, ``conv1`` (28x28x1 -> 24x24x20,
5x5) with its bias and 2x2 max pool, as the model runs it (the reference) and in
equivalent forms, each against the reference in the same rounds: the conv alone,
conv + pool without the bias, the bias added after the pool (max commutes with a
per-channel shift), the pool as a reshape + max, and the conv on 2x2
space-to-depth blocks (3x3 conv, 4 -> 80 channels, then the max over the 4 phases
is the pool).

``--cpus N`` pins the process to N CPUs first (as ``jcompress bench --cpus``).

    .venv/bin/python benchmarks/tucker.py [--repeats 20] [--energy 0.5 0.8] [--batch 1 32]
    .venv/bin/python benchmarks/tucker.py --forms [--ranks 7 16] [--batch 128]
    .venv/bin/python benchmarks/tucker.py --front [--batch 128] [--cpus 1]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jcompress import bench, models
from jcompress.transforms import base, registry
from jcompress.transforms import select as sel

MODELS = (("lenet5", 10, (28, 28, 1)), ("c3d", 2, (8, 32, 32, 1)))


def run(name: str, num_classes: int, shape: tuple[int, ...], energy: float, batch: int,
        repeats: int) -> None:
  model = models.create(name, num_classes=num_classes, input_shape=shape)
  variables = jax.jit(model.init)(jax.random.key(0), jax.numpy.zeros((1, *shape)))
  plan = [registry.build("tucker", sel.select(variables["params"]), energy=energy)]
  trainable, cstate = base.stack(plan).init(variables["params"])
  table = bench.compare(model, variables, plan, trainable, cstate, shape, batch_size=batch,
                        repeats=repeats, seed=1)
  print(f"\n{name} energy={energy} batch={batch}: measured {table.measured_speedup:.2f}x, "
        f"theoretical (FLOPs) {table.theoretical_speedup:.2f}x")
  print(bench.render(table))


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _im2col_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  kh, kw, c, o = kernel.shape
  n, h, w, _ = x.shape
  ho, wo = h - kh + 1, w - kw + 1
  cols = jnp.concatenate([x[:, i:i + ho, j:j + wo] for i in range(kh) for j in range(kw)], -1)
  return (cols.reshape(-1, kh * kw * c) @ kernel.reshape(-1, o)).reshape(n, ho, wo, o)


def forms(ranks: tuple[int, int], batch: int, repeats: int) -> None:
  r_in, r_out = ranks
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
  x, kernel = normal(batch, 12, 12, 20), normal(5, 5, 20, 50)
  u_in, core, u_out = normal(20, r_in), normal(5, 5, r_in, r_out), normal(50, r_out)
  macs = lambda c, o: 8 * 8 * 25 * c * o  # noqa: E731  (per image, a 5x5 conv to 8x8)
  cases = {
      "1x1 + core + 1x1": (lambda x: _conv(x @ u_in, core) @ u_out.T,
                           20 * r_in * 144 + macs(r_in, r_out) + 64 * r_out * 50),
      "input factor merged": (lambda x: _conv(x, jnp.einsum("ca,hwab->hwcb", u_in, core))
                              @ u_out.T, macs(20, r_out) + 64 * r_out * 50),
      "output factor merged": (lambda x: _conv(x @ u_in, jnp.einsum("hwab,ob->hwao", core,
                                                                    u_out)),
                               20 * r_in * 144 + macs(r_in, 50)),
      "core as im2col matmul": (lambda x: _im2col_conv(x @ u_in, core) @ u_out.T,
                                20 * r_in * 144 + macs(r_in, r_out) + 64 * r_out * 50),
  }
  original = jax.jit(lambda x: _conv(x, kernel))
  print(f"LeNet-5 conv2 at ranks {r_in}x{r_out}, batch {batch}: time speed-up vs MAC "
        f"speed-up over the original conv ({macs(20, 50):,} MACs per image)")
  print(f"{'form':24s} {'MACs':>9s} {'MAC speed-up':>13s} {'ms orig':>8s} {'ms form':>8s} "
        f"{'speed-up':>9s}")
  for name, (fn, cost) in cases.items():
    t_orig, t_form = bench.time_pair(original, (x,), jax.jit(fn), (x,), repeats)
    print(f"{name:24s} {cost:9,d} {macs(20, 50) / cost:12.2f}x {1e3 * t_orig:8.2f} "
          f"{1e3 * t_form:8.2f} {t_orig / t_form:8.2f}x")


def _pool(x: jax.Array) -> jax.Array:
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _reshape_pool(x: jax.Array) -> jax.Array:
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _space_to_depth_kernel(kernel: np.ndarray) -> np.ndarray:
  """The 5x5 C -> O kernel on 2x2 blocks: 3x3, 4C -> 4O (one output per pixel phase)."""
  k, _, c, o = kernel.shape
  out = np.zeros((3, 3, 2, 2, c, 2, 2, o), np.float32)
  for bi in range(3):
    for qy in range(2):
      for py in range(2):
        for bj in range(3):
          for qx in range(2):
            for px in range(2):
              i, j = 2 * bi + qy - py, 2 * bj + qx - px
              if 0 <= i < k and 0 <= j < k:
                out[bi, bj, qy, qx, :, py, px, :] = kernel[i, j]
  return out.reshape(3, 3, 4 * c, 4 * o)


def front(batch: int, repeats: int) -> None:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, 28, 28, 1)), jnp.float32)
  kernel = rng.standard_normal((5, 5, 1, 20)).astype(np.float32)
  bias = jnp.asarray(rng.standard_normal(20), jnp.float32)
  blocks = jnp.asarray(_space_to_depth_kernel(kernel))
  kernel = jnp.asarray(kernel)

  def space_to_depth(x):
    n = x.shape[0]
    y = _conv(x.reshape(n, 14, 2, 14, 2, 1).transpose(0, 1, 3, 2, 4, 5).reshape(n, 14, 14, 4),
              blocks)
    return y.reshape(n, 12, 12, 4, 20).max(axis=3) + bias

  reference = jax.jit(lambda x: _pool(_conv(x, kernel) + bias))
  cases = {"conv alone": lambda x: _conv(x, kernel),
           "conv + pool, no bias": lambda x: _pool(_conv(x, kernel)),
           "bias after the pool": lambda x: _pool(_conv(x, kernel)) + bias,
           "pool as reshape + max": lambda x: _reshape_pool(_conv(x, kernel) + bias),
           "space-to-depth conv": space_to_depth}
  expected = reference(x)
  print(f"LeNet-5 conv1 + bias + 2x2 max pool, batch {batch}, {bench.cpu_count()} CPU(s): "
        f"each form against the reference")
  print(f"{'form':24s} {'ms ref':>8s} {'ms form':>8s} {'speed-up':>9s}")
  for name, fn in cases.items():
    fn = jax.jit(fn)
    if name in ("bias after the pool", "pool as reshape + max", "space-to-depth conv"):
      np.testing.assert_allclose(fn(x), expected, rtol=1e-4, atol=1e-4)
    t_ref, t_form = bench.time_pair(reference, (x,), fn, (x,), repeats)
    print(f"{name:24s} {1e3 * t_ref:8.3f} {1e3 * t_form:8.3f} {t_ref / t_form:8.2f}x")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--energy", type=float, nargs="+", default=[0.5, 0.8])
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
  parser.add_argument("--forms", action="store_true",
                      help="time the equivalent forms of one factorized conv instead")
  parser.add_argument("--ranks", type=int, nargs=2, default=[7, 16], metavar=("R_IN", "R_OUT"),
                      help="--forms: the core's input and output ranks")
  parser.add_argument("--front", action="store_true",
                      help="time LeNet-5's conv1 + bias + pool in equivalent forms instead")
  parser.add_argument("--cpus", type=int, help="pin the process to N CPUs first (Linux)")
  args = parser.parse_args()
  if args.cpus is not None:
    try:
      bench.pin_cpus(args.cpus)
    except ValueError as e:
      parser.error(str(e))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
  if args.front:
    for batch in args.batch:
      front(batch, args.repeats)
    return
  if args.forms:
    for batch in args.batch:
      forms(tuple(args.ranks), batch, args.repeats)
    return
  for name, classes, shape in MODELS:
    for energy in args.energy:
      for batch in args.batch:
        run(name, classes, shape, energy, batch, args.repeats)


if __name__ == "__main__":
  main()
