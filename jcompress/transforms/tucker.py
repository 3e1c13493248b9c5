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
faster than the MACs they save. ``jcompress compress``'s defaults make the
network faster, not only smaller (:func:`compress_defaults`): half the selected
layers' MACs with ranks rounded to multiples of 8; ``--energy 0.9`` with exact
ranks, the method's own defaults, left LeNet-5 with 1.12x fewer FLOPs but
0.42-0.57x the speed on CPU. A layer whose
factorized form costs at least as many MACs as the original (``K C_in C_out`` vs
``C_in R_in + K R_in R_out + R_out C_out`` per output position, ``K`` the spatial
kernel size; per example, the first term at input resolution, when the layer
positions are known) is left alone, as are kernels ``(*spatial, 1, C)``
(depthwise, or a single input channel). ``jcompress compress`` chooses the ranks
from the trained weights once (:func:`_prepare`), logs each skip, and saves the
ranks per layer in the plan (the hidden option ``layer-ranks``, ``null`` for a
layer left alone), which ``init`` then follows; ``compress`` and ``summary
--workdir`` print them.

``apply`` rebuilds the full kernels so the unchanged model trains the factors;
:func:`factorized_execution` instead makes the selected layers run the factor
sequence, for real speed.

>>> x = jnp.arange(24.0).reshape(2, 3, 4)
>>> core, factors = hosvd(x, (2, 3, 4))
>>> bool(jnp.allclose(reconstruct(core, factors), x, atol=1e-4))
True
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jcompress.transforms import base, registry
from jcompress.transforms import packing
from jcompress.transforms import select as sel
from jcompress.transforms.decompose import (hosvd, kernel_from_factors, mode_dot,  # noqa: F401
                                            mode_spectrum, reconstruct, tucker2, unfold)
from jcompress.transforms.factorized import (_module_layer, factorized_costs,  # noqa: F401
                                             factorized_execution, factorized_layers,
                                             layer_macs)
from jcompress.transforms.ranks import (budget_ranks, choose_ranks, energy_rank,  # noqa: F401
                                        layer_cost, layer_name, parse_ranks, position_macs)

_LOG = logging.getLogger(__name__)
_SUFFIXES = ("_core", "_u_in", "_u_out")


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


def _check_layer_ranks(layer_ranks: Any, paths: list[str]) -> None:
  if layer_ranks is None:
    return
  layers = {layer_name(p) for p in paths}
  if not isinstance(layer_ranks, dict) or set(layer_ranks) != layers or not all(
      r is None or (isinstance(r, (list, tuple)) and len(r) == 2 and all(
          isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in r))
      for r in layer_ranks.values()):
    raise ValueError(f"tucker: layer_ranks must give each selected layer "
                     f"({', '.join(sorted(layers))}) [R_in, R_out] or null, got {layer_ranks!r}")


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


# The method's own defaults, for options a plan leaves out (None): a plan built in
# Python, or saved before the option existed.
DEFAULT_ENERGY, DEFAULT_RANK_MULTIPLE = 0.9, 1
# What ``compress`` fills in instead (:func:`compress_defaults`).
COMPRESS_BUDGET_MACS, COMPRESS_RANK_MULTIPLE = 0.5, 8


def compress_defaults(paths: Sequence[str], options: dict[str, Any]) -> dict[str, Any]:
  """The rank selection options ``compress`` fills in where ``options`` leaves them
  out (None), so that the factorized network runs faster, not only smaller.

  ``--rank-multiple`` is ``COMPRESS_RANK_MULTIPLE`` (8: SIMD-aligned channels), and
  ``--budget-macs`` ``COMPRESS_BUDGET_MACS`` (half the selected layers' MACs) unless
  ``--energy``, ``--budget-params`` or ``--ranks`` (vbmf, evbmf, a fraction, or a
  pair for every selected layer) chooses the ranks; ``--energy`` is then
  ``DEFAULT_ENERGY``. Together they made LeNet-5 1.8x faster on one and on two
  CPUs, where ``--energy 0.9`` with exact ranks made it 0.47-0.57x as fast
  (experiments/README.md, Seed 001).

  >>> given = {"ranks": "", "energy": None, "budget_macs": None, "budget_params": 0.0,
  ...          "rank_multiple": None}
  >>> compress_defaults(["fc1/kernel"], given)
  {'energy': 0.9, 'budget_macs': 0.5, 'rank_multiple': 8}
  >>> compress_defaults(["fc1/kernel"], given | {"energy": 0.8})
  {'energy': 0.8, 'budget_macs': 0.0, 'rank_multiple': 8}
  """
  spec, energy, budget_macs = parse_ranks(options["ranks"]), options["energy"], \
      options["budget_macs"]
  if budget_macs is None:
    chosen = (energy is not None or options["budget_params"]
              or (spec is not None and not isinstance(spec, dict))
              or (isinstance(spec, dict) and {layer_name(p) for p in paths} <= set(spec)))
    budget_macs = 0.0 if chosen else COMPRESS_BUDGET_MACS
  multiple = options["rank_multiple"]
  return {"energy": DEFAULT_ENERGY if energy is None else energy, "budget_macs": budget_macs,
          "rank_multiple": COMPRESS_RANK_MULTIPLE if multiple is None else multiple}


def _prepare(paths: list[str], options: dict[str, Any], model: nn.Module, variables: Any,
             input_shape: Sequence[int], context: base.Context) -> dict[str, Any]:
  """The layer positions, the rank selection's defaults and the ranks chosen from
  the trained weights (each skip logged once, here): what ``compress`` saves in the
  plan."""
  everywhere = layer_positions(model, variables, input_shape, train=False)
  layers = {layer_name(p) for p in paths}
  options = options | {"positions": {k: v for k, v in everywhere.items() if k in layers}}
  options = options | compress_defaults(paths, options)
  flat = sel.flatten(variables["params"])
  if not all(p in flat for p in paths):  # factors of an earlier tucker step: init chooses
    return options
  ranks, reasons = choose_layer_ranks(
      paths, flat, parse_ranks(options["ranks"]),
      options["energy"], budget_macs=options["budget_macs"],
      budget_params=options["budget_params"], multiple=options["rank_multiple"],
      positions=options["positions"])
  for path, reason in reasons.items():
    _LOG.warning("tucker: %s %s", path, reason)
  return options | {"layer_ranks": {layer_name(p): None if p in reasons else list(ranks[p])
                                    for p in paths}}


def choose_layer_ranks(paths: Sequence[str], flat: dict[str, Any], spec: Any, energy: float, *,
                       budget_macs: float = 0.0, budget_params: float = 0.0,
                       multiple: int = 1, positions: dict[str, Sequence[int]] | None = None
                       ) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
  """``({path: (R_in, R_out)}, {path: why it is left alone})`` of the kernels at
  ``paths`` of the flat params ``flat``, by ``--ranks`` (parsed: ``spec``),
  ``--energy``, the budgets and ``--rank-multiple`` (the module docstring)."""
  kernels = {p: flat[p] for p in paths if np.ndim(flat[p]) >= 2}
  budgeted = {}
  if budget_macs or budget_params:
    fixed = {p: choose_ranks(p, k, spec, energy) for p, k in kernels.items()
             if isinstance(spec, dict) and layer_name(p) in spec}
    budgeted = budget_ranks(kernels, fixed, budget_macs=budget_macs,
                            budget_params=budget_params, positions=positions, multiple=multiple)
  ranks, reasons = {}, {}
  for path in paths:
    r_in, r_out = (budgeted[path] if path in budgeted else
                   choose_ranks(path, flat[path], spec, energy, multiple) if path in kernels
                   else (0, 0))
    where = None if positions is None else positions.get(layer_name(path))
    reason = _skip_reason(path, flat[path], r_in, r_out, where)
    if reason:
      reasons[path] = reason
    else:
      ranks[path] = (int(r_in), int(r_out))
  return ranks, reasons


def describe(options: dict[str, Any]) -> str | None:
  """The ranks a plan step chose per layer, ``fc1 150:150, conv1 left alone``."""
  chosen = options.get("layer_ranks")
  if not chosen:
    return None
  return "ranks " + ", ".join(f"{layer or '(top)'} " + (f"{r[0]}:{r[1]}" if r else "left alone")
                              for layer, r in chosen.items())


def tucker_method(paths: list[str], *, ranks: str = "", energy: float | None = None,
                  hooi_iters: int = 0, budget_macs: float | None = None,
                  budget_params: float = 0.0, rank_multiple: int | None = None,
                  positions: dict[str, Sequence[int]] | None = None,
                  layer_ranks: dict[str, Sequence[int] | None] | None = None) -> base.Method:
  """Tucker-2 of the kernels at ``paths`` (see the module docstring).

  ``trainable`` replaces each factorized kernel ``<path>`` by ``<path>_core``,
  ``<path>_u_in``, ``<path>_u_out`` (other leaves pass through); ``cstate`` maps
  each factorized layer to ``{"ranks": int32 [R_in, R_out]}``; ``apply`` returns
  the model's params with the rebuilt kernels. ``positions`` (from
  :func:`layer_positions`; ``jcompress compress`` fills them in) make the skip
  rule compare MACs per example, and ``budget_macs`` needs them. Left None,
  ``energy`` is 0.9, ``budget_macs`` 0 (none) and ``rank_multiple`` 1 (exact
  ranks); ``compress`` fills in faster ones (:func:`compress_defaults`). ``layer_ranks``
  (``{layer: [R_in, R_out] or None}``, from :func:`_prepare`) fixes the ranks of
  every selected layer, None leaving it alone: ``init`` then chooses nothing.

  >>> m = registry.build("tucker", ["fc1/kernel"], ranks="fc1=2:2")
  >>> params = {"fc1": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}}
  >>> trainable, cstate = m.init(params)
  >>> sorted(trainable["fc1"]), m.apply(trainable, cstate)["fc1"]["kernel"].shape
  (['bias', 'kernel_core', 'kernel_u_in', 'kernel_u_out'], (8, 8))
  """
  spec = parse_ranks(ranks)
  energy = DEFAULT_ENERGY if energy is None else energy
  budget_macs = 0.0 if budget_macs is None else budget_macs
  rank_multiple = DEFAULT_RANK_MULTIPLE if rank_multiple is None else rank_multiple
  budgets = {"budget-macs": budget_macs, "budget-params": budget_params}
  _check(spec, energy, hooi_iters, budgets, paths)
  _check_layer_ranks(layer_ranks, paths)
  chosen = list(paths)

  def init(params):
    flat = sel.flatten(params)
    sel.check_new_leaves(flat, chosen, _SUFFIXES, "tucker")
    if layer_ranks is not None:
      ranks = {p: tuple(layer_ranks[layer_name(p)]) for p in chosen
               if layer_ranks[layer_name(p)] is not None}
    else:
      ranks, reasons = choose_layer_ranks(
          chosen, flat, spec, energy, budget_macs=budget_macs, budget_params=budget_params,
          multiple=rank_multiple, positions=positions)
      for path, reason in reasons.items():
        _LOG.warning("tucker: %s %s", path, reason)
    trainable, cstate = {}, {}
    for path, leaf in flat.items():
      if path not in ranks:
        trainable[path] = leaf
        continue
      r_in, r_out = ranks[path]
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

  def encode(trainable, cstate, zeros):
    return export_arrays(trainable)

  def costs(summary, trainable, cstate):
    return factorized_costs(summary, trainable)

  return base.Method("tucker", init, apply, encode=encode, costs=costs, revives=True)


def reconstruction_errors(params: Any, trainable: Any) -> dict[str, float]:
  """Relative Frobenius error ``|W - W_hat| / |W|`` of each factorized kernel.

  Args:
    params: the original params.
    trainable: the ``tucker`` method's trainable tree (``init(params)[0]``).

  >>> params = {"fc1": {"kernel": jnp.eye(16)}}
  >>> m = registry.build("tucker", ["fc1/kernel"], ranks="0.25")
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


_FACTORS = ("core", "u_in", "u_out")


def export_arrays(trainable: Any) -> dict[str, tuple[bytes, dict]]:
  """The float32 Tucker factors of each factorized kernel (what the layer stores)."""
  out = {}
  for layer, factors in factorized_layers(trainable).items():
    payload, layout = packing.concat({name: np.asarray(f, "<f4").tobytes()
                                      for name, f in zip(_FACTORS, factors)})
    kernel = [*np.shape(factors[0])[:-2], np.shape(factors[1])[0], np.shape(factors[2])[0]]
    out[f"{layer}/kernel" if layer else "kernel"] = payload, {
        "shapes": [list(np.shape(f)) for f in factors], "layout": layout,
        "shape": [int(d) for d in kernel]}
  return out


def import_arrays(exported: dict[str, tuple[bytes, dict]]) -> dict[str, jax.Array]:
  """Inverse of :func:`export_arrays`: the rebuilt kernels.

  Raises:
    ValueError: the factors do not fit together, or (when the meta gives the
      kernel's ``shape``, as ``export.load`` does) would rebuild another shape;
      checked before the kernel is allocated.
  """
  out = {}
  for path, (payload, meta) in exported.items():
    parts = packing.split(payload, meta["layout"])
    shapes = meta["shapes"]
    if not (isinstance(shapes, list) and len(shapes) == len(_FACTORS) and all(
        isinstance(s, list) and all(isinstance(d, int) and d >= 0 for d in s) for s in shapes)
            and len(shapes[0]) >= 2 and len(shapes[1]) == len(shapes[2]) == 2
            and shapes[0][-2:] == [shapes[1][1], shapes[2][1]]):
      raise ValueError(f"{path}: Tucker factor shapes {shapes!r} do not fit together")
    kernel = [*shapes[0][:-2], shapes[1][0], shapes[2][0]]
    if "shape" in meta and kernel != list(meta["shape"]):
      raise ValueError(f"{path}: Tucker factors {shapes} rebuild a kernel of shape {kernel}, "
                       f"not {list(meta['shape'])}")
    out[path] = kernel_from_factors(*(
        np.frombuffer(parts[name], "<f4").reshape(shape)
        for name, shape in zip(_FACTORS, shapes)))
  return out


def _factorized(methods, index, trainable, cstate):
  return factorized_execution(trainable, cstate[str(index)])


_TUCKER_OPTIONS = (
    base.Option("ranks", str, "", "channel ranks: 'evbmf' or 'vbmf' (variational Bayesian "
                "matrix factorization of each channel mode's unfolding, Kim et al.), "
                "layer=R_in:R_out pairs ('conv2=8:16,fc1=32:32') or one fraction of every "
                "mode ('0.25'); layers not named use --energy or the budget"),
    base.Option("energy", float, None, "keep the fewest singular values holding this fraction "
                "of each channel mode's squared spectrum, in (0, 1]; given, it replaces "
                "compress's default MAC budget; left out (none): 0.9 where no budget applies",
                range="(0, 1]"),
    base.Option("hooi-iters", int, 0, "HOOI refinement iterations after the HOSVD",
                range="[0, inf)"),
    base.Option("budget-macs", float, None, "MAC budget: the factorized selected layers may "
                "cost at most this fraction of their original MACs per example; one energy "
                "threshold shared by the layers --ranks does not name is searched for "
                "(replaces --energy); 0 = no budget; left out (none): 0.5, unless --energy, "
                "--budget-params or --ranks chooses every rank. With ranks x8, half the MACs "
                "made LeNet-5 1.8x faster on CPU (--energy 0.9 at exact ranks: 0.5x)",
                range="[0, 1]"),
    base.Option("budget-params", float, 0.0, "weight budget: at most this fraction of the "
                "selected kernels' original weights, as --budget-macs; 0 = none", range="[0, 1]"),
    base.Option("rank-multiple", int, None, "round every rank not given as a layer pair up to "
                "a multiple of this (capped at its channel mode; before a budget is checked); "
                "1 = exact ranks; left out (none): 8, which fills the SIMD lanes of 32-bit "
                "floats on AVX2 CPUs (unaligned ranks ran slower than the MACs they save)",
                range="[1, inf)"),
    base.Option("positions", dict, None, "{layer: [input, output positions]} per example",
                hidden=True),
    base.Option("layer-ranks", dict, None, "{layer: [R_in, R_out] or null (left alone)}, "
                "chosen by compress", hidden=True),
)
registry.register(
    "tucker", *_TUCKER_OPTIONS, prepare=_prepare, decode=import_arrays,
    executions={"factorized": base.ExecutionMode(
        _factorized, "Tucker layers as their 1x1 -> core -> 1x1 factor sequence")},
    default_execution="factorized", describe=describe,
    help="Tucker-2 factorization of conv / dense kernels on their channel modes "
         "(Kim et al. 2016)")(tucker_method)
