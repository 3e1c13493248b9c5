"""The jaxpr side of ``jcompress.cost.summarize``: one traced forward pass and
the arithmetic ops of its primitives, attributed to the module calls that ran them.

``trace`` runs the model under ``nn.intercept_methods`` and ``jax.make_jaxpr``,
recording every module method call (path, input and output shapes) and opening a
``jax.named_scope`` per call, so each equation's name stack says which call ran
it. ``count_ops`` then walks the jaxpr, following calls, custom derivatives and
scans, and adds each equation's ops to the innermost call that ran it: one op per
output element of an arithmetic or comparison primitive, one per input element of
a reduction, one per window element of a pooling window, ``2 * MACs`` for a
contraction; data movement is free. A primitive with no count is an error, never
silently zero.

>>> class Tiny(nn.Module):
...   @nn.compact
...   def __call__(self, x, train=False):
...     return nn.relu(nn.Dense(3, name="fc")(x))
>>> model = Tiny()
>>> calls, jaxpr = trace(model, model.init(jax.random.key(0), jnp.zeros((1, 4))), (4,))
>>> [(c.path, c.input_shape, c.output_shape) for c in calls]
[('', (4,), (3,)), ('fc', (4,), (3,))]
>>> ops = {}
>>> count_ops(jaxpr.jaxpr, calls, lambda index: True, ops)
>>> sorted(ops.items())  # relu: 3 maxes; fc: 2 * 12 for the matmul, 3 bias adds
[(0, 3), (1, 27)]
"""

from __future__ import annotations

import inspect

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jcore

_MARK = "jcompress_cost_call_"


@dataclasses.dataclass
class Call:
  """One module method call of the traced forward pass (shapes without the batch axis)."""
  module: nn.Module
  path: str
  input_shape: tuple[int, ...] | None
  nested: bool  # inside another method call of the same module
  output_shape: tuple[int, ...] | None = None


def _example_shape(value: Any) -> tuple[int, ...] | None:
  shape = getattr(value, "shape", None)
  return tuple(shape[1:]) if shape else None


def trace(model: nn.Module, variables: Mapping[str, Any],
          input_shape: tuple[int, ...]) -> tuple[list[Call], jcore.ClosedJaxpr]:
  """The module calls of one forward pass and its jaxpr, whose name stacks hold
  ``_MARK<index>`` scopes pointing into the calls."""
  calls: list[Call] = []
  stack: list[str] = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "setup":
      return next_fun(*args, **kwargs)
    index = len(calls)
    path = "/".join(context.module.path)
    call = Call(context.module, path, _example_shape(args[0]) if args else None,
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

  kwargs = {"train": False} if _takes_train(model) else {}

  def forward(variables, x):
    with nn.intercept_methods(interceptor):
      return model.apply(variables, x, **kwargs)

  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  jaxpr = jax.make_jaxpr(forward)(variables, x)
  return calls, jaxpr


def _takes_train(model: nn.Module) -> bool:
  """Whether ``model.__call__`` has a ``train`` argument (the zoo's models do; a
  researcher's own model may not)."""
  try:
    params = inspect.signature(type(model).__call__).parameters
  except (TypeError, ValueError):
    return True
  return "train" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


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


def count_ops(jaxpr: jcore.Jaxpr, calls: list[Call], counted: Callable[[int], bool],
              ops: dict[int, int], owner: int = 0, repeat: int = 1) -> None:
  """Adds the ops of every eqn to ``ops[call index]`` for calls that are ``counted``."""
  for eqn in jaxpr.eqns:
    where = _owner(eqn, owner)
    if not counted(where):
      continue  # inside a layer counted by its rule, sub-jaxprs included
    name = eqn.primitive.name
    if name in _CALLS:
      count_ops(_sub_jaxpr(eqn), calls, counted, ops, where, repeat)
    elif name == "scan":
      count_ops(_sub_jaxpr(eqn), calls, counted, ops, where,
                repeat * eqn.params["length"])
    else:
      ops[where] = ops.get(where, 0) + repeat * _eqn_ops(eqn, calls[where].path)

