"""Tucker factorization of conv and dense kernels (Kim et al., ICLR 2016).

A kernel ``W`` of shape ``(*spatial, C_in, C_out)`` (dense: ``(C_in, C_out)``,
2D conv: ``(kh, kw, C_in, C_out)``, 3D conv: ``(kt, kh, kw, C_in, C_out)``) is
replaced by a Tucker-2 factorization on its two channel modes,

    W[..., i, o] = sum_ab core[..., a, b] * u_in[i, a] * u_out[o, b],

stored as trainable leaves ``<path>_core`` ``(*spatial, R_in, R_out)``,
``<path>_u_in`` ``(C_in, R_in)`` and ``<path>_u_out`` ``(C_out, R_out)`` in place
of ``<path>``. The layer then runs as a 1x1 conv to ``R_in``, the spatial core
conv ``R_in -> R_out`` (the layer's strides and padding), and a 1x1 conv to
``C_out`` plus the bias; a dense layer as ``x @ u_in @ core @ u_out.T + b``.

Ranks (:mod:`jcompress.transforms.ranks`) come from ``--ranks`` (``evbmf`` or
``vbmf`` of each channel mode's unfolding, per layer ``conv2=8:16``, or one
fraction of every channel mode, ``0.25``) or, for layers it does not name, from
``--energy``: the fewest singular values of each mode unfolding that hold that
fraction of its squared spectrum, or from ``--budget-macs`` / ``--budget-params``:
the largest energy threshold shared by those layers that keeps the selected
layers within that fraction of their original MACs / weights. ``--rank-multiple
M`` rounds each of those ranks up to a multiple of ``M`` (capped at its mode;
inside the budget search), since channel counts that fill the SIMD lanes run
faster than the MACs they save. A layer whose
factorized form costs at least as many MACs as the original (``K C_in C_out`` vs
``C_in R_in + K R_in R_out + R_out C_out`` per output position, ``K`` the spatial
kernel size; per example, the first term at input resolution, when the layer
positions are known) is left alone, as are kernels ``(*spatial, 1, C)``
(depthwise, or a single input channel); each skip is logged.

``apply`` rebuilds the full kernels so the unchanged model trains the factors;
:func:`factorized_execution` instead makes the selected layers run the factor
sequence, for real speed.

>>> x = jnp.arange(24.0).reshape(2, 3, 4)
>>> core, factors = hosvd(x, (2, 3, 4))
>>> bool(jnp.allclose(reconstruct(core, factors), x, atol=1e-4))
True
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jcompress.transforms import base
from jcompress.transforms import select as sel
from jcompress.transforms.ranks import (budget_ranks, choose_ranks, energy_rank,  # noqa: F401
                                        layer_cost, layer_name, parse_ranks, position_macs)

_LOG = logging.getLogger(__name__)
_SUFFIXES = ("_core", "_u_in", "_u_out")


# --- Tucker decomposition of any N-way tensor -------------------------------------

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


# --- Method -------------------------------------------------------------------------

def _fraction(name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
    raise ValueError(f"--{name} must be in (0, 1] (0 = no budget), got {value!r}")
  return float(value)


def _check(ranks: Any, energy: Any, hooi_iters: Any, budgets: dict[str, Any],
           paths: list[str]) -> None:
  if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
    raise ValueError(f"--energy must be in (0, 1], got {energy!r}")
  if isinstance(hooi_iters, bool) or not isinstance(hooi_iters, int) or hooi_iters < 0:
    raise ValueError(f"--hooi-iters must be a non-negative integer, got {hooi_iters!r}")
  budgeted = [name for name, value in budgets.items() if _fraction(name, value)]
  if budgeted and ranks is not None and not isinstance(ranks, dict):
    raise ValueError(f"--{budgeted[0]} chooses the ranks itself: it takes only "
                     f"layer=R_in:R_out --ranks (fixed layers), not --ranks {ranks}")
  if isinstance(ranks, dict):
    layers = {layer_name(p) for p in paths}
    unknown = sorted(set(ranks) - layers)
    if unknown:
      raise ValueError(f"--ranks names layers that are not selected: {', '.join(unknown)}; "
                       f"selected: {', '.join(sorted(layers))}")


def _skip_reason(path: str, kernel: Any, r_in: int, r_out: int,
                 positions: Sequence[int] | None) -> str | None:
  shape = np.shape(kernel)
  if len(shape) < 2:
    return "is not a kernel (fewer than 2 dims)"
  if len(shape) > 2 and shape[-2] == 1:
    return f"has one input channel per group {shape} (depthwise or single-channel): left alone"
  where = (1, 1) if positions is None else positions
  before, after = (layer_cost(shape, ranks, where)[0] for ranks in (None, (r_in, r_out)))
  if after >= before:
    unit = "MACs per output position" if positions is None else "MACs per example"
    return (f"at ranks ({r_in}, {r_out}) costs {after} {unit}, not fewer than the "
            f"original {before}: left alone")
  return None


def layer_positions(model: nn.Module, variables: Any, input_shape: Sequence[int],
                    **apply_kwargs: Any) -> dict[str, list[int]]:
  """``{layer: [input positions, output positions]}`` per example of every conv /
  dense layer of ``model`` (what ``--budget-macs`` and the skip rule weigh MACs by).

  >>> layer_positions(nn.Conv(4, (3, 3), strides=2), {"params": {
  ...     "kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros(4)}}, (8, 8, 2))
  {'': [64, 16]}
  """
  seen: dict[str, list[int]] = {}

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(context.module, (nn.Conv, nn.Dense)):
      seen.setdefault(_module_layer(context.module),
                      [math.prod(args[0].shape[1:-1]), math.prod(y.shape[1:-1])])
    return y

  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v, x: model.apply(v, x, **apply_kwargs), variables, x)
  return seen


def _prepare(paths: list[str], options: dict[str, Any], model: nn.Module, variables: Any,
             input_shape: Sequence[int]) -> dict[str, Any]:
  everywhere = layer_positions(model, variables, input_shape, train=False)
  layers = {layer_name(p) for p in paths}
  return options | {"positions": {k: v for k, v in everywhere.items() if k in layers}}


@base.register(
    "tucker",
    base.Option("ranks", str, "", "channel ranks: 'evbmf' or 'vbmf' (variational Bayesian "
                "matrix factorization of each channel mode's unfolding, Kim et al.), "
                "layer=R_in:R_out pairs ('conv2=8:16,fc1=32:32') or one fraction of every "
                "mode ('0.25'); layers not named use --energy or the budget"),
    base.Option("energy", float, 0.9, "keep the fewest singular values holding this fraction "
                "of each channel mode's squared spectrum, in (0, 1]"),
    base.Option("hooi-iters", int, 0, "HOOI refinement iterations after the HOSVD"),
    base.Option("budget-macs", float, 0.0, "MAC budget: the factorized selected layers may "
                "cost at most this fraction of their original MACs per example; one energy "
                "threshold shared by the layers --ranks does not name is searched for "
                "(replaces --energy); 0 = none"),
    base.Option("budget-params", float, 0.0, "weight budget: at most this fraction of the "
                "selected kernels' original weights, as --budget-macs; 0 = none"),
    base.Option("rank-multiple", int, 1, "round every rank not given as a layer pair up to a "
                "multiple of this (capped at its channel mode; before a budget is checked): "
                "8 fills the SIMD lanes of 32-bit floats on AVX2 CPUs"),
    base.Option("positions", dict, None, "{layer: [input, output positions]} per example",
                hidden=True),
    help="Tucker-2 factorization of conv / dense kernels on their channel modes",
    prepare=_prepare)
def tucker_method(paths: list[str], *, ranks: str = "", energy: float = 0.9,
                  hooi_iters: int = 0, budget_macs: float = 0.0, budget_params: float = 0.0,
                  rank_multiple: int = 1, positions: dict[str, Sequence[int]] | None = None
                  ) -> base.Method:
  """Tucker-2 of the kernels at ``paths`` (see the module docstring).

  ``trainable`` replaces each factorized kernel ``<path>`` by ``<path>_core``,
  ``<path>_u_in``, ``<path>_u_out`` (other leaves pass through); ``cstate`` maps
  each factorized layer to ``{"ranks": int32 [R_in, R_out]}``; ``apply`` returns
  the model's params with the rebuilt kernels. ``positions`` (from
  :func:`layer_positions`; ``jcompress compress`` fills them in) make the skip
  rule compare MACs per example, and ``budget_macs`` needs them.

  >>> m = base.build("tucker", ["fc1/kernel"], ranks="fc1=2:2")
  >>> params = {"fc1": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}}
  >>> trainable, cstate = m.init(params)
  >>> sorted(trainable["fc1"]), m.apply(trainable, cstate)["fc1"]["kernel"].shape
  (['bias', 'kernel_core', 'kernel_u_in', 'kernel_u_out'], (8, 8))
  """
  spec = parse_ranks(ranks)
  budgets = {"budget-macs": budget_macs, "budget-params": budget_params}
  _check(spec, energy, hooi_iters, budgets, paths)
  if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
    raise ValueError(f"--rank-multiple must be a positive integer, got {rank_multiple!r}")
  chosen = list(paths)

  def where(path: str) -> Sequence[int] | None:
    return None if positions is None else positions.get(layer_name(path))

  def init(params):
    flat = sel.flatten(params)
    sel.check_new_leaves(flat, chosen, _SUFFIXES, "tucker")
    kernels = {p: flat[p] for p in chosen if np.ndim(flat[p]) >= 2}
    budgeted = {}
    if budget_macs or budget_params:
      fixed = {p: choose_ranks(p, k, spec, energy) for p, k in kernels.items()
               if isinstance(spec, dict) and layer_name(p) in spec}
      budgeted = budget_ranks(kernels, fixed, budget_macs=budget_macs,
                              budget_params=budget_params, positions=positions,
                              multiple=rank_multiple)
    trainable, cstate = {}, {}
    for path, leaf in flat.items():
      if path not in chosen:
        trainable[path] = leaf
        continue
      r_in, r_out = (budgeted[path] if path in budgeted else
                     choose_ranks(path, leaf, spec, energy, rank_multiple) if path in kernels
                     else (0, 0))
      reason = _skip_reason(path, leaf, r_in, r_out, where(path))
      if reason:
        _LOG.warning("tucker: %s %s", path, reason)
        trainable[path] = leaf
        continue
      factors = tucker2(jnp.asarray(leaf), r_in, r_out, hooi_iters=hooi_iters)
      for suffix, factor in zip(_SUFFIXES, factors):
        trainable[path + suffix] = factor.astype(jnp.asarray(leaf).dtype)
      cstate[f"{path}/ranks"] = jnp.asarray([r_in, r_out], jnp.int32)
    return sel.unflatten(trainable), sel.unflatten(cstate)

  def apply(trainable, cstate):
    flat = sel.flatten(trainable)
    out = {}
    for path, leaf in flat.items():
      for suffix in _SUFFIXES:
        owner = path[:-len(suffix)]
        if path.endswith(suffix) and owner in chosen and owner + "_core" in flat:
          if suffix == "_core":
            out[owner] = kernel_from_factors(leaf, flat[owner + "_u_in"], flat[owner + "_u_out"])
          break
      else:
        out[path] = leaf
    return sel.unflatten(out)

  return base.Method("tucker", init, apply)


def factorized_layers(trainable: Any) -> dict[str, tuple[jax.Array, jax.Array, jax.Array]]:
  """``{layer: (core, u_in, u_out)}`` of every factorized kernel in ``trainable``.

  >>> m = base.build("tucker", ["fc1/kernel"], ranks="0.25")
  >>> list(factorized_layers(m.init({"fc1": {"kernel": jnp.ones((8, 8))}})[0]))
  ['fc1']
  """
  flat = sel.flatten(trainable)
  return {layer_name(p[:-len("_core")]): (leaf, flat[p[:-len("_core")] + "_u_in"],
                                          flat[p[:-len("_core")] + "_u_out"])
          for p, leaf in flat.items()
          if p.endswith("_core") and p[:-len("_core")] + "_u_in" in flat}


def reconstruction_errors(params: Any, trainable: Any) -> dict[str, float]:
  """Relative Frobenius error ``|W - W_hat| / |W|`` of each factorized kernel.

  Args:
    params: the original params.
    trainable: the ``tucker`` method's trainable tree (``init(params)[0]``).

  >>> params = {"fc1": {"kernel": jnp.eye(16)}}
  >>> m = base.build("tucker", ["fc1/kernel"], ranks="0.25")
  >>> round(reconstruction_errors(params, m.init(params)[0])["fc1"], 3)  # a quarter of I_16
  0.866
  """
  flat = sel.flatten(params)
  out = {}
  for layer, factors in factorized_layers(trainable).items():
    w = jnp.asarray(flat[f"{layer}/kernel" if layer else "kernel"], jnp.float32)
    out[layer] = float(jnp.linalg.norm(w - kernel_from_factors(*factors))
                       / jnp.maximum(jnp.linalg.norm(w), 1e-30))
  return out


# --- Factorized execution -----------------------------------------------------------

def _module_layer(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


def _run_factored(module: nn.Module, x: jax.Array, core, u_in, u_out) -> jax.Array:
  if isinstance(module, nn.Dense):
    y = ((x @ u_in) @ core) @ u_out.T
  else:
    if module.feature_group_count != 1:
      raise ValueError(f"{_module_layer(module)} is a grouped conv "
                       f"(feature_group_count={module.feature_group_count}); "
                       f"its Tucker factors cannot run factorized")
    # The core conv reuses the layer's own strides, padding and dilation logic.
    spatial = module.clone(parent=None, name=None, features=core.shape[-1], use_bias=False)
    y = spatial.apply({"params": {"kernel": core}}, x @ u_in) @ u_out.T
  if module.use_bias:
    y = y + module.get_variable("params", "bias")
  return y


@contextlib.contextmanager
def factorized_execution(trainable: Any, cstate: Any = None) -> Iterator[None]:
  """Within it, every ``nn.Conv`` / ``nn.Dense`` whose kernel ``trainable`` factorizes
  runs the factor sequence (1x1 conv, core conv, 1x1 conv + bias) instead of its
  full kernel; the other modules run as usual.

  Args:
    trainable: the ``tucker`` method's trainable tree (it may be traced: enter the
      context inside the jitted function).
    cstate: unused (the factors carry their ranks); accepted so callers pass the
      method state as it is.

  >>> model = nn.Dense(8, name="fc")
  >>> params = {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}
  >>> m = base.build("tucker", ["kernel"], ranks="0.125")
  >>> trainable, cstate = m.init(params)
  >>> with factorized_execution(trainable, cstate):
  ...   y = model.apply({"params": m.apply(trainable, cstate)}, jnp.ones((1, 8)))
  >>> [round(v, 4) for v in y[0, :2].tolist()]
  [8.0, 8.0]
  """
  del cstate
  layers = factorized_layers(trainable)
  running = []  # the core conv of a factorized layer runs as an ordinary conv

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (running or context.method_name != "__call__"
        or not isinstance(module, (nn.Conv, nn.Dense)) or _module_layer(module) not in layers):
      return next_fun(*args, **kwargs)
    running.append(module)
    try:
      return _run_factored(module, args[0], *layers[_module_layer(module)])
    finally:
      running.pop()

  with nn.intercept_methods(interceptor):
    yield


def layer_macs(model: nn.Module, params: Any, trainable: Any, x: jax.Array
               ) -> dict[str, tuple[int, int]]:
  """``{layer: (original MACs, executed MACs)}`` of every conv / dense layer of
  ``model`` on input ``x`` (whole batch), the executed count being what
  :func:`factorized_execution` runs (the first 1x1 conv at input resolution).

  Args:
    model: the Flax module.
    params: the model's params (``Method.apply`` output is fine).
    trainable: the ``tucker`` method's trainable tree.
    x: an input batch (only its shape is used).

  >>> model = nn.Dense(8, name="fc")
  >>> params = {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}
  >>> m = base.build("tucker", ["kernel"], ranks="0.125")
  >>> layer_macs(model, params, m.init(params)[0], jnp.ones((2, 8)))
  {'': (128, 34)}
  """
  layers = factorized_layers(trainable)
  seen: dict[str, tuple[int, int]] = {}

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (nn.Conv, nn.Dense)):
      name = _module_layer(module)
      shape = module.get_variable("params", "kernel").shape
      where = math.prod(args[0].shape[:-1]), math.prod(y.shape[:-1])
      ranks = tuple(layers[name][0].shape[-2:]) if name in layers else None
      seen[name] = layer_cost(shape, None, where)[0], layer_cost(shape, ranks, where)[0]
    return y

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda p, v: model.apply({"params": p}, v), params, x)
  return seen
