"""Ranks read off a matrix's singular values.

* :func:`energy_rank`: the fewest singular values holding a fraction of the
  squared spectrum.
* :func:`evbmf` and :func:`vbmf`: the global analytic solutions of (empirical)
  variational Bayesian matrix factorization (Nakajima, Sugiyama, Babacan and
  Tomioka, JMLR 2013), as Kim et al. (ICLR 2016) apply them to the mode
  unfoldings of a conv kernel. For ``Y`` of shape ``(L, M)``, ``L <= M`` (a
  matrix is transposed to get there), with singular values ``gamma_h`` and
  noise variance ``sigma^2``:

  - EVB (the prior variances are estimated too) keeps the components with
    ``gamma_h > sqrt(M sigma^2 (1 + tau) (1 + alpha / tau))``, ``alpha = L / M``,
    ``tau = 2.5129 sqrt(alpha)``; ``sigma^2`` minimises the EVB free energy
    ``sum_h psi(gamma_h^2 / (M sigma^2))``, searched inside the paper's bounds.
  - VB with a fixed prior product ``c = c_a c_b`` keeps the components above
    ``sqrt(sigma^2 (t + sqrt(t^2 - L M)))``, ``t = (L + M) / 2 + sigma^2 / (2 c^2)``;
    ``sigma^2`` minimises the VB free energy. By default ``c`` matches the data's
    second moment, ``c^2 = |Y|^2 / (L^2 M)`` (every one of the ``L`` components
    with equal prior variance); VB then usually keeps more components than EVB.

``jcompress.transforms.ranks`` turns these into the channel ranks of Tucker-2
factorizations.

>>> rng = np.random.default_rng(0)
>>> y = rng.normal(size=(30, 3)) @ rng.normal(size=(3, 50)) + 0.1 * rng.normal(size=(30, 50))
>>> evbmf(y).rank
3
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import numpy as np

# The EVB threshold constant: tau solving the free-energy balance of Nakajima et
# al. (2013), 2.5129 sqrt(alpha) to the paper's precision.
_TAU_FACTOR = 2.5129
_GRID = 64
_GOLDEN_STEPS = 60


class VBEstimate(NamedTuple):
  """A (E)VBMF solution's rank and the quantities behind it.

  Attributes:
    rank: the components kept (singular values above ``threshold``).
    noise_variance: the estimated ``sigma^2``.
    threshold: the singular value a component must exceed.
  """
  rank: int
  noise_variance: float
  threshold: float


def energy_rank(singular_values: Any, energy: float) -> int:
  """The fewest leading singular values holding ``energy`` of the squared spectrum.

  >>> energy_rank([3.0, 2.0, 1.0, 0.0], 0.9)  # 9/14, 13/14, 1
  2
  """
  s2 = np.square(np.asarray(singular_values, np.float64))
  share = np.cumsum(s2) / max(s2.sum(), np.finfo(np.float64).tiny)
  return int(min(np.searchsorted(share, energy - 1e-9) + 1, len(s2)))


def singular_values(matrix: Any) -> np.ndarray:
  """The singular values of a 2-D array, largest first, from the eigenvalues of its
  smaller Gram matrix in float64 (several times faster than an SVD).

  >>> singular_values(np.diag([3.0, 4.0])).tolist()
  [4.0, 3.0]
  """
  y = np.asarray(matrix, np.float64)
  gram = y @ y.T if y.shape[0] <= y.shape[1] else y.T @ y
  return np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None))


def _spectrum(matrix: Any) -> tuple[int, int, np.ndarray]:
  shape = np.shape(matrix)
  if len(shape) != 2 or 0 in shape:
    raise ValueError(f"VBMF needs a non-empty matrix, got shape {shape}")
  return min(shape), max(shape), singular_values(matrix)


def _minimize(f: Callable[[float], float], lo: float, hi: float) -> float:
  """A minimiser of ``f`` over ``[lo, hi]`` (log-spaced grid, then golden section)."""
  grid = np.geomspace(lo, hi, _GRID)
  best = int(np.argmin([f(v) for v in grid]))
  a, b = math.log(grid[max(best - 1, 0)]), math.log(grid[min(best + 1, _GRID - 1)])
  ratio = (math.sqrt(5) - 1) / 2
  c, d = b - ratio * (b - a), a + ratio * (b - a)
  fc, fd = f(math.exp(c)), f(math.exp(d))
  for _ in range(_GOLDEN_STEPS):
    if fc <= fd:
      b, d, fd = d, c, fc
      c = b - ratio * (b - a)
      fc = f(math.exp(c))
    else:
      a, c, fc = c, d, fd
      d = a + ratio * (b - a)
      fd = f(math.exp(d))
  found = math.exp((a + b) / 2)
  return found if f(found) <= f(grid[best]) else float(grid[best])


def _evb_tau(x: np.ndarray, alpha: float) -> np.ndarray:
  b = x - (1 + alpha)
  return 0.5 * (b + np.sqrt(np.maximum(b * b - 4 * alpha, 0.0)))


def evbmf(matrix: Any) -> VBEstimate:
  """Empirical VBMF of ``matrix``: its rank and noise variance, both estimated.

  Args:
    matrix: a 2-D array (any orientation).

  Returns:
    The rank (0 for a zero matrix), ``sigma^2`` and the singular-value threshold.

  >>> evbmf(np.diag([10.0, 10.0, 0.1, 0.1, 0.1])).rank
  2
  """
  l, m, s = _spectrum(matrix)
  if s[0] == 0:
    return VBEstimate(0, 0.0, 0.0)
  alpha = l / m
  tau = _TAU_FACTOR * math.sqrt(alpha)
  x_bar = (1 + tau) * (1 + alpha / tau)
  s2 = s * s

  def free_energy(sigma2: float) -> float:
    x = np.maximum(s2 / (m * sigma2), np.finfo(np.float64).tiny)
    energy = np.sum(x - np.log(x))
    big = x[x > x_bar]
    if big.size:
      t = _evb_tau(big, alpha)
      energy += np.sum(np.log(t + 1) + alpha * np.log(t / alpha + 1) - t)
    return float(energy)

  # Nakajima et al.'s bounds: at most about L / (1 + alpha) components are kept.
  k = min(math.ceil(l / (1 + alpha)) - 1, l - 1)
  upper = float(s2.sum() / (l * m))
  lower = max(float(s2[k] / (m * x_bar)), float(s2[k:].mean() / m), upper * 1e-12)
  sigma2 = _minimize(free_energy, min(lower, upper), upper)
  threshold = math.sqrt(m * sigma2 * x_bar)
  return VBEstimate(int(np.sum(s > threshold)), sigma2, threshold)


def _vb_threshold(l: int, m: int, sigma2: float, prior: float) -> float:
  t = (l + m) / 2 + sigma2 / (2 * prior * prior)
  return math.sqrt(sigma2 * (t + math.sqrt(max(t * t - l * m, 0.0))))


def vb_free_energy(singular_values: Any, l: int, m: int, sigma2: float, prior: float) -> float:
  """Twice the VB free energy (less ``L M log 2 pi``) of the global VB solution of
  an ``(l, m)`` matrix, ``l <= m``, with these singular values, noise variance
  ``sigma2`` and prior product ``c_a c_b = prior`` (``c_a = c_b``).

  Each component's posterior (means ``a``, ``b``; variances ``sa2``, ``sb2``) is
  the analytic VB solution; the free energy is
  ``L M log sigma2 + |Y|^2 / sigma2 + sum_h [M log(c / sa2) + L log(c / sb2) - (L + M)
  + (a^2 + M sa2) / c + (b^2 + L sb2) / c + ((a^2 + M sa2)(b^2 + L sb2) - 2 a b gamma) / sigma2]``.
  """
  s = np.asarray(singular_values, np.float64)
  c = prior
  threshold = _vb_threshold(l, m, sigma2, c)
  q = l + m + sigma2 / (c * c)
  zeta = sigma2 / (2 * l * m) * (q - math.sqrt(max(q * q - 4 * l * m, 0.0)))
  a = np.zeros_like(s)
  b = np.zeros_like(s)
  sa2 = np.full_like(s, c * (1 - l * zeta / sigma2))
  sb2 = np.full_like(s, c * (1 - m * zeta / sigma2))
  on = s > threshold
  g = s[on]
  shrunk = g * (1 - sigma2 / (2 * g * g) * (l + m + np.sqrt((m - l) ** 2 + 4 * g * g / (c * c))))
  delta = c / sigma2 * (g - shrunk - l * sigma2 / g)
  a[on], b[on] = np.sqrt(shrunk * delta), np.sqrt(shrunk / delta)
  sa2[on], sb2[on] = sigma2 * delta / g, sigma2 / (delta * g)
  ea, eb = a * a + m * sa2, b * b + l * sb2
  per_component = (m * np.log(c / sa2) + l * np.log(c / sb2) - (l + m) + ea / c + eb / c
                   + (ea * eb - 2 * a * b * s) / sigma2)
  return float(l * m * math.log(sigma2) + np.sum(s * s) / sigma2 + np.sum(per_component))


def vbmf(matrix: Any, prior: float | None = None) -> VBEstimate:
  """VBMF of ``matrix`` with a fixed prior product; the noise variance is estimated.

  Args:
    matrix: a 2-D array (any orientation).
    prior: ``c_a c_b``; default ``|Y| / (L sqrt(M))`` (see the module docstring).

  Returns:
    The rank, ``sigma^2`` and the singular-value threshold.

  Raises:
    ValueError: ``prior`` is not positive.

  >>> rng = np.random.default_rng(0)
  >>> y = rng.normal(size=(30, 3)) @ rng.normal(size=(3, 50)) + 0.1 * rng.normal(size=(30, 50))
  >>> vbmf(y).rank
  3
  """
  l, m, s = _spectrum(matrix)
  if s[0] == 0:
    return VBEstimate(0, 0.0, 0.0)
  total = float(np.sum(s * s))
  prior = math.sqrt(total / (l * l * m)) if prior is None else prior
  if not prior > 0:
    raise ValueError(f"vbmf: prior must be positive, got {prior}")
  upper = total / (l * m)
  sigma2 = _minimize(lambda v: vb_free_energy(s, l, m, v, prior), upper * 1e-8, upper)
  threshold = _vb_threshold(l, m, sigma2, prior)
  return VBEstimate(int(np.sum(s > threshold)), sigma2, threshold)
