"""Parameters, MACs, FLOPs, bytes, sparsity, scores and energy of a Flax model.

Everything is read off the model itself: ``summarize`` traces one forward pass
(batch 1, ``train=False``) under ``nn.intercept_methods``, so every module call is
seen with its path, input and output shapes, and every primitive of the traced
jaxpr is attributed to the innermost module that ran it. No model needs counting
code; a new *layer* class (one that owns parameters directly) needs a rule,
registered with ``register_layer``.

Counting convention (per example):

- Weight layers (``dense``, ``conv``, ``grouped_conv``, ``depthwise``, ``local``):
  ``macs = output elements * fan_in``, where fan_in is the number of weights
  feeding one output (``C_in/groups * prod(kernel)`` for convs, the patch size for
  locally connected layers). Padded border positions count as full windows.
  ``flops`` count ``fan_in`` multiplies and ``fan_in - 1`` adds per output:
  ``output elements * (2 * fan_in - 1)`` (conv ``C_out H' W' (2 C_in K^2 - 1)``,
  dense ``(2I - 1) O``); the bias add is an other op.
  ``nonzero_macs = macs * nonzero(kernel) / size(kernel)``: every kernel weight is
  used equally often, so this is exact for the actual zero pattern.
- Batch norm: 2 other ops per output element (scale and shift once the running
  statistics are folded), no MACs. ``Summary.mults("macs_bn")`` instead counts 2
  multiplications per batch norm feature on top of the MACs.
- Everything else (activations, pooling, squeeze-excite scaling, residual adds,
  layer norm): counted from the jaxpr. One op per output element of each
  arithmetic or comparison primitive, one per input element of a reduction, one
  per window element of a pooling window, ``2 * MACs`` for a contraction between
  activations; reshapes, transposes, slices, casts and concatenations are free.
  So h-swish costs 5 ops per element (add, max, min, div, mul).

Storage: ``bytes`` of a tensor are ``size * bits / 8`` (dense storage, as the
``log10(error * bytes * mults)`` score counts it); ``sparse_bytes`` store the
nonzeros plus a 1-bit mask of the full shape (MicroNet). Trainable parameters
only: batch norm running statistics fold into the scale and shift at inference.

This module is the public API: the layer rules, the per-tensor overrides and
``summarize``. The records and scores (``Summary``, ``LayerCost``, ``TensorCost``,
``score``, ``energy_uj``, ``micronet_score``) live in ``jcompress.cost_summary``,
the jaxpr tracing and per-primitive op counts in ``jcompress.cost_trace``; all
public names are importable from here.

>>> import jax, jax.numpy as jnp
>>> from jcompress import cost, models
>>> model = models.create("lenet300", num_classes=10, input_shape=(28, 28, 1))
>>> variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
>>> s = cost.summarize(model, variables, (28, 28, 1))
>>> s.params, s.macs
(266610, 266200)
>>> cost.summarize(model, variables, (28, 28, 1), bits=2).bytes
66652.5
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from jcompress.cost_summary import (LayerCost, MicroNetScore, Summary,  # noqa: F401
                                    TensorCost, energy_uj, micronet_score, score)
from jcompress.cost_trace import Call, count_ops, trace
from jcompress.layers import DepthwiseConv

Overrides = Mapping[str, Any] | Callable[[str, np.ndarray], Any] | float | None


@dataclasses.dataclass(frozen=True)
class LayerRule:
  """How to count a module class that owns parameters directly.

  Attributes:
    kind: the name shown in tables (``dense``, ``batch_norm``...).
    fan_in: ``fan_in(module, params)``: the weights feeding one output element,
      for layers whose ``kernel`` parameter is multiplied with the input (MACs
      and FLOPs); None for layers without MACs.
    ops_per_output: other ops per output element for layers without MACs (batch
      norm: 2); None to count the layer's ops from the traced jaxpr.
  """
  kind: str
  fan_in: Callable[[nn.Module, Mapping[str, np.ndarray]], int] | None = None
  ops_per_output: int | None = None


def _kernel_fan_in(module: nn.Module, params: Mapping[str, np.ndarray]) -> int:
  kernel = params["kernel"]
  return kernel.size // kernel.shape[-1]


def _local_fan_in(module: nn.Module, params: Mapping[str, np.ndarray]) -> int:
  return params["kernel"].shape[-2]


_RULES: list[tuple[type, Callable[[nn.Module], LayerRule]]] = []


def register_layer(cls: type, rule: LayerRule | Callable[[nn.Module], LayerRule]) -> None:
  """Teaches ``summarize`` to count a module class that owns parameters.

  Rules registered later win over earlier ones, so a subclass can refine its base.

  Args:
    cls: the module class (subclasses match too).
    rule: a ``LayerRule``, or a function of the module instance returning one.
  """
  _RULES.insert(0, (cls, rule if callable(rule) else lambda module: rule))


register_layer(nn.Dense, LayerRule("dense", _kernel_fan_in))
register_layer(nn.Conv, lambda m: LayerRule(
    "grouped_conv" if m.feature_group_count > 1 else "conv", _kernel_fan_in))
register_layer(nn.ConvLocal, LayerRule("local", _local_fan_in))
register_layer(DepthwiseConv, LayerRule("depthwise", _kernel_fan_in))
register_layer(nn.BatchNorm, LayerRule("batch_norm", ops_per_output=2))
register_layer(nn.LayerNorm, LayerRule("layer_norm"))
register_layer(nn.GroupNorm, LayerRule("group_norm"))


def _rule_for(module: nn.Module, path: str, names: Sequence[str]) -> LayerRule:
  for cls, rule in _RULES:
    if isinstance(module, cls):
      return rule(module)
  raise ValueError(f"cost: no counting rule for {type(module).__name__} at {path!r}, "
                   f"which owns parameters {sorted(names)}; add one with "
                   "cost.register_layer")


# ----------------------------------------------------------------------------
# Overrides.


def _per_tensor(name: str, overrides: Overrides, flat: Mapping[str, np.ndarray]
                ) -> dict[str, Any]:
  """``overrides`` resolved to ``{path: value}`` for the paths it sets."""
  if overrides is None:
    return {}
  if callable(overrides):
    values = {path: overrides(path, leaf) for path, leaf in flat.items()}
    return {path: value for path, value in values.items() if value is not None}
  if isinstance(overrides, Mapping):
    given = traverse_util.flatten_dict(dict(overrides), sep="/")
    unknown = sorted(set(given) - set(flat))
    if unknown:
      raise ValueError(f"cost: {name} names {unknown[0]!r}, which is not a parameter path; "
                       f"paths look like {next(iter(flat))!r}")
    return {path: value for path, value in given.items() if value is not None}
  return dict.fromkeys(flat, overrides)


def _bits(path: str, value: Any) -> float:
  bits = float(value)
  if not bits > 0:
    raise ValueError(f"cost: bits for {path!r} must be positive, got {value}")
  return bits


def _nonzero(path: str, leaf: np.ndarray, mask: Any) -> int:
  if mask is None:
    return int(np.count_nonzero(leaf))
  if np.ndim(mask) == 0:
    sparsity = float(mask)
    if not 0 <= sparsity <= 1:
      raise ValueError(f"cost: sparsity for {path!r} must be in [0, 1], got {mask}")
    return round((1 - sparsity) * leaf.size)
  mask = np.asarray(mask)
  if mask.shape != leaf.shape:
    raise ValueError(f"cost: mask for {path!r} has shape {mask.shape}, the parameter "
                     f"{leaf.shape}")
  return int(np.count_nonzero((mask != 0) & (leaf != 0)))


# ----------------------------------------------------------------------------
# The summary.


def summarize(model: nn.Module, variables: Mapping[str, Any], input_shape: Sequence[int], *,
              bits: Overrides = None, masks: Overrides = None,
              default_bits: float = 32) -> Summary:
  """Counts the costs of ``model`` for one example of ``input_shape``.

  Args:
    model: any Flax linen module, called as ``model.apply(variables, x, train=False)``
      (without ``train`` if its ``__call__`` takes none).
    variables: its variables; ``params`` are counted, other collections only used.
    input_shape: one example's shape (no batch axis).
    bits: bits per stored entry: a number for every tensor, a mapping from
      ``/``-joined parameter paths (``fc1/kernel``, or the nested dict of them) to
      bits, or ``f(path, leaf) -> bits | None``. A ternary tensor is 2 bits, or
      1.6 packed five to a byte. Unset tensors get ``default_bits``.
    masks: per tensor, a 0/1 mask of the parameter's shape (an entry counts as
      nonzero where the mask is 1 and the parameter nonzero) or a sparsity in
      [0, 1]; same forms as ``bits``. By default the parameters' actual zeros count.
    default_bits: bits of tensors ``bits`` leaves unset.

  Returns:
    The per-layer table and totals.

  Raises:
    ValueError: an override names no parameter, a layer class has no rule, or
      the forward pass uses a primitive with no op count.
  """
  if "params" not in variables:
    raise ValueError("cost: variables have no 'params' collection")
  input_shape = tuple(int(n) for n in input_shape)
  params = jax.tree.map(np.asarray, dict(variables["params"]))
  flat = traverse_util.flatten_dict(params, sep="/")
  bit_map = {path: _bits(path, v) for path, v in _per_tensor("bits", bits, flat).items()}
  mask_map = _per_tensor("masks", masks, flat)
  tensors = {path: TensorCost(path, tuple(leaf.shape), _nonzero(path, leaf, mask_map.get(path)),
                              bit_map.get(path, _bits(path, default_bits)))
             for path, leaf in flat.items()}

  calls, jaxpr = trace(model, variables, input_shape)

  def own_tensors(path: str) -> dict[str, TensorCost]:
    prefix = f"{path}/" if path else ""
    return {p[len(prefix):]: t for p, t in tensors.items()
            if p.startswith(prefix) and "/" not in p[len(prefix):]}

  rules: dict[str, LayerRule | None] = {}
  for call in calls:
    if call.path not in rules:
      own = own_tensors(call.path)
      rules[call.path] = _rule_for(call.module, call.path, own) if own else None

  def counted(index: int) -> bool:
    rule = rules[calls[index].path]
    return rule is None or (rule.fan_in is None and rule.ops_per_output is None)

  ops: dict[int, int] = {}
  count_ops(jaxpr.jaxpr, calls, counted, ops)

  rows: dict[str, dict[str, Any]] = {}
  for index, call in enumerate(calls):
    rule = rules[call.path]
    row = rows.setdefault(call.path, {
        "path": call.path, "kind": "ops" if rule is None else rule.kind,
        "input_shape": call.input_shape, "output_shape": call.output_shape,
        "tensors": tuple(own_tensors(call.path).values()), "macs": 0, "nonzero_macs": 0,
        "flops": 0, "other_ops": 0, "weight_bits": None})
    row["other_ops"] += ops.get(index, 0)
    if rule is None or call.nested:
      continue
    outputs = math.prod(call.output_shape or ())
    if rule.ops_per_output is not None:
      row["other_ops"] += rule.ops_per_output * outputs
    if rule.fan_in is not None:
      _add_weight_layer(row, call, rule, own_tensors(call.path), flat, outputs)

  for path, tensor in tensors.items():
    module = path.rsplit("/", 1)[0] if "/" in path else ""
    if module not in rows:
      rows[module] = {"path": module, "kind": "unused", "input_shape": None,
                      "output_shape": None, "tensors": tuple(own_tensors(module).values())}
  layers = tuple(LayerCost(**row) for row in rows.values()
                 if row["tensors"] or row.get("other_ops"))
  return Summary(input_shape, layers)


def _add_weight_layer(row: dict[str, Any], call: Call, rule: LayerRule,
                      own: Mapping[str, TensorCost], flat: Mapping[str, np.ndarray],
                      outputs: int) -> None:
  """Adds one call's MACs, FLOPs and bias adds to the ``row`` of a weight layer."""
  if "kernel" not in own:
    raise ValueError(f"cost: weight layer {call.path!r} has no 'kernel' parameter")
  prefix = f"{call.path}/" if call.path else ""
  own_params = {name: flat[prefix + name] for name in own}
  fan_in = rule.fan_in(call.module, own_params)
  kernel = own["kernel"]
  macs = outputs * fan_in
  row["macs"] += macs
  row["nonzero_macs"] += macs * kernel.nonzero // kernel.size
  row["flops"] += outputs * (2 * fan_in - 1)
  if "bias" in own:
    row["other_ops"] += outputs
  row["weight_bits"] = kernel.bits
