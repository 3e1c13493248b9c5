"""Example order and subsets: every dataset class-mixed, subsets stratified.

Some sources list a split class by class (the CIFAR-10 JPEG copy: all airplanes,
then all automobiles...), so "the first N images" would be one or two classes.
:func:`mixed_order` gives each split a fixed, class-mixed order determined by the
images' contents (a seeded hash of pixels and label), applied once when a source is
decoded: two sources holding the same pixels give the same order, whatever order
their files list them in. :func:`stratified` takes ``--train-size`` /
``--test-size`` subsets with each class in proportion to the split.

>>> labels = np.repeat(np.arange(4), 25)  # sorted by class
>>> sub = stratified(labels, 8)
>>> np.bincount(labels[sub]).tolist()
[2, 2, 2, 2]
"""

from __future__ import annotations

import numpy as np

_SEED = 20261203
_CHUNK = 4096  # rows hashed at a time (bounded memory for CIFAR-sized splits)


def mixed_order(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """A permutation of the examples, pseudo-random and class-mixed, that depends
  only on each example's pixels and label (ties: the source's order).

  >>> x = np.arange(12, dtype=np.uint8).reshape(6, 2)
  >>> order = mixed_order(x, np.zeros(6, np.int32))
  >>> sorted(order.tolist()) == list(range(6)) and order.tolist() != list(range(6))
  True
  """
  return np.argsort(mixed_keys(images, labels), kind="stable")


def mixed_keys(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """The uint64 key of each example that :func:`mixed_order` sorts by: a function of
  that example alone, so keys of a split read in parts are the split's keys."""
  n = len(labels)
  flat = images.reshape(n, -1)
  weights = np.random.default_rng(_SEED).integers(1, 2 ** 63, flat.shape[1], dtype=np.uint64) | 1
  keys = np.empty(n, np.uint64)
  with np.errstate(over="ignore"):
    for start in range(0, n, _CHUNK):
      rows = flat[start:start + _CHUNK].astype(np.uint64)
      h = (rows * weights).sum(axis=1, dtype=np.uint64)
      h ^= labels[start:start + _CHUNK].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
      h ^= h >> np.uint64(31)  # mix high bits down: the sum is linear
      h *= np.uint64(0xBF58476D1CE4E5B9)
      h ^= h >> np.uint64(29)
      keys[start:start + _CHUNK] = h
  return keys


def stratified(labels: np.ndarray, n: int) -> np.ndarray:
  """Indices of ``n`` examples, each class in proportion to its share of ``labels``
  (largest remainders get the rounding), the first ones of each class in the
  split's order; returned in that order.

  Raises:
    ValueError: ``n`` is not in ``[1, len(labels)]``.
  """
  total = len(labels)
  if not 1 <= n <= total:
    raise ValueError(f"a subset of {n} examples from a split of {total}")
  if n == total:
    return np.arange(total)
  classes, counts = np.unique(labels, return_counts=True)
  exact = counts * n / total
  quota = np.floor(exact).astype(np.int64)
  quota[np.argsort(-(exact - quota), kind="stable")[:n - quota.sum()]] += 1
  keep = np.zeros(total, bool)
  for c, q in zip(classes, quota):
    keep[np.flatnonzero(labels == c)[:q]] = True
  return np.flatnonzero(keep)
