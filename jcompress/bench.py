"""Measured vs theoretical speed-up of a compressed model (``jcompress bench``).

The Tucker-2 speed table (Kim et al. 2016 layout): one row per conv / dense layer
and a total, with params original / compressed / ratio, FLOPs original /
compressed / speed-up (the table's ``outputs * (2 fan_in - 1)``; the compressed
model counted as ``jcompress summary`` counts it, Tucker layers as their factor
sequence), and the measured time original / compressed / speed-up with each
layer's share of its network's time. Times are medians over ``repeats`` of the
jitted forward pass, compiled and run once first, original and compressed
alternating within each repeat so both see the same machine load. A layer is
timed alone on the input it gets in the network (captured with
``nn.intercept_methods``), at its own module path, so the execution's context
(``jcompress.execution``) applies to it as in the network; the total is the
whole network's forward pass.

>>> from jcompress import models
>>> model = models.create("lenet300", num_classes=10, input_shape=(28, 28, 1))
>>> variables = model.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))
>>> plan = [registry.build("tucker", ["fc1/kernel"], ranks="fc1=16:16")]
>>> trainable, cstate = base.stack(plan).init(variables["params"])
>>> table = compare(model, variables, plan, trainable, cstate, (28, 28, 1), batch_size=2,
...                 repeats=1)
>>> [row.layer for row in table.rows], table.execution, table.total.params
(['fc1', 'fc2', 'fc3'], 'factorized', (266610, 49010))
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Callable, Sequence

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp  # noqa: F401  (doctest)

from jcompress import cost, execution, report
from jcompress.measure import compressed_summary
from jcompress.train.loop import load_workdir
from jcompress.transforms import base, registry
from jcompress.transforms import select as sel
from jcompress.transforms.registry import plan_methods


def pin_cpus(count: int) -> list[int]:
  """Runs this process on the last ``count`` of the CPUs it may use (Linux), so that
  XLA:CPU, which sizes its thread pools by them, times a model on that many cores
  (``jcompress bench --cpus``). Call it before JAX starts its CPU backend.

  Returns:
    the CPUs now allowed.

  Raises:
    ValueError: ``count`` is below 1 or above the CPUs allowed, the platform cannot
      pin, or JAX's backend is already running (each message names ``--cpus``).
  """
  if not hasattr(os, "sched_setaffinity"):
    raise ValueError("--cpus needs os.sched_setaffinity (Linux); run without it")
  allowed = sorted(os.sched_getaffinity(0))
  if not 1 <= count <= len(allowed):
    raise ValueError(f"--cpus must be between 1 and the {len(allowed)} CPUs this process "
                     f"may use, got {count}")
  if _backend_started():
    raise ValueError("--cpus must pin the process before JAX starts its backend; "
                     "it already has")
  os.sched_setaffinity(0, allowed[-count:])
  return allowed[-count:]


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  except ImportError:  # a JAX without it: cannot tell, assume not
    return False
  return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())


def cpu_count() -> int:
  """CPUs this process may run on (all of them where the platform cannot say)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def time_pair(f: Callable, f_args: tuple, g: Callable, g_args: tuple, repeats: int
              ) -> tuple[float, float]:
  """Median seconds of ``f(*f_args)`` and ``g(*g_args)`` (each run once first, to
  compile), alternating within each of ``repeats`` rounds."""
  jax.block_until_ready(f(*f_args))
  jax.block_until_ready(g(*g_args))
  tf, tg = [], []
  for _ in range(repeats):
    for fn, args, out in ((f, f_args, tf), (g, g_args, tg)):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      out.append(time.perf_counter() - start)
  return statistics.median(tf), statistics.median(tg)


def layer_inputs(model: nn.Module, variables: Any, x: jax.Array, paths: Sequence[str], **kwargs
                 ) -> dict[str, tuple[nn.Module, jax.Array]]:
  """Each module at ``paths`` as an unbound copy with the input of its first call
  in ``model.apply(variables, x, **kwargs)``."""
  seen: dict[str, tuple[nn.Module, jax.Array]] = {}
  wanted = set(paths)

  def interceptor(next_fun, args, kwargs, context):
    path = "/".join(context.module.path)
    if context.method_name == "__call__" and path in wanted and path not in seen:
      seen[path] = context.module.clone(parent=None, name=None), args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, x, **kwargs)
  return seen


def call_at(module: nn.Module, path: str, params: Any, x: jax.Array) -> jax.Array:
  """``module(x)`` run alone but at module path ``path`` (interceptors that act by
  path see it as in the network), with ``params`` the network's params tree (only
  the subtree at ``path`` is read)."""
  names = [n for n in path.split("/") if n]
  sub = sel.unflatten({k: v for k, v in sel.flatten(params).items()
                       if k.startswith(path + "/" if path else "")})

  def fn(scope, x):
    for name in names:
      scope = scope.push(name)
    return module.clone(parent=scope)(x)

  return flax.core.apply(fn)({"params": sub}, x)


@dataclasses.dataclass(frozen=True)
class Row:
  """One layer (or the total): each pair is (original, compressed)."""
  layer: str
  params: tuple[int, int]
  flops: tuple[int, int]
  macs: tuple[int, int]
  seconds: tuple[float, float]
  share: tuple[float, float]

  def to_dict(self) -> dict[str, Any]:
    ratio = lambda pair: pair[0] / pair[1] if pair[1] else None
    return {"layer": self.layer,
            "params_original": self.params[0], "params_compressed": self.params[1],
            "params_ratio": self.params[1] / self.params[0] if self.params[0] else None,
            "flops_original": self.flops[0], "flops_compressed": self.flops[1],
            "flops_speedup": ratio(self.flops),
            "macs_original": self.macs[0], "macs_compressed": self.macs[1],
            "seconds_original": self.seconds[0], "seconds_compressed": self.seconds[1],
            "time_speedup": ratio(self.seconds),
            "share_original": self.share[0], "share_compressed": self.share[1]}


@dataclasses.dataclass(frozen=True)
class Table:
  """The Tucker-2 speed table (Kim et al. 2016 layout): per-layer rows and the
  whole network."""
  rows: tuple[Row, ...]
  total: Row
  execution: str
  batch_size: int
  repeats: int

  @property
  def measured_speedup(self) -> float:
    return self.total.seconds[0] / self.total.seconds[1]

  @property
  def theoretical_speedup(self) -> float:
    return self.total.flops[0] / self.total.flops[1]

  def to_dict(self) -> dict[str, Any]:
    return {"execution": self.execution, "batch_size": self.batch_size,
            "repeats": self.repeats, "device": jax.devices()[0].device_kind,
            "cpus": cpu_count(),
            "layers": [r.to_dict() for r in self.rows], "total": self.total.to_dict(),
            "measured_speedup": self.measured_speedup,
            "theoretical_speedup": self.theoretical_speedup}


def _check(batch_size: int, repeats: int) -> None:
  for name, value in (("--batch-size", batch_size), ("--repeats", repeats)):
    if value < 1:
      raise ValueError(f"{name} must be at least 1, got {value}")


def compare(model: nn.Module, baseline: Any, methods: Sequence[base.Method], trainable: Any,
            cstate: Any, input_shape: Sequence[int], *, batch_stats: Any = None,
            execution_name: str | None = None, batch_size: int = 128, repeats: int = 10,
            seed: int = 0, per_layer: bool = True) -> Table:
  """Times and counts a compressed model against its original.

  Args:
    model: the Flax module (both models share it).
    baseline: the original's variables (``params``, maybe ``batch_stats``).
    methods: the compressed model's plan (``transforms.plan_methods``).
    trainable: the plan's trainable tree; ``cstate``: its stacked state.
    input_shape: one example's shape.
    batch_stats: the compressed model's batch-norm statistics, if any.
    execution_name: how the compressed model runs; default: the execution the
      plan's last method declares (``factorized`` for ``tucker``), else ``float``.
    batch_size: examples per timed forward pass (random normal inputs).
    repeats: timed rounds (the median is reported).
    seed: the inputs' PRNG seed.
    per_layer: time each layer too; False: the whole network only (no rows).

  Returns:
    The table.

  Raises:
    ValueError: a bad ``batch_size``, ``repeats`` or execution.
  """
  _check(batch_size, repeats)
  methods = list(methods)
  if execution_name is None:
    execution_name = execution.default_for(methods)
  run = execution.get(execution_name, methods, trainable, cstate)
  plan = base.stack(methods)
  variables = {"params": plan.apply(trainable, cstate)}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  before = cost.summarize(model, baseline, input_shape)
  after = compressed_summary(model, plan, trainable, cstate, batch_stats, input_shape)
  if execution.skips_zeros(run):  # a sparse run multiplies only the nonzero weights
    after = dataclasses.replace(after, layers=tuple(
        dataclasses.replace(r, flops=r.flops - 2 * (r.macs - r.nonzero_macs))
        for r in after.layers))
  after_rows = {r.path: r for r in after.layers}
  layers = [r for r in before.layers if r.macs]
  x = jax.random.normal(jax.random.key(seed), (batch_size, *input_shape))

  def whole(v, x):
    return model.apply(v, x, train=False)

  def whole_run(v, t, c, x):
    with run(t, c):
      return model.apply(v, x, train=False)

  network = time_pair(jax.jit(whole), (baseline, x), jax.jit(whole_run),
                      (variables, trainable, cstate, x), repeats)
  inputs = (layer_inputs(model, baseline, x, [r.path for r in layers], train=False)
            if per_layer else {})
  rows = []
  for r in layers if per_layer else ():
    module, h = inputs[r.path]

    def one(p, h, module=module, path=r.path):
      return call_at(module, path, p, h)

    def one_run(p, t, c, h, module=module, path=r.path):
      with run(t, c):
        return call_at(module, path, p, h)

    seconds = time_pair(jax.jit(one), (baseline["params"], h), jax.jit(one_run),
                        (variables["params"], trainable, cstate, h), repeats)
    other = after_rows[r.path]
    rows.append(Row(r.path, (r.params, other.params), (r.flops, other.flops),
                    (r.macs, other.macs), seconds,
                    (seconds[0] / network[0], seconds[1] / network[1])))
  total = Row("total", (before.params, after.params), (before.flops, after.flops),
              (before.macs, after.macs), network, (1.0, 1.0))
  return Table(tuple(rows), total, execution_name, batch_size, repeats)


def render(table: Table, fmt: str = "text") -> str:
  """The table as ``text`` or ``markdown`` (times in ms, shares of the network time)."""
  header = ["Layer", "Params orig", "Params comp", "Ratio", "FLOPs orig", "FLOPs comp",
            "Speed-up", "Time orig ms", "Time comp ms", "Speed-up", "Share orig",
            "Share comp"]

  def cells(row: Row) -> list[str]:
    return [row.layer, f"{row.params[0]:,}", f"{row.params[1]:,}",
            f"{row.params[1] / row.params[0]:.3f}", f"{row.flops[0]:,}", f"{row.flops[1]:,}",
            f"{row.flops[0] / row.flops[1]:.2f}x", f"{row.seconds[0] * 1e3:.3f}",
            f"{row.seconds[1] * 1e3:.3f}", f"{row.seconds[0] / row.seconds[1]:.2f}x",
            f"{row.share[0]:.1%}", f"{row.share[1]:.1%}"]

  return report.render(header, [cells(r) for r in table.rows],
                       "markdown" if fmt == "markdown" else "text", footer=[cells(table.total)])


def from_workdirs(workdir: str, baseline: str, *, checkpoint: str | int = "latest",
                  execution_name: str | None = None, batch_size: int = 128,
                  repeats: int = 10, per_layer: bool = True) -> Table:
  """:func:`compare` of ``workdir``'s compressed model against ``baseline``'s.

  Raises:
    ValueError: the two workdirs hold different models (the message names
      ``--baseline``), or as :func:`compare`.
  """
  _check(batch_size, repeats)
  model, state, meta, _ = load_workdir(workdir, checkpoint)
  _, src, src_meta, src_method = load_workdir(baseline)
  keys = ("model", "model_config", "dataset")
  if [meta[k] for k in keys] != [src_meta[k] for k in keys]:
    raise ValueError(f"--baseline {baseline} holds {src_meta['model']} "
                     f"{src_meta['model_config']} on {src_meta['dataset']}, --workdir "
                     f"{workdir} {meta['model']} {meta['model_config']} on {meta['dataset']}")
  original = {"params": src_method.apply(src.params, src.cstate)}
  if src.batch_stats:
    original["batch_stats"] = src.batch_stats
  return compare(model, original, plan_methods(meta["compression"]), state.params,
                 state.cstate, tuple(meta["input_shape"]), batch_stats=state.batch_stats,
                 execution_name=execution_name, batch_size=batch_size, repeats=repeats,
                 per_layer=per_layer)
