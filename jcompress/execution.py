"""How a compressed model runs at inference: ``jcompress eval --execution NAME``.

A compression plan's ``apply`` gives params of the model's own structure, so by
default (``float``) every layer runs as the uncompressed model does, on the
decompressed weights. Every other execution is declared by the method that
provides it (``registry.register(..., executions={name: ExecutionMode})``):
``factorized`` (tucker), ``int8`` (quantize, qat), ``sparse`` (prune), and those
of plugins. The forward pass runs inside the execution's context, entered inside
the jitted function (the arrays may be traced).

>>> from jcompress.transforms import registry
>>> run = get("factorized", [registry.build("tucker", ["fc/kernel"])])
>>> run.name, names()[0]
('factorized', 'float')
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ContextManager, Sequence

from jcompress.transforms import base
from jcompress.transforms.registry import METHODS


def modes() -> dict[str, list[tuple[str, base.ExecutionMode]]]:
  """``{execution: [(method, mode), ...]}`` over the registered methods."""
  out: dict[str, list[tuple[str, base.ExecutionMode]]] = {}
  for name in sorted(METHODS):
    for mode, spec in METHODS[name].executions.items():
      out.setdefault(mode, []).append((name, spec))
  return out


def names() -> list[str]:
  """The executions, ``float`` first."""
  return ["float", *sorted(modes())]


def describe() -> str:
  """One phrase per execution, for ``--help``."""
  parts = ["float (decompressed weights in the original layers)"]
  for mode, owners in sorted(modes().items()):
    parts.append(f"{mode} ({owners[0][1].help}; {'/'.join(m for m, _ in owners)})")
  return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class Execution:
  """An execution bound to a plan's methods; hashable, so a static jit argument.

  Call it with the plan's trainable tree and stacked cstate to get the context
  the forward pass runs in. An execution with host-prepared ``data`` compares
  equal only to itself (its arrays become constants of the compiled function).
  """
  name: str
  methods: tuple[base.Method, ...] = ()
  index: int = -1
  data: Any = dataclasses.field(default=None, compare=False, repr=False)
  token: object = dataclasses.field(default=None, repr=False)

  def __call__(self, trainable: Any, cstate: Any) -> ContextManager[None]:
    if self.name == "float":
      return contextlib.nullcontext()
    mode = METHODS[self.methods[self.index].name].executions[self.name]
    return mode.run(self.methods, self.index, self.data if mode.prepare else trainable, cstate)


def get(name: str, methods: Sequence[base.Method] = (), trainable: Any = None,
        cstate: Any = None) -> Execution:
  """The execution ``name`` for a plan of ``methods``: that of the last method of
  the plan that provides it.

  Args:
    name: ``float`` or an execution a registered method provides.
    methods: the plan's methods in order.
    trainable, cstate: the plan's concrete state; needed by executions that
      prepare host data (``sparse``).

  Raises:
    ValueError: an unknown name, or a plan none of whose methods provides it.
  """
  if name not in names():
    raise ValueError(f"unknown --execution {name!r}; valid: {', '.join(names())}")
  if name == "float":
    return Execution(name, tuple(methods))
  owners = [i for i, m in enumerate(methods)
            if m.name in METHODS and name in METHODS[m.name].executions]
  if not owners:
    plan = "+".join(m.name for m in methods) or "none"
    needed = " or ".join(m for m, _ in modes()[name])
    raise ValueError(f"--execution {name} runs a {needed}-compressed model; this plan is {plan}")
  index = owners[-1]
  mode = METHODS[methods[index].name].executions[name]
  if mode.prepare is None:
    return Execution(name, tuple(methods), index)
  if trainable is None:
    raise ValueError(f"--execution {name} is prepared from the model's state: pass "
                     "trainable and cstate")
  return Execution(name, tuple(methods), index, mode.prepare(methods, index, trainable, cstate),
                   object())


def skips_zeros(run: Execution) -> bool:
  """Whether ``run`` multiplies only the nonzero weights (``sparse``)."""
  return run.name != "float" and METHODS[run.methods[run.index].name].executions[
      run.name].skips_zeros


def default_for(methods: Sequence[base.Method]) -> str:
  """The execution ``bench`` times unless told: the last method's declared default."""
  for m in reversed(list(methods)):
    mode = METHODS[m.name].default_execution if m.name in METHODS else None
    if mode:
      return mode
  return "float"
