"""Magnitude pruning with masks held through retraining (Han et al. 2015; Zhu & Gupta 2017).

The method ``prune`` (``jcompress compress --method prune``) keeps a boolean mask
per selected tensor in ``cstate["masks"]`` (nested like the params). ``apply``
zeroes the pruned entries (so their gradient is exactly zero), ``update``
re-zeroes them after every optimizer step and tightens the masks on the
schedule's steps, and ``optimizer`` drops the update of every masked-layer entry
that is exactly zero with an exactly zero gradient (it cannot see ``cstate``;
pruned entries always are, live ones only by coincidence, for one step), so
pruned weights never move, even under Adam's momentum and weight decay.

* Criterion: the smallest ``|w|`` (``--structure none``) or whole output
  channels, the last kernel axis (Dense ``(in, out)``, Conv ``(kh, kw, in, out)``),
  by their L1 or L2 norm (``--structure l1|l2``); a pruned channel's bias is
  masked too, so the neuron outputs exactly zero.
* Exact counts: a tensor of ``n`` weights (or ``n`` channels) at sparsity ``s``
  loses exactly ``round(s * n)`` of them; ties go to the lower flat index.
  ``--scope global`` ranks all selected weights together and prunes
  ``round(s * N)`` of the ``N``, so layers end at different sparsities.
* Masks only tighten: entries pruned earlier rank below every live one.
* ``--prune-schedule``: ``oneshot`` (prune at ``init``; the other schedule options
  are unused), ``iterative`` (``k =
  --iterations`` equal steps ``s * j / k``, ``j = 1..k``, at ``--begin-step + (j - 1)
  * --interval``) or ``gradual`` (Zhu & Gupta: at ``t = t0 + j dt``, ``j = 0..n``,
  ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3`` with ``t0 = --begin-step``,
  ``dt = --interval``, ``n dt = --steps``, ``s_i = --initial-sparsity``; frozen at
  ``s_f`` afterwards). A stage due at step 0 runs in ``init``.

>>> method = base.build("prune", ["w"], sparsity="0.5")
>>> trainable, cstate = method.init({"w": jnp.array([[0.1, -3.0], [2.0, -0.2]])})
>>> trainable["w"].tolist(), cstate["masks"]["w"].tolist()
([[0.0, -3.0], [2.0, 0.0]], [[False, True], [True, False]])
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jcompress.transforms import base, packing
from jcompress.transforms import select as sel

SCHEDULES = ("oneshot", "iterative", "gradual")
SCOPES = ("layer", "global")
STRUCTURES = ("none", "l1", "l2")


# ----------------------------------------------------------------------------
# Options.


def _fraction(text: str, option: str) -> float:
  try:
    value = float(text)
  except (TypeError, ValueError):
    raise ValueError(f"{option}: {text!r} is not a number") from None
  if not 0 <= value < 1:
    raise ValueError(f"{option}: must be in [0, 1), got {text!r}")
  return value


def parse_sparsity(spec: str | float, paths: Sequence[str]) -> dict[str, float]:
  """Each selected path's target sparsity from ``--sparsity``.

  ``spec`` is one value (``'0.9'``) or comma-separated rules ``PATTERN=VALUE``
  (``'conv1=0.34,fc1=0.92'``), first match wins; a bare value among the rules is
  the default. A pattern is a regex matched against whole leading components of
  a path: ``fc1`` matches ``fc1/kernel`` but not ``fc10/kernel``; ``.*dw`` matches
  ``block3/dw/kernel``.

  >>> parse_sparsity("0.5,fc1=0.9", ["fc1/kernel", "fc2/kernel"])
  {'fc1/kernel': 0.9, 'fc2/kernel': 0.5}

  Raises:
    ValueError: a value is not a number in [0, 1), a rule matches no selected
      path, or a path gets no value; the message lists the selected paths.
  """
  if isinstance(spec, bool) or not isinstance(spec, (str, int, float)):
    raise ValueError(f"--sparsity must be a string like '0.9' or 'fc1=0.9,0.5', got {spec!r}")
  default, rules = None, []
  for item in str(spec).split(","):
    pattern, eq, value = item.strip().rpartition("=")
    if not eq:
      if default is not None:
        raise ValueError(f"--sparsity {spec!r} has two default values")
      default = _fraction(value, "--sparsity")
      continue
    try:
      regex = re.compile(f"(?:{pattern.strip()})(?:/|$)")
    except re.error as e:
      raise ValueError(f"--sparsity rule {item.strip()!r}: bad regex ({e})") from None
    rules.append((item.strip(), regex, _fraction(value, f"--sparsity rule {item.strip()!r}")))
  listing = ", ".join(paths)
  out = {}
  for rule, regex, value in rules:
    if not any(regex.match(p) for p in paths):
      raise ValueError(f"--sparsity rule {rule!r} matches none of the selected paths: {listing}")
  for path in paths:
    value = next((v for _, regex, v in rules if regex.match(path)), default)
    if value is None:
      raise ValueError(f"--sparsity {spec!r} gives no sparsity for {path!r}: add a rule or a "
                       f"default value ('0.9,...'); selected paths: {listing}")
    out[path] = value
  return out


def schedule(kind: str, final: float, *, initial: float = 0.0, begin_step: int = 0,
             interval: int = 1, steps: int = 1, iterations: int = 1
             ) -> list[tuple[int, float]]:
  """The ``(step, sparsity)`` stages of a schedule: masks are recomputed at ``step``.

  >>> schedule("gradual", 0.8, begin_step=10, interval=5, steps=10)
  [(10, 0.0), (15, 0.7000000000000001), (20, 0.8)]
  >>> schedule("iterative", 0.9, interval=100, iterations=3)
  [(0, 0.3), (100, 0.6), (200, 0.9)]
  """
  if kind == "oneshot":
    return [(0, final)]
  if kind == "iterative":
    return [(begin_step + j * interval, final * (j + 1) / iterations) for j in range(iterations)]
  n = steps // interval
  return [(begin_step + j * interval, final + (initial - final) * (1 - j / n) ** 3)
          for j in range(n + 1)]


def _check_options(paths, sparsity, scope, structure, prune_schedule, iterations, interval,
                   steps, begin_step, initial_sparsity) -> dict[str, float]:
  for name, value, choices in (("--scope", scope, SCOPES), ("--structure", structure, STRUCTURES),
                               ("--prune-schedule", prune_schedule, SCHEDULES)):
    if value not in choices:
      raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
  targets = parse_sparsity(sparsity, paths)
  if scope == "global":
    if len(set(targets.values())) > 1 or "=" in str(sparsity):
      raise ValueError(f"--scope global takes one --sparsity value, got {sparsity!r}")
    if structure != "none":
      raise ValueError(f"--structure {structure} prunes channels per layer: use --scope layer")
  for name, value, low in (("--iterations", iterations, 1), ("--interval", interval, 1),
                           ("--steps", steps, 1), ("--begin-step", begin_step, 0)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
  if prune_schedule == "gradual":
    if steps % interval:
      raise ValueError(f"--steps ({steps}) must be a multiple of --interval ({interval})")
    initial = _fraction(initial_sparsity, "--initial-sparsity")
    for path, final in targets.items():
      if initial > final:
        raise ValueError(f"--initial-sparsity {initial} exceeds the --sparsity {final} of {path!r}")
  return targets


# ----------------------------------------------------------------------------
# Masks.


def _scores(w: jax.Array, mask: jax.Array, structure: str) -> jax.Array:
  """One score per prunable unit (weight or output channel); pruned units score -1."""
  if structure == "none":
    return jnp.where(mask, jnp.abs(w).astype(jnp.float32), -1.0).reshape(-1)
  axes = tuple(range(w.ndim - 1))
  w = w.astype(jnp.float32)
  norm = (jnp.sum(jnp.abs(w), axes) if structure == "l1"
          else jnp.sqrt(jnp.sum(jnp.square(w), axes)))
  return jnp.where(jnp.any(mask, axes), norm, -1.0)


def _keep(scores: jax.Array, k: Any) -> jax.Array:
  """False at the ``k`` lowest scores (ties: lower index first), True elsewhere."""
  order = jnp.argsort(scores, stable=True)
  return jnp.zeros(scores.shape, bool).at[order].set(jnp.arange(scores.size) >= k)


def _bias_path(path: str) -> str:
  return path.rsplit("/", 1)[0] + "/bias" if "/" in path else "bias"


def _check_masks(flat: dict[str, Any], masks: dict[str, Any]) -> None:
  for path, m in masks.items():
    if path not in flat:
      raise ValueError(f"prune: mask {path!r} names no parameter; parameters look like "
                       f"{next(iter(flat), '(none)')!r}")
    if tuple(np.shape(m)) != tuple(np.shape(flat[path])):
      raise ValueError(f"prune: mask for {path!r} has shape {tuple(np.shape(m))}, the "
                       f"parameter {tuple(np.shape(flat[path]))}")


def _path_of(keypath) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)


def _map_masked(fn: Callable, tree: Any, masks: dict[str, Any]) -> Any:
  """``fn(leaf, mask)`` at the masked paths of ``tree``, keeping its structure."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, leaf: fn(leaf, masks[_path_of(kp)]) if _path_of(kp) in masks else leaf, tree)


def _zero_pruned(tree: Any, masks: dict[str, Any]) -> Any:
  return _map_masked(lambda w, m: jnp.where(m, w, jnp.zeros((), w.dtype)), tree, masks)


class _Pruner:
  """The mask computation of one configured method, shared by its functions."""

  def __init__(self, paths: list[str], scope: str, structure: str,
               stages: dict[str, list[tuple[int, float]]]):
    self.paths, self.scope, self.structure = paths, scope, structure
    self.starts = [t for t, _ in stages[paths[0]]]
    self.levels = {p: [s for _, s in stages[p]] for p in paths}

  def units(self, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) if self.structure == "none" else shape[-1]

  def counts(self, flat: dict[str, Any]) -> np.ndarray:
    """Units pruned at each stage, ``(stages, groups)``: one group per path, or one
    for all under ``--scope global``."""
    if self.scope == "global":
      total = sum(np.size(flat[p]) for p in self.paths)
      return np.array([[round(s * total)] for s in self.levels[self.paths[0]]], np.int32)
    return np.array([[round(self.levels[p][j] * self.units(np.shape(flat[p])))
                      for p in self.paths] for j in range(len(self.starts))], np.int32)

  def owned(self, flat: dict[str, Any]) -> list[str]:
    """The masked paths: the selected tensors and, for channel pruning, their biases."""
    for p in self.paths:
      if p not in flat:
        raise ValueError(f"prune: {p!r} is not a parameter path; parameters look like "
                         f"{next(iter(flat), '(none)')!r}")
      if self.structure != "none" and np.ndim(flat[p]) < 2:
        raise ValueError(f"--structure {self.structure} needs kernels with an output axis; "
                         f"{p!r} has shape {tuple(np.shape(flat[p]))}")
    if self.structure == "none":
      return list(self.paths)
    biases = [_bias_path(p) for p in self.paths]
    return list(self.paths) + [b for p, b in zip(self.paths, biases)
                               if b in flat and np.shape(flat[b]) == np.shape(flat[p])[-1:]]

  def prune(self, flat: dict[str, Any], masks: dict[str, Any], counts: Any) -> dict[str, Any]:
    """Masks with ``counts[g]`` units pruned per group, tightening ``masks``."""
    return _prune({p: flat[p] for p in self.paths}, masks, jnp.asarray(counts),
                  paths=tuple(self.paths), scope=self.scope, structure=self.structure)


# Jitted once per configuration and shapes: eager, init would compile every op.
@functools.partial(jax.jit, static_argnames=("paths", "scope", "structure"))
def _prune(weights: dict[str, Any], masks: dict[str, Any], counts: jax.Array, *,
           paths: tuple[str, ...], scope: str, structure: str) -> dict[str, Any]:
  scores = {p: _scores(weights[p], masks[p], structure) for p in paths}
  if scope == "global":
    keep = jnp.split(_keep(jnp.concatenate([scores[p] for p in paths]), counts[0]),
                     np.cumsum([scores[p].size for p in paths])[:-1])
    keeps = dict(zip(paths, keep))
  else:
    keeps = {p: _keep(scores[p], counts[i]) for i, p in enumerate(paths)}
  out = dict(masks)  # "& masks": a pruned unit stays pruned, whatever the counts
  for p in paths:
    shape = np.shape(weights[p])
    out[p] = masks[p] & (keeps[p].reshape(shape) if structure == "none"
                         else jnp.broadcast_to(keeps[p], shape))
    if structure != "none" and _bias_path(p) in masks:
      out[_bias_path(p)] = masks[_bias_path(p)] & keeps[p]
  return out


# ----------------------------------------------------------------------------
# The method.


@base.register(
    "prune",
    base.Option("sparsity", str, "0.9", "fraction of weights pruned: one value, or rules "
                "'REGEX=S,...' over the selected paths (first match wins, a bare value is "
                "the default), e.g. 'fc1=0.92,fc2=0.91,0.74'"),
    base.Option("scope", str, "layer", "one threshold per layer or one across all "
                "selected layers", SCOPES),
    base.Option("structure", str, "none", "prune single weights (none) or whole output "
                "channels by their l1 / l2 norm", STRUCTURES),
    base.Option("prune-schedule", str, "oneshot", "oneshot at the start; iterative in "
                "--iterations equal steps every --interval steps; gradual: Zhu & Gupta's "
                "cubic ramp over --steps", SCHEDULES),
    base.Option("iterations", int, 5, "iterative: pruning steps to reach --sparsity"),
    base.Option("interval", int, 100, "iterative / gradual: optimizer steps between mask updates"),
    base.Option("steps", int, 1000, "gradual: optimizer steps of the ramp (n * interval)"),
    base.Option("begin-step", int, 0, "iterative / gradual: step of the first mask update"),
    base.Option("initial-sparsity", float, 0.0, "gradual: sparsity at --begin-step"),
    help="magnitude pruning (per layer or global, weights or channels) with masks held "
         "during fine-tuning")
def prune_method(paths: list[str], *, sparsity: str = "0.9", scope: str = "layer",
                 structure: str = "none", prune_schedule: str = "oneshot", iterations: int = 5,
                 interval: int = 100, steps: int = 1000, begin_step: int = 0,
                 initial_sparsity: float = 0.0) -> base.Method:
  """Magnitude pruning of ``paths`` (see the module docstring for the options).

  >>> m = base.build("prune", ["w"], sparsity="0.75", prune_schedule="gradual",
  ...                interval=2, steps=4)
  >>> t, c = m.init({"w": jnp.arange(1.0, 9.0)})
  >>> int(c["masks"]["w"].sum()), int(m.update(t, c, 2)[1]["masks"]["w"].sum())
  (8, 3)
  """
  if not paths:
    raise ValueError("prune: no tensor selected")
  targets = _check_options(paths, sparsity, scope, structure, prune_schedule, iterations,
                           interval, steps, begin_step, initial_sparsity)
  stages = {p: schedule(prune_schedule, s, initial=float(initial_sparsity),
                        begin_step=begin_step, interval=interval, steps=steps,
                        iterations=iterations) for p, s in targets.items()}
  pruner = _Pruner(list(paths), scope, structure, stages)
  starts = pruner.starts
  t0, dt = starts[0], interval

  def init(params):
    flat = sel.flatten(params)
    masks = {p: jnp.ones(np.shape(flat[p]), bool) for p in pruner.owned(flat)}
    if t0 == 0:
      masks = pruner.prune(flat, masks, pruner.counts(flat)[0])
    return _zero_pruned(params, masks), {"masks": sel.unflatten(masks)}

  def apply(trainable, cstate):
    masks = sel.flatten(cstate["masks"])
    _check_masks(sel.flatten(trainable), masks)
    return _zero_pruned(trainable, masks)

  def update(trainable, cstate, step):
    flat, masks = sel.flatten(trainable), sel.flatten(cstate["masks"])
    _check_masks(flat, masks)
    if step is not None and (len(starts) > 1 or t0 > 0):
      table = jnp.asarray(pruner.counts(flat))
      stage = (step - t0) // dt
      due = (step >= t0) & ((step - t0) % dt == 0) & (stage < len(starts))
      counts = table[jnp.clip(stage, 0, len(starts) - 1)]
      masks = lax.cond(due, lambda: pruner.prune(flat, masks, counts), lambda: masks)
    return _zero_pruned(trainable, masks), {"masks": sel.unflatten(masks)}

  def optimizer(trainable, base_tx):
    owned = set(pruner.owned(sel.flatten(trainable)))
    inner = optax.with_extra_args_support(base_tx)

    def update_fn(grads, state, params=None, **extra):
      if params is None:
        raise ValueError("prune: the optimizer needs the params: tx.update(grads, state, params)")
      updates, state = inner.update(grads, state, params, **extra)
      # The optimizer cannot see cstate. A pruned entry is exactly zero with an exactly
      # zero gradient (apply's where); its momentum and weight decay must not move it.
      flat_g, flat_p = sel.flatten(grads), sel.flatten(params)
      frozen = {p: (flat_g[p] == 0) & (flat_p[p] == 0) for p in owned
                if hasattr(flat_g.get(p), "shape")}
      return _map_masked(lambda u, f: jnp.where(f, jnp.zeros((), u.dtype), u), updates,
                         frozen), state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)

  return base.Method("prune", init, apply, update, optimizer)


# ----------------------------------------------------------------------------
# Reports and export.


def sparsity_report(params: Any, cstate: Any) -> dict[str, Any]:
  """Per masked tensor and over all of them: size, nonzero count and sparsity.

  ``params`` may be the trainable or the forward params: the masks are applied.

  >>> m = base.build("prune", ["w"], sparsity="0.25")
  >>> sparsity_report(*m.init({"w": jnp.arange(1.0, 5.0)}))["global"]
  {'size': 4, 'nonzero': 3, 'sparsity': 0.25}
  """
  flat, masks = sel.flatten(params), sel.flatten(cstate["masks"])
  _check_masks(flat, masks)
  layers = {}
  for path, m in masks.items():
    n, nz = int(np.size(m)), int(np.count_nonzero(np.asarray(m) & (np.asarray(flat[path]) != 0)))
    layers[path] = {"size": n, "nonzero": nz, "sparsity": 1 - nz / n if n else 0.0}
  size = sum(v["size"] for v in layers.values())
  nonzero = sum(v["nonzero"] for v in layers.values())
  return {"layers": layers, "global": {"size": size, "nonzero": nonzero,
                                       "sparsity": 1 - nonzero / size if size else 0.0}}


def _f32(values: np.ndarray) -> bytes:
  return np.asarray(values, "<f4").tobytes()


def _from_f32(buf: bytes, n: int) -> np.ndarray:
  return np.frombuffer(buf, "<f4", count=n)


def _encode(w: np.ndarray, mask: np.ndarray) -> tuple[bytes, dict]:
  """The smallest of dense float32, a 1-bit mask + kept values, or relative indices
  at the best width (2..16 bits) + values (fillers included)."""
  sections, meta = packing.pack_sparse(w.astype("<f4"), mask, 32, _f32)
  payload, layout = packing.concat(sections)
  return payload, {**meta, "shape": list(w.shape), "dense_bytes": 4 * int(np.size(w)),
                   "layout": layout}


def export_arrays(trainable: Any, cstate: Any) -> dict[str, tuple[bytes, dict]]:
  """The bytes to store per masked tensor, in its most compact form.

  The kept entries (mask True, in C order) are float32 values; where they are is
  stored as a 1-bit mask (``bitmask``), or as ``relative`` indices (the zeros
  skipped before each entry, ``index_bits`` wide, with zero-valued filler entries
  for longer runs, as in Deep Compression); a dense tensor stays ``dense``. The
  meta holds ``format``, ``shape``, ``kept``, ``dense_bytes`` and the ``layout``;
  the payload length is the tensor's stored size.

  >>> m = base.build("prune", ["w"], sparsity="0.99")
  >>> payload, meta = export_arrays(*m.init({"w": jnp.arange(1.0, 1001.0)}))["w"]
  >>> meta["format"], meta["index_bits"], len(payload), meta["dense_bytes"]
  ('relative', 10, 53, 4000)
  """
  flat, masks = sel.flatten(trainable), sel.flatten(cstate["masks"])
  _check_masks(flat, masks)
  return {path: _encode(np.asarray(flat[path]), np.asarray(m)) for path, m in masks.items()}


def import_arrays(exported: dict[str, tuple[bytes, dict]]) -> dict[str, np.ndarray]:
  """Inverse of :func:`export_arrays`: ``{path: float32 tensor}``, bit-identical to
  the pruned tensors ``apply`` gives the model.

  Raises:
    ValueError: a tensor has an unknown format.
  """
  out = {}
  for path, (payload, meta) in exported.items():
    shape = tuple(meta["shape"])
    out[path] = packing.unpack_sparse(packing.split(payload, meta["layout"]), meta,
                                      int(np.prod(shape)), np.float32, _from_f32).reshape(shape)
  return out
