"""Sparse execution of pruned dense (and 1x1 conv) layers.

A pruned kernel ``W`` of shape ``(in, out)`` (a 1x1 conv kernel ``(1, 1, in, out)``
is the same matrix) becomes a :class:`SparseMatrix` in one of four formats:

* ``csr``: ``W^T`` as a ``jax.experimental.sparse.BCSR`` matrix; on CPU, XLA
  multiplies it by ``x^T`` with its native CSR kernel (the batch padded to a
  multiple of 8). Memory: 8 bytes per nonzero plus 4 per output. The fastest
  format on CPU from about 90% sparsity (see the benchmark).
* ``ell``: per output column its nonzero rows and values, padded to the fullest
  column (``K`` entries): ``y[:, j] = sum_k x[:, idx[j, k]] * val[j, k]``, a gather
  and a reduction in plain ``jnp`` (any backend, vmappable).
* ``bcoo``: ``jax.experimental.sparse.BCOO`` (gather, multiply, scatter-add).
* ``compact``: the dense sub-matrix of the rows and columns that hold a nonzero,
  what structured (channel) pruning leaves: ``y[:, cols] = x[:, rows] @ W[rows, cols]``.

``benchmarks/sparse.py`` times them against the dense masked matmul on the layer
shapes of lenet300 and fcn-large. Every format computes the same products as the
dense layer (up to float summation order).

Inside a Flax model, :func:`sparse_execution` routes the ``nn.Dense`` (and 1x1
``nn.Conv``) modules whose kernel path has a sparse matrix to it. Put it inside
the jitted function and pass the matrices as arguments: Flax interceptors act
when the model is traced, not when a cached compilation runs.

>>> w = jnp.array([[0.0, 2.0], [0.0, 0.0], [1.0, 0.0]])
>>> m = from_dense(w, "ell")
>>> matmul(jnp.array([[1.0, 2.0, 3.0]]), m).tolist(), m.nonzero
([[3.0, 2.0]], 2)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding

from jcompress.transforms import select as sel

FORMATS = ("csr", "ell", "bcoo", "compact")


@flax.struct.dataclass
class SparseMatrix:
  """An ``(in, out)`` matrix in a sparse ``format``; a pytree (pass it to ``jit``).

  Attributes:
    format: one of :data:`FORMATS`.
    shape: ``(in, out)``.
    nonzero: stored nonzero entries.
    arrays: the format's arrays (``csr``: data, indices, indptr of ``W^T``; ``ell``:
      indices, values ``(out, K)``; ``bcoo``: data, indices; ``compact``: rows,
      cols, the dense sub-matrix).
  """
  format: str = flax.struct.field(pytree_node=False)
  shape: tuple[int, int] = flax.struct.field(pytree_node=False)
  nonzero: int = flax.struct.field(pytree_node=False)
  arrays: tuple[jax.Array, ...]

  @property
  def nbytes(self) -> int:
    """Bytes of the stored arrays."""
    return int(sum(a.size * a.dtype.itemsize for a in self.arrays))


def from_dense(w: Any, format: str = "csr") -> SparseMatrix:
  """``w`` (``(in, out)``, or a ``(1, 1, in, out)`` conv kernel) as a sparse matrix.

  Host-side (the layout depends on where the zeros are): call it outside ``jit``.

  Raises:
    ValueError: an unknown ``format`` or a kernel that is not a matrix.
  """
  w = np.asarray(w)
  if w.ndim == 4 and w.shape[:2] == (1, 1):
    w = w[0, 0]
  if w.ndim != 2:
    raise ValueError(f"sparse: a kernel of shape {w.shape} is not a dense or 1x1 conv kernel")
  n_in, n_out = w.shape
  nonzero = int(np.count_nonzero(w))
  if format == "csr":
    live = w.T != 0
    indptr = np.concatenate([[0], np.cumsum(live.sum(1))])
    arrays = (jnp.asarray(w.T[live]), jnp.asarray(np.nonzero(live)[1], jnp.int32),
              jnp.asarray(indptr, jnp.int32))
  elif format == "ell":
    live = w.T != 0
    width = max(int(live.sum(1).max(initial=0)), 1)
    order = np.argsort(~live, axis=1, kind="stable")[:, :width]  # nonzero rows first
    values = np.take_along_axis(w.T, order, 1) * np.take_along_axis(live, order, 1)
    arrays = (jnp.asarray(order, jnp.int32), jnp.asarray(values))
  elif format == "bcoo":
    arrays = (jnp.asarray(w[w != 0]), jnp.asarray(np.argwhere(w != 0), jnp.int32))
  elif format == "compact":
    rows, cols = np.flatnonzero(w.any(1)), np.flatnonzero(w.any(0))
    arrays = (jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32),
              jnp.asarray(w[np.ix_(rows, cols)]))
  else:
    raise ValueError(f"sparse: unknown format {format!r}; valid: {', '.join(FORMATS)}")
  return SparseMatrix(format, (n_in, n_out), nonzero, arrays)


def matmul(x: jax.Array, m: SparseMatrix) -> jax.Array:
  """``x @ W`` for ``x`` of shape ``(..., in)`` (jittable)."""
  from jax.experimental import sparse as jsparse  # pylint: disable=import-outside-toplevel
  # (imported here: it takes a third of a second, which every command paid)
  n_in, n_out = m.shape
  lead = x.shape[:-1]
  x = x.reshape(-1, n_in)
  if m.format == "csr":
    data, indices, indptr = m.arrays
    mat = jsparse.BCSR((data, indices, indptr), shape=(n_out, n_in), indices_sorted=True,
                       unique_indices=True)
    # XLA:CPU's CSR kernel is ~3x faster when the dense operand's column count is
    # a multiple of 8 (measured: batch 8 or 128 fast, 1..7, 9 or 127 slow), so pad.
    rows = x.shape[0]
    x = jnp.pad(x, ((0, -rows % 8), (0, 0)))
    y = (mat @ x.T.astype(data.dtype)).T[:rows]
  elif m.format == "ell":
    indices, values = m.arrays
    y = jnp.sum(x.at[:, indices].get(mode="promise_in_bounds") * values, axis=-1)
  elif m.format == "bcoo":
    data, indices = m.arrays
    y = x @ jsparse.BCOO((data, indices), shape=(n_in, n_out), indices_sorted=True,
                         unique_indices=True)
  else:
    rows, cols, sub = m.arrays
    y = (x if rows.shape[0] == n_in else x[:, rows]) @ sub
    if cols.shape[0] != n_out:
      y = jnp.zeros((x.shape[0], n_out), y.dtype).at[:, cols].set(y)
  return y.reshape(*lead, n_out)


def sparsify(params: Any, paths: Sequence[str], format: str = "csr"
             ) -> dict[str, SparseMatrix]:
  """``{path: SparseMatrix}`` of the kernels at ``paths`` (e.g. the masked paths of
  a pruned model's forward params), for :func:`sparse_execution`.

  Raises:
    ValueError: a path names no parameter.
  """
  flat = sel.flatten(params)
  for path in paths:
    if path not in flat:
      raise ValueError(f"sparse: {path!r} is not a parameter path; parameters look like "
                       f"{next(iter(flat), '(none)')!r}")
  return {path: from_dense(flat[path], format) for path in paths}


def _check_conv(module: nn.Conv, path: str) -> None:
  ndim = len(module.kernel_size)
  padding = canonicalize_padding(module.padding, ndim)
  pointwise = (tuple(module.kernel_size) == (1,) * ndim and module.feature_group_count == 1
               and all(np.all(np.asarray(v) == 1) for v in (
                   module.strides or 1, module.input_dilation or 1, module.kernel_dilation or 1))
               and (isinstance(padding, str) or not np.any(np.asarray(padding)))
               and module.mask is None)
  if not pointwise:
    raise ValueError(f"sparse: {path!r} is a conv that is not 1x1 with stride 1, no "
                     "padding, dilation or groups; only those run sparse")


@contextlib.contextmanager
def sparse_execution(sparse_by_path: Mapping[str, Any],
                     multiply: Callable[[jax.Array, Any], jax.Array] | None = None
                     ) -> Iterator[None]:
  """Runs the ``nn.Dense`` / 1x1 ``nn.Conv`` modules whose ``<module path>/kernel``
  is in ``sparse_by_path`` with ``multiply(x, matrix)`` (default :func:`matmul`;
  ``jcompress.nm.matmul`` for N:M matrices) plus their bias.

  >>> model = nn.Dense(2)
  >>> variables = {"params": {"kernel": jnp.eye(3)[:, :2], "bias": jnp.ones(2)}}
  >>> with sparse_execution({"kernel": from_dense(variables["params"]["kernel"])}):
  ...   model.apply(variables, jnp.array([[1.0, 2.0, 3.0]])).tolist()
  [[2.0, 3.0]]

  Only what is traced inside the block runs sparse (jit the function that calls
  the model inside it); listed kernels whose module does not run are ignored, so
  one layer can be timed alone.

  Raises:
    ValueError: when a listed conv is not pointwise.
  """
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv)):
      return next_fun(*args, **kwargs)
    path = "/".join((*module.path, "kernel"))
    if path not in sparse_by_path:
      return next_fun(*args, **kwargs)
    if isinstance(module, nn.Conv):
      _check_conv(module, path)
    x = args[0] if args else kwargs["inputs"]
    y = (multiply or matmul)(x if module.dtype is None else x.astype(module.dtype),
                             sparse_by_path[path])
    if module.use_bias:
      y = y + module.get_variable("params", "bias")
    return y

  with nn.intercept_methods(interceptor):
    yield

