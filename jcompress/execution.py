"""How a compressed model runs at inference: ``jcompress eval --execution NAME``.

A compression plan's ``apply`` gives params of the model's own structure, so by
default (``float``) every layer runs as the uncompressed model does, on the
decompressed weights. Another execution runs some layers in their compressed
form: ``factorized`` runs each Tucker-factorized conv / dense layer as its factor
sequence (1x1 conv, core conv, 1x1 conv); ``int8`` runs the ``quantize``/``qat``
layers as int8 x int8 products with int32 accumulation; ``sparse`` runs the
pruned dense and 1x1 conv layers as CSR matrix products. An execution is a function
``(methods, trainable, cstate) -> context manager`` registered under a name; the
forward pass runs inside the context, entered inside the jitted function (the
arrays may be traced). ``methods`` are the plan's methods in order
(``transforms.plan_methods``), ``cstate`` the stacked state (``{"0": ..., "1": ...}``).

>>> from jcompress.transforms import base
>>> run = get("factorized", [base.build("tucker", ["fc/kernel"])])
>>> run.name, names()[:2]
('factorized', ['float', 'factorized'])
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, ContextManager, Sequence

import jax
import numpy as np

from jcompress import cost, sparse
from jcompress.transforms import base, quantize, select, tucker

ExecutionFn = Callable[[Sequence[base.Method], Any, Any], ContextManager[None]]


@dataclasses.dataclass(frozen=True)
class _Spec:
  run: ExecutionFn
  requires: tuple[str, ...]
  prepare: Callable[[Sequence[base.Method], Any, Any], Any] | None


EXECUTIONS: dict[str, _Spec] = {}


def register(name: str, *, requires: Sequence[str] = (),
             prepare: Callable[[Sequence[base.Method], Any, Any], Any] | None = None
             ) -> Callable[[ExecutionFn], ExecutionFn]:
  """Registers ``fn(methods, trainable, cstate) -> context manager`` as ``--execution name``.

  Args:
    name: the execution's name.
    requires: methods of which the plan must contain one (``tucker`` for
      ``factorized``); :func:`get` rejects plans without them.
    prepare: ``(methods, trainable, cstate) -> data`` computed on the host from the
      concrete state when the execution is bound (:func:`get` with ``state``), e.g.
      sparse matrices whose layout depends on where the zeros are; ``fn`` then
      receives ``data`` in place of ``trainable``.
  """
  def wrap(fn: ExecutionFn) -> ExecutionFn:
    if name in EXECUTIONS:
      raise ValueError(f"execution {name!r} registered twice")
    EXECUTIONS[name] = _Spec(fn, tuple(requires), prepare)
    return fn
  return wrap


def names() -> list[str]:
  """The registered executions, ``float`` first."""
  return list(EXECUTIONS)


@dataclasses.dataclass(frozen=True)
class Execution:
  """An execution bound to a plan's methods; hashable, so a static jit argument.

  Call it with the plan's trainable tree and stacked cstate to get the context
  the forward pass runs in. An execution with host-prepared ``data`` compares
  equal only to itself (its arrays become constants of the compiled function).
  """
  name: str
  methods: tuple[base.Method, ...] = ()
  data: Any = dataclasses.field(default=None, compare=False, repr=False)
  token: object = dataclasses.field(default=None, repr=False)

  def __call__(self, trainable: Any, cstate: Any) -> ContextManager[None]:
    spec = EXECUTIONS[self.name]
    return spec.run(self.methods, self.data if spec.prepare else trainable, cstate)


def get(name: str, methods: Sequence[base.Method] = (), trainable: Any = None,
        cstate: Any = None) -> Execution:
  """The execution ``name`` for a plan of ``methods``.

  Args:
    name: a registered execution.
    methods: the plan's methods in order.
    trainable, cstate: the plan's concrete state; needed by executions that
      prepare host data (``sparse``).

  Raises:
    ValueError: an unknown name, or a plan without the method it requires.
  """
  if name not in EXECUTIONS:
    raise ValueError(f"unknown --execution {name!r}; valid: {', '.join(names())}")
  spec = EXECUTIONS[name]
  if spec.requires and not set(spec.requires) & {m.name for m in methods}:
    plan = "+".join(m.name for m in methods) or "none"
    raise ValueError(f"--execution {name} runs a {' or '.join(spec.requires)}-compressed "
                     f"model; this plan is {plan}")
  if spec.prepare is None:
    return Execution(name, tuple(methods))
  if trainable is None:
    raise ValueError(f"--execution {name} is prepared from the model's state: pass "
                     "trainable and cstate")
  return Execution(name, tuple(methods), spec.prepare(methods, trainable, cstate), object())


def method_state(methods: Sequence[base.Method], cstate: Any, *names: str) -> Any:
  """The cstate of the last method called one of ``names`` in the plan."""
  index = max(i for i, m in enumerate(methods) if m.name in names)
  return cstate[str(index)]


@register("float")
def _float(methods, trainable, cstate) -> ContextManager[None]:
  return contextlib.nullcontext()


@register("factorized", requires=("tucker",))
def _factorized(methods, trainable, cstate) -> ContextManager[None]:
  return tucker.factorized_execution(trainable, method_state(methods, cstate, "tucker"))


@register("int8", requires=("quantize", "qat"))
def _int8(methods, trainable, cstate) -> ContextManager[None]:
  return quantize.int8_execution(method_state(methods, cstate, "quantize", "qat"))


def _sparse_matrices(methods, trainable, cstate) -> dict[str, sparse.SparseMatrix]:
  """CSR matrices of the pruned dense and 1x1 conv kernels, as the model runs them."""
  kernels = select.flatten(jax.device_get(base.stack(list(methods)).apply(trainable, cstate)))
  pruned = [p for i, m in enumerate(methods) if m.name == "prune"
            for p in select.flatten(cstate[str(i)]["masks"])]
  return {p: sparse.from_dense(kernels[p], "csr") for p in dict.fromkeys(pruned)
          if np.ndim(kernels[p]) == 2
          or (np.ndim(kernels[p]) == 4 and np.shape(kernels[p])[:2] == (1, 1))}


@register("sparse", requires=("prune",), prepare=_sparse_matrices)
def _sparse(methods, matrices, cstate) -> ContextManager[None]:
  return sparse.sparse_execution(matrices)


def factorized_costs(summary: cost.Summary, trainable: Any) -> cost.Summary:
  """``summary`` with each layer that ``trainable`` Tucker-factorizes counted as the
  factor sequence that runs: its tensors are the factors (32-bit, as exported),
  its MACs, nonzero MACs and FLOPs (seed 001's ``outputs * (2 fan_in - 1)`` per
  stage) those of the 1x1 conv at input resolution, the core conv and the 1x1
  conv at output resolution; its kind gets a ``tucker_`` prefix. Other rows are
  unchanged, so is the summary of a model without factors.

  Args:
    summary: ``cost.summarize`` of the model with the rebuilt kernels.
    trainable: the plan's trainable tree (with ``<layer>/kernel_core`` ...).

  Returns:
    The summary of what factorized execution runs.
  """
  layers = tucker.factorized_layers(trainable)
  rows = []
  for row in summary.layers:
    if row.path not in layers or not row.macs:
      rows.append(row)
      continue
    factors = [np.asarray(f) for f in layers[row.path]]
    core, u_in, u_out = factors
    *spatial, r_in, r_out = core.shape
    c_in, c_out, k = u_in.shape[0], u_out.shape[0], math.prod(spatial)
    in_pos, out_pos = math.prod(row.input_shape[:-1]), math.prod(row.output_shape[:-1])
    calls = row.macs // (out_pos * k * c_in * c_out)  # a shared layer runs more than once
    stages = [(in_pos, c_in, r_in, u_in), (out_pos, k * r_in, r_out, core),
              (out_pos, r_out, c_out, u_out)]
    macs = [calls * pos * fan_in * outs for pos, fan_in, outs, _ in stages]
    kernel = f"{row.path}/kernel" if row.path else "kernel"
    tensors = []
    for t in row.tensors:
      tensors += [cost.TensorCost(kernel + suffix, f.shape, int(np.count_nonzero(f)), 32.0)
                  for suffix, f in zip(("_core", "_u_in", "_u_out"), (core, u_in, u_out))
                  ] if t.path == kernel else [t]
    rows.append(dataclasses.replace(
        row, kind=f"tucker_{row.kind}", tensors=tuple(tensors), macs=sum(macs),
        nonzero_macs=sum(m * int(np.count_nonzero(f)) // f.size
                         for m, (*_, f) in zip(macs, stages)),
        flops=sum(calls * pos * outs * (2 * fan_in - 1) for pos, fan_in, outs, _ in stages),
        weight_bits=32.0))
  return dataclasses.replace(summary, layers=tuple(rows))
