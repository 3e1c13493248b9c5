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
  ``flops`` follow seed 001: ``output elements * (2 * fan_in - 1)`` (conv
  ``C_out H' W' (2 C_in K^2 - 1)``, dense ``(2I - 1) O``); the bias add is an other op.
  ``nonzero_macs = macs * nonzero(kernel) / size(kernel)``: every kernel weight is
  used equally often, so this is exact for the actual zero pattern.
- Batch norm: 2 other ops per output element (scale and shift once the running
  statistics are folded), no MACs. Seed 000 instead counted 2 "mults" per batch
  norm feature: ``Summary.mults("seed000")``.
- Everything else (activations, pooling, squeeze-excite scaling, residual adds,
  layer norm): counted from the jaxpr. One op per output element of each
  arithmetic or comparison primitive, one per input element of a reduction, one
  per window element of a pooling window, ``2 * MACs`` for a contraction between
  activations; reshapes, transposes, slices, casts and concatenations are free.
  So h-swish costs 5 ops per element (add, max, min, div, mul).

Storage: ``bytes`` of a tensor are ``size * bits / 8`` (dense storage, seed 000);
``sparse_bytes`` store the nonzeros plus a 1-bit mask of the full shape (MicroNet).
Trainable parameters only: batch norm running statistics fold into the scale and
shift at inference.

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
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.extend import core as jcore

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


@dataclasses.dataclass(frozen=True)
class TensorCost:
  """One trainable tensor.

  Attributes:
    path: ``/``-joined parameter path (``block3/dw/kernel``).
    shape: the tensor's shape.
    nonzero: entries that are nonzero (under the mask, if one was given).
    bits: bits per stored entry.
  """
  path: str
  shape: tuple[int, ...]
  nonzero: int
  bits: float

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def bytes(self) -> float:
    return self.size * self.bits / 8

  @property
  def sparse_bytes(self) -> float:
    """Nonzeros at ``bits`` plus a 1-bit mask of the full shape."""
    return self.nonzero * self.bits / 8 + self.size / 8

  @property
  def is_weight(self) -> bool:
    """A kernel of a weight layer (not a bias or a normalisation parameter)."""
    return self.path.rsplit("/", 1)[-1] == "kernel" and len(self.shape) >= 2


def _weight_sparsity(tensors) -> float:
  weights = [t for t in tensors if t.is_weight]
  size = sum(t.size for t in weights)
  return 1 - sum(t.nonzero for t in weights) / size if size else 0.0


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """One row of the per-layer table: a module that owns parameters, or the ops a
  module runs outside its submodules (kind ``ops``).

  Attributes:
    path: ``/``-joined module path (``""`` is the top-level module).
    kind: ``dense``, ``conv``, ``grouped_conv``, ``depthwise``, ``local``,
      ``batch_norm``, ``layer_norm``, ``group_norm``, ``ops``, or ``unused`` for
      parameters no traced call touched.
    input_shape: the first call's input shape without the batch axis.
    output_shape: the first call's output shape without the batch axis.
    tensors: the module's own trainable tensors.
    macs: multiply-accumulates of the weight layer.
    nonzero_macs: MACs with a nonzero weight.
    flops: seed 001's FLOPs of the weight layer.
    other_ops: all other arithmetic (see the module docstring).
    weight_bits: bits of the ``kernel`` of weight layers, else None.
  """
  path: str
  kind: str
  input_shape: tuple[int, ...] | None
  output_shape: tuple[int, ...] | None
  tensors: tuple[TensorCost, ...] = ()
  macs: int = 0
  nonzero_macs: int = 0
  flops: int = 0
  other_ops: int = 0
  weight_bits: float | None = None

  @property
  def params(self) -> int:
    return sum(t.size for t in self.tensors)

  @property
  def nonzero_params(self) -> int:
    return sum(t.nonzero for t in self.tensors)

  @property
  def bytes(self) -> float:
    return sum(t.bytes for t in self.tensors)

  @property
  def bits(self) -> float | None:
    """Average bits per parameter; None without parameters."""
    return 8 * self.bytes / self.params if self.params else None

  @property
  def sparsity(self) -> float:
    """Fraction of the layer's weights (kernel entries) that are zero."""
    return _weight_sparsity(self.tensors)

  def to_dict(self) -> dict[str, Any]:
    return {
        "path": self.path, "kind": self.kind,
        "input_shape": None if self.input_shape is None else list(self.input_shape),
        "output_shape": None if self.output_shape is None else list(self.output_shape),
        "params": self.params, "nonzero_params": self.nonzero_params,
        "macs": self.macs, "nonzero_macs": self.nonzero_macs, "flops": self.flops,
        "other_ops": self.other_ops, "weight_bits": self.weight_bits, "bits": self.bits,
        "bytes": self.bytes, "sparsity": self.sparsity,
    }


_MULTS_CONVENTIONS = ("macs", "nonzero_macs", "seed000")


@dataclasses.dataclass(frozen=True)
class Summary:
  """The per-layer costs of one model and their totals (per example).

  Attributes:
    input_shape: the input shape without the batch axis.
    layers: the table's rows in call order.
  """
  input_shape: tuple[int, ...]
  layers: tuple[LayerCost, ...]

  @property
  def tensors(self) -> tuple[TensorCost, ...]:
    return tuple(t for layer in self.layers for t in layer.tensors)

  @property
  def params(self) -> int:
    return sum(layer.params for layer in self.layers)

  @property
  def nonzero_params(self) -> int:
    return sum(layer.nonzero_params for layer in self.layers)

  @property
  def norm_params(self) -> int:
    """Trainable batch norm parameters (2 per normalised feature)."""
    return sum(layer.params for layer in self.layers if layer.kind == "batch_norm")

  @property
  def macs(self) -> int:
    return sum(layer.macs for layer in self.layers)

  @property
  def nonzero_macs(self) -> int:
    return sum(layer.nonzero_macs for layer in self.layers)

  @property
  def flops(self) -> int:
    return sum(layer.flops for layer in self.layers)

  @property
  def other_ops(self) -> int:
    return sum(layer.other_ops for layer in self.layers)

  @property
  def bytes(self) -> float:
    return sum(layer.bytes for layer in self.layers)

  @property
  def sparse_bytes(self) -> float:
    return sum(t.sparse_bytes for t in self.tensors)

  @property
  def bits(self) -> float:
    """Average bits per parameter."""
    return 8 * self.bytes / self.params

  @property
  def sparsity(self) -> float:
    """Fraction of zero weights over all weight tensors (kernels)."""
    return _weight_sparsity(self.tensors)

  def mults(self, convention: str = "macs") -> int:
    """The multiplication count under a named convention.

    Args:
      convention: ``macs`` (weight-layer MACs), ``nonzero_macs`` (MACs with a
        nonzero weight) or ``seed000`` (MACs plus 2 per batch norm feature, as
        seed 000 counted them).

    Returns:
      The count.
    """
    if convention == "macs":
      return self.macs
    if convention == "nonzero_macs":
      return self.nonzero_macs
    if convention == "seed000":
      return self.macs + self.norm_params
    raise ValueError(f"mults convention must be one of {_MULTS_CONVENTIONS}, "
                     f"got {convention!r}")

  def to_dict(self) -> dict[str, Any]:
    """Totals and the ``layers`` list, JSON-serialisable."""
    return {
        "input_shape": list(self.input_shape), "params": self.params,
        "nonzero_params": self.nonzero_params, "norm_params": self.norm_params,
        "macs": self.macs, "nonzero_macs": self.nonzero_macs, "flops": self.flops,
        "other_ops": self.other_ops, "bits": self.bits, "bytes": self.bytes,
        "sparse_bytes": self.sparse_bytes, "sparsity": self.sparsity,
        "layers": [layer.to_dict() for layer in self.layers],
    }


# ----------------------------------------------------------------------------
# Tracing.

_MARK = "jcompress_cost_call_"


@dataclasses.dataclass
class _Call:
  module: nn.Module
  path: str
  input_shape: tuple[int, ...] | None
  nested: bool  # inside another method call of the same module
  output_shape: tuple[int, ...] | None = None


def _example_shape(value: Any) -> tuple[int, ...] | None:
  shape = getattr(value, "shape", None)
  return tuple(shape[1:]) if shape else None


def _trace(model: nn.Module, variables: Mapping[str, Any],
           input_shape: tuple[int, ...]) -> tuple[list[_Call], jcore.ClosedJaxpr]:
  """The module calls of one forward pass and its jaxpr, whose name stacks hold
  ``_MARK<index>`` scopes pointing into the calls."""
  calls: list[_Call] = []
  stack: list[str] = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "setup":
      return next_fun(*args, **kwargs)
    index = len(calls)
    path = "/".join(context.module.path)
    call = _Call(context.module, path, _example_shape(args[0]) if args else None,
                 nested=bool(stack) and stack[-1] == path)
    calls.append(call)
    stack.append(path)
    try:
      with jax.named_scope(f"{_MARK}{index}"):
        out = next_fun(*args, **kwargs)
    finally:
      stack.pop()
    call.output_shape = _example_shape(out)
    return out

  def forward(variables, x):
    with nn.intercept_methods(interceptor):
      return model.apply(variables, x, train=False)

  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  jaxpr = jax.make_jaxpr(forward)(variables, x)
  return calls, jaxpr


# Primitives that move or reinterpret data without arithmetic.
_FREE = frozenset({
    "reshape", "broadcast_in_dim", "convert_element_type", "transpose", "squeeze",
    "expand_dims", "slice", "dynamic_slice", "dynamic_update_slice", "concatenate",
    "pad", "rev", "copy", "copy_p", "iota", "gather", "split", "device_put",
    "sharding_constraint", "stop_gradient", "optimization_barrier",
})
# One op per output element.
_ELEMENTWISE = frozenset({
    "add", "add_any", "sub", "mul", "div", "rem", "max", "min", "neg", "abs", "sign",
    "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sqrt", "rsqrt", "cbrt",
    "pow", "integer_pow", "square", "erf", "erfc", "erf_inv", "sin", "cos", "tan",
    "atan2", "floor", "ceil", "round", "clamp", "select_n", "gt", "ge", "lt", "le", "eq",
    "ne", "and", "or", "not", "xor", "is_finite", "nextafter", "reciprocal",
})
# One op per input element.
_REDUCTIONS = frozenset({
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
    "argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp",
})
_WINDOWS = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min",
                      "reduce_window"})
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
                    "custom_vjp_call", "custom_vjp_call_jaxpr", "remat", "checkpoint",
                    "custom_lin"})


def _size(var: Any) -> int:
  return math.prod(var.aval.shape)


def _contraction_macs(eqn: jcore.JaxprEqn) -> int:
  if eqn.primitive.name == "dot_general":
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    rhs_shape = eqn.invars[1].aval.shape
    free = [d for i, d in enumerate(rhs_shape) if i not in (*rhs_contract, *rhs_batch)]
    return _size(eqn.invars[0]) * math.prod(free)
  rhs_shape = eqn.invars[1].aval.shape
  out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
  return _size(eqn.outvars[0]) * math.prod(rhs_shape) // rhs_shape[out_feature_dim]


def _eqn_ops(eqn: jcore.JaxprEqn, where: str) -> int:
  name = eqn.primitive.name
  if name in _FREE:
    return 0
  if name in _ELEMENTWISE:
    return _size(eqn.outvars[0])
  if name in _REDUCTIONS:
    return _size(eqn.invars[0])
  if name in _WINDOWS:
    return _size(eqn.outvars[0]) * math.prod(eqn.params["window_dimensions"])
  if name in ("dot_general", "conv_general_dilated"):
    return 2 * _contraction_macs(eqn)
  raise ValueError(f"cost: no op count for primitive {name!r} in module {where!r}")


def _sub_jaxpr(eqn: jcore.JaxprEqn) -> jcore.Jaxpr:
  subs = [p for p in eqn.params.values() if isinstance(p, (jcore.Jaxpr, jcore.ClosedJaxpr))]
  if len(subs) != 1:
    raise ValueError(f"cost: cannot follow primitive {eqn.primitive.name!r} with "
                     f"{len(subs)} sub-jaxprs")
  return subs[0].jaxpr if isinstance(subs[0], jcore.ClosedJaxpr) else subs[0]


def _owner(eqn: jcore.JaxprEqn, default: int) -> int:
  owner = default
  for scope in eqn.source_info.name_stack.stack:
    name = getattr(scope, "name", "")
    if name.startswith(_MARK):
      owner = int(name[len(_MARK):])
  return owner


def _count_ops(jaxpr: jcore.Jaxpr, calls: list[_Call], counted: Callable[[int], bool],
               ops: dict[int, int], owner: int = 0, repeat: int = 1) -> None:
  """Adds the ops of every eqn to ``ops[call index]`` for calls that are ``counted``."""
  for eqn in jaxpr.eqns:
    where = _owner(eqn, owner)
    if not counted(where):
      continue  # inside a layer counted by its rule, sub-jaxprs included
    name = eqn.primitive.name
    if name in _CALLS:
      _count_ops(_sub_jaxpr(eqn), calls, counted, ops, where, repeat)
    elif name == "scan":
      _count_ops(_sub_jaxpr(eqn), calls, counted, ops, where,
                 repeat * eqn.params["length"])
    else:
      ops[where] = ops.get(where, 0) + repeat * _eqn_ops(eqn, calls[where].path)


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
    model: a module called as ``model.apply(variables, x, train=False)``.
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

  calls, jaxpr = _trace(model, variables, input_shape)

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
  _count_ops(jaxpr.jaxpr, calls, counted, ops)

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


def _add_weight_layer(row: dict[str, Any], call: _Call, rule: LayerRule,
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


# ----------------------------------------------------------------------------
# Scores.


def score(error: float, bytes: float, mults: float) -> float:
  """Seed 000's score ``log10(error * bytes * mults)``; lower is better.

  Args:
    error: the test error in (0, 1].
    bytes: the model's storage in bytes.
    mults: its multiplications per example (``Summary.mults(...)``).

  Returns:
    The score (seed 000 printed it truncated to 4 decimals).

  >>> f"{score(0.093959, 521215 * 4, 519936):.5f}"  # seed 000's FCN, small
  '11.00797'
  """
  if not 0 < error <= 1:
    raise ValueError(f"score: error must be in (0, 1], got {error}")
  if bytes <= 0 or mults <= 0:
    raise ValueError(f"score: bytes and mults must be positive, got {bytes}, {mults}")
  return math.log10(error * bytes * mults)


def energy_uj(macs: float, pj_per_mac: float = 1.0) -> float:
  """Energy per inference in microjoules at ``pj_per_mac`` picojoules per MAC.

  About 1 pJ per MAC at low precision in 45 nm (Horowitz; seed 002).

  >>> energy_uj(782_368)
  0.782368
  """
  if pj_per_mac <= 0:
    raise ValueError(f"energy_uj: pj_per_mac must be positive, got {pj_per_mac}")
  return macs * pj_per_mac * 1e-6


@dataclasses.dataclass(frozen=True)
class MicroNetScore:
  """The MicroNet challenge score and its two terms.

  Attributes:
    params: parameter storage in 32-bit parameter equivalents.
    ops: math operations in 32-bit operation equivalents.
    score: ``params / reference_params + ops / reference_ops``.
  """
  params: float
  ops: float
  score: float


def micronet_score(summary: Summary, *, reference_params: float, reference_ops: float,
                   activation_bits: float = 32, accumulator_bits: float = 32
                   ) -> MicroNetScore:
  """The MicroNet challenge (NeurIPS 2019) score of a summary.

  A b-bit parameter counts b/32; a sparse tensor counts its nonzeros plus a 1-bit
  mask of its full shape when that is smaller than storing it dense. Every nonzero
  MAC is one multiply at ``max(weight bits, activation_bits)`` and one add at
  ``accumulator_bits``; other ops run at ``activation_bits``; each op counts
  bits/32. The score normalises both terms by the track's reference network
  (pass its parameter and op counts; the reference scores 2).

  Args:
    summary: from ``summarize`` with the model's bits and masks.
    reference_params: the reference network's parameters.
    reference_ops: the reference network's math operations.
    activation_bits: bits of activations.
    accumulator_bits: bits of the accumulating adds.

  Returns:
    The two terms and the score.
  """
  if reference_params <= 0 or reference_ops <= 0:
    raise ValueError("micronet_score: reference_params and reference_ops must be positive")
  params = sum(min(t.size * t.bits, t.nonzero * t.bits + t.size) / 32
               for t in summary.tensors)
  ops = 0.0
  for layer in summary.layers:
    if layer.weight_bits is not None:
      multiply_bits = max(layer.weight_bits, activation_bits)
      ops += layer.nonzero_macs * (multiply_bits + accumulator_bits) / 32
    ops += layer.other_ops * activation_bits / 32
  return MicroNetScore(params, ops, params / reference_params + ops / reference_ops)
