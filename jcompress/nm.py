"""N:M-sparse execution of pruned dense (and 1x1 conv) layers (``--execution nm``).

A kernel ``W`` of shape ``(in, out)`` pruned with ``prune --structure N:M`` keeps N
of every M consecutive inputs of each output unit. :func:`from_dense` stores it
as an :class:`NMMatrix`: per output unit the ``K = in * N / M`` kept weights and
the inputs they multiply, ``(out, K)`` each. :func:`matmul` computes ``x @ W`` in
one of two forms:

* ``gather``: ``y[b, o] = sum_k x[b, idx[o, k]] * values[o, k]``, a gather of the
  kept inputs and a batched dot (``einsum``): ``N/M`` of the dense multiply-adds.
* ``expand``: the compact weights scattered back into the dense kernel inside
  the graph, then a dense matmul: the stored weights stay compact, the
  multiply-adds are the dense ones.

``auto`` (the default) gathers for fewer than :data:`GATHER_ROWS` rows and
expands above: XLA:CPU has no sparse tensor cores, and a gather of ``batch *
out * K`` inputs costs more than the dense product from a few rows on
(``benchmarks/nm_sparsity.py`` times the forms against the dense matmul; other
gathered forms it tried, a per-group ``take_along_axis`` and a sum of products,
ran slower). Every form computes the dense layer's products up to float
summation order.

>>> w = jnp.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0], [3.0, 0.0]])  # 1:2
>>> m = from_dense(w, 1, 2)
>>> matmul(jnp.array([[1.0, 2.0, 3.0, 4.0]]), m).tolist(), m.arrays[0].tolist()
([[13.0, 6.0]], [[0, 3], [0, 2]])
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

FORMS = ("auto", "gather", "expand")
GATHER_ROWS = 8  # auto: gather below this many rows, expand from it (measured)


@flax.struct.dataclass
class NMMatrix:
  """An ``(in, out)`` N:M-sparse matrix; a pytree (pass it to ``jit``).

  Attributes:
    n, m: the pattern (N kept of every M inputs).
    shape: ``(in, out)``.
    arrays: ``(idx, values)``, ``(out, in * n / m)``: the kept inputs of each
      output unit (increasing; int16 below 2^15 inputs, else int32) and their
      weights.
  """
  n: int = flax.struct.field(pytree_node=False)
  m: int = flax.struct.field(pytree_node=False)
  shape: tuple[int, int] = flax.struct.field(pytree_node=False)
  arrays: tuple[jax.Array, ...]
  form: str = flax.struct.field(pytree_node=False, default="auto")

  @property
  def nonzero(self) -> int:
    """Stored weights (zero-valued kept weights included)."""
    return int(self.arrays[1].size)

  @property
  def nbytes(self) -> int:
    """Bytes of the stored arrays."""
    return int(sum(a.size * a.dtype.itemsize for a in self.arrays))


def from_dense(w: Any, n: int, m: int, form: str = "auto") -> NMMatrix:
  """``w`` (``(in, out)``, or a ``(1, 1, in, out)`` conv kernel) with at most ``n``
  nonzeros in every ``m`` consecutive inputs of each output, as an
  :class:`NMMatrix` (a group with fewer nonzeros keeps zero-valued entries).

  Host-side: call it outside ``jit``.

  Raises:
    ValueError: a kernel that is not a matrix, ``in`` not a multiple of ``m``, a
      group with more than ``n`` nonzeros, or an unknown ``form``.
  """
  if form not in FORMS:
    raise ValueError(f"nm: unknown form {form!r}; valid: {', '.join(FORMS)}")
  w = np.asarray(w)
  if w.ndim == 4 and w.shape[:2] == (1, 1):
    w = w[0, 0]
  if w.ndim != 2:
    raise ValueError(f"nm: a kernel of shape {w.shape} is not a dense or 1x1 conv kernel")
  n_in, n_out = w.shape
  if not 0 < n < m or n_in % m:
    raise ValueError(f"nm: a {n_in}x{n_out} kernel has no {n}:{m} pattern (inputs must be a "
                     f"multiple of {m})")
  groups = w.T.reshape(n_out, n_in // m, m)
  if (np.count_nonzero(groups, axis=-1) > n).any():
    raise ValueError(f"nm: the {n_in}x{n_out} kernel has more than {n} nonzeros in a group "
                     f"of {m} inputs: it is not {n}:{m}-pruned")
  places = np.sort(np.argsort(groups == 0, axis=-1, kind="stable")[..., :n], axis=-1)
  idx = (np.arange(n_in // m)[:, None] * m + places).reshape(n_out, -1)
  values = np.take_along_axis(groups, places, -1).reshape(n_out, -1)
  index = jnp.int16 if n_in < 1 << 15 else jnp.int32
  return NMMatrix(n, m, (n_in, n_out), (jnp.asarray(idx, index), jnp.asarray(values)), form)


def matmul(x: jax.Array, mat: NMMatrix) -> jax.Array:
  """``x @ W`` for ``x`` of shape ``(..., in)`` (jittable), in ``mat.form``."""
  n_in, n_out = mat.shape
  lead = x.shape[:-1]
  x = x.reshape(-1, n_in)
  idx, values = mat.arrays
  x = x.astype(values.dtype)
  form = mat.form if mat.form != "auto" else (
      "gather" if x.shape[0] < GATHER_ROWS else "expand")
  if form == "gather":
    y = jnp.einsum("bok,ok->bo", x[:, idx], values)
  else:
    dense = jnp.zeros((n_out, n_in), values.dtype).at[
        jnp.arange(n_out)[:, None], idx].set(values, unique_indices=True)
    y = x @ dense.T
  return y.reshape(*lead, n_out)
