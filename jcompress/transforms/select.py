"""Choosing tensors by "/"-joined parameter path: the one place that decides which
weights a transform touches (and which optimizer labels they get).

Paths come in the model's creation order (Flax keeps submodules in call order),
so "first" and "last" layer mean what the forward pass does first and last.

>>> params = {"conv1": {"kernel": np.zeros((5, 5, 1, 20)), "bias": np.zeros(20)},
...           "fc1": {"kernel": np.zeros((800, 500)), "bias": np.zeros(500)},
...           "fc2": {"kernel": np.zeros((500, 10)), "bias": np.zeros(10)}}
>>> select(params)
['conv1/kernel', 'fc1/kernel', 'fc2/kernel']
>>> select(params, "fc", keep_ends=True)
['fc1/kernel']
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import numpy as np  # noqa: F401  (doctest)
from flax import traverse_util


def flatten(tree: Any) -> dict[str, Any]:
  """``{"a/b/kernel": leaf}`` in creation order (dict insertion order, not sorted);
  ``flax.traverse_util.flatten_dict`` with "/" joins (any mapping, e.g. orbax's)."""
  if not hasattr(tree, "items") or hasattr(tree, "shape"):
    return {"": tree}
  return traverse_util.flatten_dict(_plain(tree), sep="/")


def _plain(tree: Any) -> Any:
  """Nested plain dicts (flatten_dict takes dicts and FrozenDicts only)."""
  if hasattr(tree, "items") and not hasattr(tree, "shape"):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def unflatten(flat: dict[str, Any]) -> dict:
  """Inverse of :func:`flatten` (nested plain dicts)."""
  return traverse_util.unflatten_dict(flat, sep="/")


def is_weight(path: str, leaf: Any) -> bool:
  """Kernels of conv / dense / locally-connected layers (ndim >= 2), not biases,
  batch-norm scales or other vectors."""
  return path.rsplit("/", 1)[-1] == "kernel" and np.ndim(leaf) >= 2


def order_like(template: Any, tree: Any) -> Any:
  """``tree`` with each dict's keys in ``template``'s order where both hold the same
  keys. JAX rebuilds dicts in sorted key order (``jax.tree.map``, ``jit``, orbax
  restores); a model's freshly ``init``-ed params keep its creation order, which
  :func:`select`'s ``keep_ends`` relies on.

  >>> list(order_like({"b": 0, "a": 0}, {"a": 1, "b": 2}))
  ['b', 'a']
  """
  if isinstance(template, dict) and isinstance(tree, dict) and set(template) == set(tree):
    return {k: order_like(template[k], tree[k]) for k in template}
  if isinstance(template, dict) and isinstance(tree, dict):  # extra leaves (kernel_wp...)
    return {k: order_like(template.get(k), tree[k]) for k in
            [k for k in template if k in tree] + [k for k in tree if k not in template]}
  return tree


def select(params: Any, pattern: str | None = None, *, min_size: int = 0,
           keep_ends: bool = False,
           predicate: Callable[[str, Any], bool] = is_weight) -> list[str]:
  """The paths of ``params`` a transform should touch, in creation order.

  Args:
    params: a parameter pytree (nested dicts).
    pattern: regex searched in each "/"-joined path (``--select``); None = all.
    min_size: only tensors with more than this many elements (``--min-size``).
    keep_ends: leave out the first and the last weight tensor (``--keep-ends``:
      the first conv/dense and the final classifier stay full precision), in the
      order of ``params``' dicts: pass params in creation order (:func:`order_like`).
    predicate: ``(path, leaf) -> bool`` of candidate tensors (default: kernels).

  Raises:
    ValueError: ``pattern`` is not a valid regular expression (the message names
      ``--select``), or nothing is selected; the message lists the candidate paths.
  """
  if pattern is not None:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"--select {pattern!r} is not a valid regular expression: {e}") from None
  candidates = {p: leaf for p, leaf in flatten(params).items() if predicate(p, leaf)}
  order = list(candidates)
  chosen = [p for p in order if np.size(candidates[p]) > min_size
            and (pattern is None or re.search(pattern, p))]
  if keep_ends and order:
    chosen = [p for p in chosen if p not in (order[0], order[-1])]
  if not chosen:
    listing = "\n  ".join(f"{p} {tuple(np.shape(candidates[p]))}" for p in order)
    rules = ", ".join(f for f, on in (
        (f"--select {pattern!r}", pattern is not None), (f"--min-size {min_size}", min_size),
        ("--keep-ends", keep_ends)) if on) or "the default rule"
    raise ValueError(f"{rules} selects no tensor; the model's weight tensors are:\n  {listing}")
  return chosen


def mask_tree(params: Any, paths: list[str]) -> Any:
  """A pytree like ``params`` with True at ``paths`` and False elsewhere (e.g. for
  ``optax.multi_transform`` labels or ``optax.masked``)."""
  chosen = set(paths)
  return unflatten({p: p in chosen for p in flatten(params)})


def check_present(flat: dict[str, Any], chosen: Sequence[str]) -> None:
  """Raises ValueError naming the chosen paths missing from ``flat``, and the leaves
  an earlier method put in their place (Tucker's factors, a shared codebook).

  >>> check_present({"fc/kernel_codebook": 0}, ["fc/kernel"])
  Traceback (most recent call last):
  ...
  ValueError: selected parameter paths not in the params: fc/kernel (an earlier method replaced it by fc/kernel_codebook)
  """
  missing = [p for p in chosen if p not in flat]
  if not missing:
    return
  replaced = sorted(q for q in flat for p in missing if q.startswith(p) and q != p)
  hint = f" (an earlier method replaced it by {', '.join(replaced)})" if replaced else ""
  raise ValueError(f"selected parameter paths not in the params: {', '.join(missing)}{hint}")


def check_new_leaves(flat: dict[str, Any], chosen: list[str], suffixes: tuple[str, ...],
                     method: str) -> None:
  """Raises ValueError unless every chosen path is in ``flat`` and none of the
  leaves ``path + suffix`` a method adds next to it exists yet."""
  check_present(flat, chosen)
  clash = [p + s for p in chosen for s in suffixes if p + s in flat]
  if clash:
    raise ValueError(f"the model already has parameters named {', '.join(clash)}; "
                     f"{method} needs those names")
