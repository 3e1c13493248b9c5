"""Rank selection for low-rank and Tucker factorizations.

* :func:`choose_ranks`: the Tucker-2 channel ranks ``(R_in, R_out)`` of one
  kernel from ``--ranks`` (a fraction, a ``layer=R_in:R_out`` pair, or VBMF /
  EVBMF of each channel mode's unfolding) or else ``--energy``. The estimators
  on singular values (:func:`energy_rank`, :func:`evbmf`, :func:`vbmf`) live in
  ``jcompress.transforms.vbmf`` and are re-exported here.
* :func:`budget_ranks`: ranks of all selected kernels from one shared energy
  threshold, the largest that keeps them within ``--budget-macs`` /
  ``--budget-params``; :func:`layer_cost` counts a layer's MACs and weights,
  whole or factorized.
* :func:`largest_feasible`: the largest threshold in ``[0, 1]`` satisfying a
  monotone constraint, by bisection (``--budget-macs`` / ``--budget-params``
  search one energy threshold shared by every layer).

>>> rng = np.random.default_rng(0)
>>> y = rng.normal(size=(30, 3)) @ rng.normal(size=(3, 50)) + 0.1 * rng.normal(size=(30, 50))
>>> choose_ranks("fc/kernel", y, "evbmf", 0.9), choose_ranks("fc/kernel", y, "evbmf", 0.9, 8)
((3, 3), (8, 8))
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from jcompress.transforms.vbmf import (VBEstimate, energy_rank, evbmf,  # noqa: F401
                                       singular_values, vb_free_energy, vbmf)


def largest_feasible(feasible: Callable[[float], bool], *, steps: int = 40) -> float:
  """The largest ``e`` in ``[0, 1]`` with ``feasible(e)`` (to ``2^-steps``), for a
  ``feasible`` that holds below some point and fails above it.

  Returns:
    That ``e``; -1.0 when even ``feasible(0)`` fails.

  >>> round(largest_feasible(lambda e: e <= 0.3), 6)
  0.3
  """
  if feasible(1.0):
    return 1.0
  if not feasible(0.0):
    return -1.0
  lo, hi = 0.0, 1.0
  for _ in range(steps):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
  return lo


# --- Tucker-2 channel ranks of conv / dense kernels ---------------------------------

RANK_METHODS = ("vbmf", "evbmf")
Positions = dict[str, tuple[int, int] | list[int]]


def layer_name(path: str) -> str:
  """The layer a kernel path belongs to, as ``--ranks`` names it: ``conv2/kernel`` -> ``conv2``.

  >>> layer_name("block1/conv/kernel")
  'block1/conv'
  """
  if path == "kernel":
    return ""
  return path[:-len("/kernel")] if path.endswith("/kernel") else path


def position_macs(kernel_shape: Sequence[int], rank_in: int | None = None,
                  rank_out: int | None = None) -> int:
  """MACs per output position: ``K C_in C_out`` (no ranks) or, factorized,
  ``C_in R_in + K R_in R_out + R_out C_out``.

  >>> position_macs((5, 5, 20, 50)), position_macs((5, 5, 20, 50), 10, 20)
  (25000, 6200)
  """
  *spatial, c_in, c_out = kernel_shape
  k = math.prod(spatial)
  if rank_in is None:
    return k * c_in * c_out
  return c_in * rank_in + k * rank_in * rank_out + rank_out * c_out


def layer_cost(kernel_shape: Sequence[int], ranks: tuple[int, int] | None = None,
               positions: Sequence[int] = (1, 1)) -> tuple[int, int]:
  """``(MACs, weights)`` of a layer, whole or Tucker-2 factorized at ``ranks``.

  Args:
    kernel_shape: ``(*spatial, C_in, C_out)``.
    ranks: ``(R_in, R_out)``, or None for the full kernel.
    positions: ``(input positions, output positions)``: the first 1x1 conv of
      the factor sequence runs at input resolution, the rest at the output's.

  >>> layer_cost((3, 3, 8, 12), None, (81, 25)), layer_cost((3, 3, 8, 12), (4, 6), (81, 25))
  ((21600, 864), (9792, 320))
  """
  *spatial, c_in, c_out = kernel_shape
  in_pos, out_pos = positions
  if ranks is None:
    return out_pos * position_macs(kernel_shape), math.prod(kernel_shape)
  r_in, r_out = ranks
  k = math.prod(spatial)
  return (in_pos * c_in * r_in + out_pos * (k * r_in * r_out + r_out * c_out),
          c_in * r_in + k * r_in * r_out + r_out * c_out)


def parse_ranks(text: str) -> float | dict[str, tuple[int, int]] | str | None:
  """``--ranks``: ``""`` (none), ``vbmf`` or ``evbmf``, one fraction in (0, 1] of
  every channel mode, or ``layer=R_in:R_out`` pairs separated by commas.

  >>> parse_ranks("conv2=8:16,fc1=32:32"), parse_ranks("0.25"), parse_ranks("EVBMF")
  ({'conv2': (8, 16), 'fc1': (32, 32)}, 0.25, 'evbmf')
  """
  text = str(text).strip()
  if not text:
    return None
  if text.lower() in RANK_METHODS:
    return text.lower()
  if "=" not in text:
    try:
      fraction = float(text)
    except ValueError:
      raise ValueError(f"--ranks must be vbmf, evbmf, a fraction or layer=R_in:R_out pairs, "
                       f"got {text!r}")
    if not 0.0 < fraction <= 1.0:
      raise ValueError(f"--ranks fraction must be in (0, 1], got {text!r}")
    return fraction
  out: dict[str, tuple[int, int]] = {}
  for item in text.split(","):
    layer, _, pair = item.strip().partition("=")
    r_in, _, r_out = pair.partition(":")
    try:
      ranks = int(r_in), int(r_out)
    except ValueError:
      raise ValueError(f"--ranks entry {item.strip()!r} is not layer=R_in:R_out")
    if min(ranks) < 1:
      raise ValueError(f"--ranks entry {item.strip()!r} has a rank below 1")
    out[layer_name(layer.strip())] = ranks
  return out


def channel_spectra(kernel: Any) -> tuple[np.ndarray, np.ndarray]:
  """Singular values of the ``C_in`` and ``C_out`` mode unfoldings of a kernel."""
  w = np.asarray(kernel)
  return tuple(singular_values(np.moveaxis(w, mode, 0).reshape(w.shape[mode], -1))
               for mode in (w.ndim - 2, w.ndim - 1))


def round_up(ranks: tuple[int, int], kernel_shape: Sequence[int], multiple: int
             ) -> tuple[int, int]:
  """``ranks`` each rounded up to a multiple of ``multiple``, capped at its channel
  mode (``--rank-multiple``: SIMD-aligned channel counts run faster on CPU).

  >>> round_up((7, 16), (5, 5, 20, 50), 8), round_up((5, 17), (5, 5, 6, 50), 8)
  ((8, 16), (6, 24))
  """
  return tuple(min(-(-r // multiple) * multiple, c)
               for r, c in zip(ranks, kernel_shape[-2:]))


def choose_ranks(path: str, kernel: Any, ranks: float | dict | str | None, energy: float,
                 multiple: int = 1) -> tuple[int, int]:
  """``(R_in, R_out)`` of one kernel from ``--ranks`` (a fraction, VBMF / EVBMF of
  each channel mode's unfolding, or this layer's pair) or else ``--energy``;
  all but an explicit pair rounded up to a multiple of ``multiple``.

  Raises:
    ValueError: a ``--ranks`` entry exceeds the channel mode it truncates.

  >>> choose_ranks("fc/kernel", np.eye(4, 6), 0.5, 0.9)
  (2, 3)
  """
  *_, c_in, c_out = np.shape(kernel)
  if isinstance(ranks, dict) and layer_name(path) in ranks:
    r_in, r_out = ranks[layer_name(path)]
    if r_in > c_in or r_out > c_out:
      raise ValueError(f"--ranks {layer_name(path)}={r_in}:{r_out} exceeds the channel modes "
                       f"({c_in}, {c_out}) of {path}")
    return r_in, r_out
  if isinstance(ranks, float):
    chosen = max(1, round(ranks * c_in)), max(1, round(ranks * c_out))
  elif isinstance(ranks, str):
    solve = evbmf if ranks == "evbmf" else vbmf
    w = np.asarray(kernel)
    chosen = tuple(max(1, solve(np.moveaxis(w, mode, 0).reshape(w.shape[mode], -1)).rank)
                   for mode in (w.ndim - 2, w.ndim - 1))
  else:
    s_in, s_out = channel_spectra(kernel)
    chosen = energy_rank(s_in, energy), energy_rank(s_out, energy)
  return round_up(chosen, np.shape(kernel), multiple)


def factorizable(kernel_shape: Sequence[int]) -> bool:
  """A kernel Tucker-2 can replace: 2-D, or a conv with more than one input channel."""
  return len(kernel_shape) == 2 or (len(kernel_shape) > 2 and kernel_shape[-2] > 1)


def cheaper(kernel_shape: Sequence[int], ranks: tuple[int, int],
            positions: Sequence[int] | None = None) -> bool:
  """Whether the factorized layer costs fewer MACs than the whole one (per output
  position when ``positions`` are unknown)."""
  where = (1, 1) if positions is None else positions
  return layer_cost(kernel_shape, ranks, where)[0] < layer_cost(kernel_shape, None, where)[0]


def budget_ranks(kernels: dict[str, Any], fixed: dict[str, tuple[int, int]], *,
                 budget_macs: float = 0.0, budget_params: float = 0.0,
                 positions: Positions | None = None, multiple: int = 1
                 ) -> dict[str, tuple[int, int]]:
  """Ranks of the kernels not in ``fixed`` from one energy threshold shared by all,
  the largest that keeps the selected layers within the budgets.

  A budget is a fraction of the selected kernels' original MACs (per example, at
  ``positions``) or weights; a layer whose factorization is not cheaper in MACs,
  and a kernel Tucker-2 cannot replace, counts at its original cost.

  Args:
    kernels: ``{path: kernel}`` of every selected kernel.
    fixed: ranks already given (``--ranks layer=R_in:R_out``), by path.
    budget_macs: the MAC budget in (0, 1], or 0 for none.
    budget_params: the weight budget in (0, 1], or 0 for none.
    positions: ``{layer: (input positions, output positions)}`` per example;
      required with ``budget_macs`` (without them MACs are per output position).
    multiple: each rank is rounded up to a multiple of it (capped at its mode)
      before the budget is checked.

  Returns:
    ``{path: (R_in, R_out)}`` of the factorizable kernels not in ``fixed``.

  Raises:
    ValueError: a layer has no positions, or even rank 1 everywhere exceeds a
      budget (the message names the option).
  """
  shapes = {p: tuple(np.shape(k)) for p, k in kernels.items()}
  positions = positions or {}
  missing = [p for p in kernels if layer_name(p) not in positions]
  if budget_macs and missing:
    raise ValueError(f"--budget-macs needs the input and output positions of {missing[0]}: "
                     f"jcompress compress fills them in from the model")
  where = {p: tuple(positions.get(layer_name(p), (1, 1))) for p in kernels}
  spectra = {p: channel_spectra(k) for p, k in kernels.items()
             if factorizable(shapes[p]) and p not in fixed}

  def ranks_at(energy: float) -> dict[str, tuple[int, int]]:
    return {p: round_up((energy_rank(s_in, energy), energy_rank(s_out, energy)), shapes[p],
                        multiple)
            for p, (s_in, s_out) in spectra.items()}

  def totals(chosen: dict[str, tuple[int, int]]) -> tuple[int, int]:
    macs = params = 0
    for path, shape in shapes.items():
      ranks = chosen.get(path, fixed.get(path))
      use = ranks if ranks is not None and factorizable(shape) and cheaper(
          shape, ranks, where[path]) else None
      m, p = layer_cost(shape, use, where[path])
      macs, params = macs + m, params + p
    return macs, params

  original = tuple(map(sum, zip(*(layer_cost(shape, None, where[p]) for p, shape in shapes.items()))))
  limits = (budget_macs * original[0], budget_params * original[1])

  def feasible(energy: float) -> bool:
    macs, params = totals(ranks_at(energy))
    return (not budget_macs or macs <= limits[0]) and (not budget_params or params <= limits[1])

  energy = largest_feasible(feasible)
  if energy < 0:
    macs, params = totals(ranks_at(0.0))
    lowest = "rank 1" if multiple == 1 else f"the lowest ranks --rank-multiple {multiple} allows"
    raise ValueError(
        "; ".join(f"--budget-{name} {budget:g} is unreachable: at {lowest} the selected layers "
                  f"still cost {value:,} {name} ({value / total:.3f} of {total:,})"
                  for name, budget, value, total in (("macs", budget_macs, macs, original[0]),
                                                     ("params", budget_params, params,
                                                      original[1]))
                  if budget and value > budget * total))
  return ranks_at(energy)
