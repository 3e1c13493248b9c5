"""Magnitude-pruning masks and their schedules (the machinery of the ``prune`` method,
:mod:`jcompress.transforms.prune`): ``--sparsity`` rules per path, the one-shot,
iterative and Zhu & Gupta 2017 gradual schedules, and exact-count masks of the
smallest weights or output channels, per layer or global.

>>> schedule("iterative", 0.9, iterations=3, interval=10)
[(0, 0.3), (10, 0.6), (20, 0.9)]
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("oneshot", "iterative", "gradual")
SCOPES = ("layer", "global")
STRUCTURES = ("none", "l1", "l2", "N:M")


def parse_structure(text: Any) -> str:
  """``none``, ``l1``, ``l2`` or ``N:M`` (N kept of every M consecutive weights
  along the input axis, ``0 < N < M <= 64``), normalised.

  >>> parse_structure("2:4"), parse_structure("L1")
  ('2:4', 'l1')
  """
  t = str(text).strip().lower()
  if t in STRUCTURES[:3]:
    return t
  m = re.fullmatch(r"(\d+):(\d+)", t)
  if m and 0 < int(m[1]) < int(m[2]) <= 64:
    return f"{int(m[1])}:{int(m[2])}"
  raise ValueError(f"expected none, l1, l2 or N:M with 0 < N < M <= 64 (e.g. 2:4), got {text!r}")


def n_of_m(structure: str) -> tuple[int, int] | None:
  """``(N, M)`` of an ``N:M`` structure, else None."""
  return tuple(map(int, structure.split(":"))) if ":" in structure else None


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
             interval: int = 1, ramp_steps: int = 1, iterations: int = 1
             ) -> list[tuple[int, float]]:
  """The ``(step, sparsity)`` stages of a schedule: masks are recomputed at ``step``.

  >>> schedule("gradual", 0.8, begin_step=10, interval=5, ramp_steps=10)
  [(10, 0.0), (15, 0.7000000000000001), (20, 0.8)]
  >>> schedule("iterative", 0.9, interval=100, iterations=3)
  [(0, 0.3), (100, 0.6), (200, 0.9)]
  """
  if kind == "oneshot":
    return [(0, final)]
  if kind == "iterative":
    return [(begin_step + j * interval, final * (j + 1) / iterations) for j in range(iterations)]
  n = ramp_steps // interval
  return [(begin_step + j * interval, final + (initial - final) * (1 - j / n) ** 3)
          for j in range(n + 1)]


def check_options(paths, sparsity, scope, structure, prune_schedule, iterations, interval,
                   ramp_steps, begin_step, initial_sparsity) -> dict[str, float]:
  targets = parse_sparsity(sparsity, paths)
  nm = n_of_m(structure)
  if nm is not None:  # the pattern fixes the sparsity of every layer
    if scope == "global":
      raise ValueError(f"--structure {structure} keeps {nm[0]} of every {nm[1]} weights per "
                       "layer: use --scope layer")
    targets = {p: 1 - nm[0] / nm[1] for p in paths}
  if scope == "global":
    if len(set(targets.values())) > 1 or "=" in str(sparsity):
      raise ValueError(f"--scope global takes one --sparsity value, got {sparsity!r}")
    if structure != "none":
      raise ValueError(f"--structure {structure} prunes channels per layer: use --scope layer")
  if prune_schedule == "gradual":
    if ramp_steps % interval:
      raise ValueError(f"--ramp-steps ({ramp_steps}) must be a multiple of --interval "
                       f"({interval})")
    initial = _fraction(initial_sparsity, "--initial-sparsity")
    for path, final in targets.items():
      if initial > final:
        raise ValueError(f"--initial-sparsity {initial} exceeds the --sparsity {final} of {path!r}")
  return targets


# ----------------------------------------------------------------------------
# Masks.


def _scores(w: jax.Array, mask: jax.Array, structure: str) -> jax.Array:
  """One score per prunable unit (weight or output channel); pruned units score -1.
  ``N:M``: the weights' scores in the kernel's shape."""
  if structure == "none" or ":" in structure:
    scores = jnp.where(mask, jnp.abs(w).astype(jnp.float32), -1.0)
    return scores if ":" in structure else scores.reshape(-1)
  axes = tuple(range(w.ndim - 1))
  w = w.astype(jnp.float32)
  norm = (jnp.sum(jnp.abs(w), axes) if structure == "l1"
          else jnp.sqrt(jnp.sum(jnp.square(w), axes)))
  return jnp.where(jnp.any(mask, axes), norm, -1.0)


def _keep(scores: jax.Array, k: Any) -> jax.Array:
  """False at the ``k`` lowest scores (ties: lower index first), True elsewhere."""
  order = jnp.argsort(scores, stable=True)
  return jnp.zeros(scores.shape, bool).at[order].set(jnp.arange(scores.size) >= k)


def _group_keep(scores: jax.Array, k: Any, m: int) -> jax.Array:
  """False at the ``k`` lowest scores of every ``m`` consecutive entries along the
  input axis (-2) of a kernel's ``scores``, True elsewhere (ties: lower index first)."""
  s = jnp.moveaxis(scores, -2, -1)
  groups = s.reshape(s.shape[:-1] + (s.shape[-1] // m, m))
  rank = jnp.argsort(jnp.argsort(groups, axis=-1, stable=True), axis=-1, stable=True)
  return jnp.moveaxis((rank >= k).reshape(s.shape), -1, -2)


def _bias_path(path: str) -> str:
  return path.rsplit("/", 1)[0] + "/bias" if "/" in path else "bias"


def check_masks(flat: dict[str, Any], masks: dict[str, Any], strict: bool = True) -> None:
  """Raises unless every mask fits its parameter; ``strict=False`` lets a mask's
  parameter be absent (a later method of the plan replaced it, e.g. Tucker)."""
  for path, m in masks.items():
    if path not in flat and not strict:
      continue
    if path not in flat:
      raise ValueError(f"prune: mask {path!r} names no parameter; parameters look like "
                       f"{next(iter(flat), '(none)')!r}")
    if tuple(np.shape(m)) != tuple(np.shape(flat[path])):
      raise ValueError(f"prune: mask for {path!r} has shape {tuple(np.shape(m))}, the "
                       f"parameter {tuple(np.shape(flat[path]))}")


def _path_of(keypath) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)


def map_masked(fn: Callable, tree: Any, masks: dict[str, Any]) -> Any:
  """``fn(leaf, mask)`` at the masked paths of ``tree``, keeping its structure."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, leaf: fn(leaf, masks[_path_of(kp)]) if _path_of(kp) in masks else leaf, tree)


def zero_pruned(tree: Any, masks: dict[str, Any]) -> Any:
  return map_masked(lambda w, m: jnp.where(m, w, jnp.zeros((), w.dtype)), tree, masks)


class Pruner:
  """The mask computation of one configured method, shared by its functions."""

  def __init__(self, paths: list[str], scope: str, structure: str,
               stages: dict[str, list[tuple[int, float]]]):
    self.paths, self.scope, self.structure = paths, scope, structure
    self.starts = [t for t, _ in stages[paths[0]]]
    self.levels = {p: [s for _, s in stages[p]] for p in paths}

  def units(self, shape: tuple[int, ...]) -> int:
    """What a stage's sparsity counts: weights, output channels, or (``N:M``) the
    weights of one group of M."""
    nm = n_of_m(self.structure)
    return (int(np.prod(shape)) if self.structure == "none" else
            nm[1] if nm else shape[-1])

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
      nm = n_of_m(self.structure)
      if nm and np.shape(flat[p])[-2] % nm[1]:
        raise ValueError(f"--structure {self.structure}: {p!r} has {np.shape(flat[p])[-2]} "
                         f"inputs, not a multiple of {nm[1]}; leave it out with --select")
    if self.structure == "none" or ":" in self.structure:
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
  elif ":" in structure:
    keeps = {p: _group_keep(scores[p], counts[i], n_of_m(structure)[1])
             for i, p in enumerate(paths)}
  else:
    keeps = {p: _keep(scores[p], counts[i]) for i, p in enumerate(paths)}
  out = dict(masks)  # "& masks": a pruned unit stays pruned, whatever the counts
  for p in paths:
    shape = np.shape(weights[p])
    out[p] = masks[p] & (keeps[p].reshape(shape) if structure == "none" or ":" in structure
                         else jnp.broadcast_to(keeps[p], shape))
    if structure in ("l1", "l2") and _bias_path(p) in masks:
      out[_bias_path(p)] = masks[_bias_path(p)] & keeps[p]
  return out
