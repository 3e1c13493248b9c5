"""Tucker decomposition of N-way tensors (HOSVD, HOOI) and the Tucker-2 form of a
conv / dense kernel on its two channel modes (Kim et al., ICLR 2016).

>>> x = jnp.arange(24.0).reshape(2, 3, 4)
>>> core, factors = hosvd(x, (2, 3, 4))
>>> bool(jnp.allclose(reconstruct(core, factors), x, atol=1e-4))
True
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def unfold(x: jax.Array, mode: int) -> jax.Array:
  """The mode-``mode`` unfolding: ``(x.shape[mode], prod of the other dims)``.

  >>> unfold(jnp.zeros((2, 3, 4)), 1).shape
  (3, 8)
  """
  return jnp.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)


def mode_dot(x: jax.Array, matrix: jax.Array, mode: int) -> jax.Array:
  """``x`` times ``matrix`` ``(new, x.shape[mode])`` along ``mode``.

  >>> mode_dot(jnp.ones((2, 3)), jnp.ones((5, 3)), 1).shape
  (2, 5)
  """
  return jnp.moveaxis(jnp.tensordot(matrix, x, axes=(1, mode)), 0, mode)


def mode_spectrum(x: jax.Array, mode: int) -> jax.Array:
  """The singular values of the mode-``mode`` unfolding, largest first.

  >>> mode_spectrum(jnp.diag(jnp.array([3.0, 4.0])), 0).tolist()
  [4.0, 3.0]
  """
  return jnp.linalg.svd(unfold(x, mode), compute_uv=False)


def _leading(x: jax.Array, mode: int, rank: int) -> jax.Array:
  u = jnp.linalg.svd(unfold(x, mode), full_matrices=False)[0]
  return u[:, :rank]


def _project(x: jax.Array, factors: Sequence[jax.Array | None], skip: int = -1) -> jax.Array:
  for mode, u in enumerate(factors):
    if u is not None and mode != skip:
      x = mode_dot(x, u.T, mode)
  return x


def hosvd(x: jax.Array, ranks: Sequence[int | None], *, hooi_iters: int = 0
          ) -> tuple[jax.Array, list[jax.Array | None]]:
  """Truncated HOSVD of ``x``, optionally refined by HOOI (alternating least squares).

  Args:
    x: an N-way tensor.
    ranks: one entry per mode: the rank kept, or None to leave the mode whole
      (no factor; e.g. a conv kernel's spatial modes for Tucker-2).
    hooi_iters: higher-order orthogonal iterations after the HOSVD (each never
      increases the reconstruction error).

  Returns:
    ``(core, factors)``: ``factors[k]`` is ``(x.shape[k], ranks[k])`` with
    orthonormal columns (None where ``ranks[k]`` is None) and
    ``core = x x_k factors[k].T``.

  Raises:
    ValueError: ``ranks`` does not match ``x.ndim`` or a rank is outside
      ``[1, x.shape[k]]``.

  >>> core, factors = hosvd(jnp.ones((4, 5, 6)), (1, None, 2))
  >>> core.shape, factors[1]
  ((1, 5, 2), None)
  """
  x = jnp.asarray(x, jnp.float32)
  if len(ranks) != x.ndim:
    raise ValueError(f"ranks {tuple(ranks)} needs one entry per mode of a {x.ndim}-way tensor")
  for mode, rank in enumerate(ranks):
    if rank is not None and not 1 <= rank <= x.shape[mode]:
      raise ValueError(f"rank {rank} of mode {mode} is outside [1, {x.shape[mode]}]")
  factors = [None if r is None else _leading(x, k, r) for k, r in enumerate(ranks)]
  for _ in range(hooi_iters):
    for k, r in enumerate(ranks):
      if r is not None:
        factors[k] = _leading(_project(x, factors, skip=k), k, r)
  return _project(x, factors), factors


def reconstruct(core: jax.Array, factors: Sequence[jax.Array | None]) -> jax.Array:
  """The full tensor ``core x_k factors[k]`` (None factors leave a mode as it is).

  >>> reconstruct(jnp.ones((1, 2)), [jnp.ones((3, 1)), None]).shape
  (3, 2)
  """
  for mode, u in enumerate(factors):
    if u is not None:
      core = mode_dot(core, u, mode)
  return core


# --- Kernels ------------------------------------------------------------------------

def tucker2(kernel: jax.Array, rank_in: int, rank_out: int, *, hooi_iters: int = 0
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Tucker-2 of a ``(*spatial, C_in, C_out)`` kernel on its channel modes.

  Returns:
    ``(core, u_in, u_out)`` of shapes ``(*spatial, R_in, R_out)``, ``(C_in, R_in)``,
    ``(C_out, R_out)``.

  >>> core, u_in, u_out = tucker2(jnp.ones((3, 3, 8, 16)), 2, 4)
  >>> core.shape, u_in.shape, u_out.shape
  ((3, 3, 2, 4), (8, 2), (16, 4))
  """
  ranks = (None,) * (kernel.ndim - 2) + (rank_in, rank_out)
  core, factors = hosvd(kernel, ranks, hooi_iters=hooi_iters)
  return core, factors[-2], factors[-1]


def kernel_from_factors(core: jax.Array, u_in: jax.Array, u_out: jax.Array) -> jax.Array:
  """The full kernel ``(*spatial, C_in, C_out)`` of a Tucker-2 factorization.

  >>> kernel_from_factors(jnp.ones((1, 1)), jnp.ones((3, 1)), jnp.ones((2, 1))).tolist()
  [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
  """
  return jnp.einsum("...ab,ia,ob->...io", core, u_in, u_out)
