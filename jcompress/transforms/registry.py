"""The registry of compression methods: built-in, from installed packages, or plugins.

A method is registered by the module that defines it, with :func:`register`.
:data:`METHODS` loads, the first time it is read, the built-in method modules,
then every module announced in the entry-point group ``jcompress.methods`` of an
installed package, then the modules named in ``$JCOMPRESS_PLUGINS``
(comma-separated); ``--plugin MODULE`` on the command line calls
:func:`load_plugin`. A plan step saved in a checkpoint records the module of its
method, so a run compressed with a plugin is evaluated, exported and compressed
further by plain ``jcompress`` commands (:func:`ensure`).

In a plugin's ``pyproject.toml``::

    [project.entry-points."jcompress.methods"]
    binary = "mypackage.binary"
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
import os
import re
from collections.abc import Mapping
from typing import Any, Callable, Iterator, NamedTuple

from jcompress.transforms.base import ExecutionMode, Method, Option, check_declaration, stack

_LOG = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "jcompress.methods"
PLUGINS_ENV = "JCOMPRESS_PLUGINS"
BUILTIN = ("jcompress.transforms.prune", "jcompress.transforms.quantize",
           "jcompress.transforms.ternary", "jcompress.transforms.tucker",
           "jcompress.transforms.binary", "jcompress.transforms.share",
           "jcompress.transforms.distill", "jcompress.transforms.act_quant")


class IntWeight(NamedTuple):
  """A tensor at its integer width, for ``export --format onnx`` (a method's ``onnx``
  hook): ``scale * (codes - zero_point)`` (``scale``/``zero_point`` of shape ``()`` or
  one per output channel, the last axis), or ``codebook[codes]`` when ``codebook``
  is given (``codes`` then are unsigned indices)."""
  codes: Any  # int8/uint8 (int16/uint16 above 8 bits) numpy array, the tensor's shape
  scale: Any = None
  zero_point: Any = None
  codebook: Any = None


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """A registered method: its factory and everything the commands need to know
  without building it."""
  name: str
  factory: Callable[..., Method]
  options: tuple[Option, ...]
  help: str
  module: str
  prepare: Callable[..., dict[str, Any]] | None = None
  selects: bool = True  # False: the method compresses no tensors (distillation)
  decode: Callable[[dict[str, tuple[bytes, dict]]], dict[str, Any]] | None = None
  executions: Mapping[str, ExecutionMode] = dataclasses.field(default_factory=dict)
  default_execution: str | None = None  # what ``bench`` times unless told otherwise
  # Options renamed since plans were saved: {earlier key: current key}.
  renamed: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # A plan step's options -> what it chose, in words (Tucker's ranks), or None.
  describe: Callable[[dict[str, Any]], str | None] | None = None
  # (trainable, cstate) -> {path: () -> tensor}: its tensors rebuilt in a traced graph
  # from compressed-width constants (``export --format stablehlo``); None: float32.
  stablehlo: Callable[[Any, Any], dict[str, Callable[[], Any]]] | None = None
  # (trainable, cstate) -> {path: IntWeight}: its tensors' integer form for
  # ``export --format onnx`` (int8 initializers + DequantizeLinear); None: float32.
  onnx: Callable[[Any, Any], dict[str, IntWeight]] | None = None
  # plan step options -> {kernel path: (input scale, input zero point, output scale,
  # output zero point)}: the uint8 activation grids the method trained with around
  # int8 layers, which ``export --format onnx`` uses instead of calibrating.
  onnx_ranges: Callable[[dict[str, Any]], dict[str, tuple]] | None = None


class _Registry(Mapping):
  """``{name: MethodSpec}``, filled on first read (module docstring)."""

  def __init__(self):
    self._specs: dict[str, MethodSpec] = {}
    self._loaded = False

  def _load(self) -> None:
    if self._loaded:
      return
    self._loaded = True
    for module in BUILTIN:
      importlib.import_module(module)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
      _import(entry.value.split(":")[0], f"entry point {entry.name!r} ({entry.value})")
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
      _import(module, f"${PLUGINS_ENV} module {module!r}")

  def __getitem__(self, name: str) -> MethodSpec:
    self._load()
    return self._specs[name]

  def __iter__(self) -> Iterator[str]:
    self._load()
    return iter(self._specs)

  def __len__(self) -> int:
    self._load()
    return len(self._specs)


METHODS = _Registry()


def _import(module: str, what: str) -> None:
  try:
    importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name and (module == e.name or module.startswith(e.name + ".")):
      raise ValueError(f"{what}: no module named {module!r}; install the package that "
                       "provides it or put it on PYTHONPATH") from None
    raise ValueError(f"{what}: importing {module!r} failed: {e}") from None
  except ValueError as e:
    raise ValueError(f"{what}: {e}") from None
  except Exception as e:  # a plugin's bug: report it as the plugin's, not ours
    raise ValueError(f"{what}: importing {module!r} failed: {type(e).__name__}: {e}") from None


def load_plugin(module: str) -> None:
  """Imports ``module`` (``--plugin MODULE``), which registers its methods.

  Raises:
    ValueError: no such module, or importing or registering failed.
  """
  METHODS._load()
  _import(module, f"--plugin {module}")


def register(name: str, *options: Option, help: str = "",
             prepare: Callable[..., dict[str, Any]] | None = None, selects: bool = True,
             decode: Callable[[dict[str, tuple[bytes, dict]]], dict[str, Any]] | None = None,
             executions: Mapping[str, ExecutionMode] | None = None,
             default_execution: str | None = None, renamed: Mapping[str, str] | None = None,
             describe: Callable[[dict[str, Any]], str | None] | None = None,
             stablehlo: Callable[[Any, Any], dict[str, Callable[[], Any]]] | None = None,
             onnx: Callable[[Any, Any], dict[str, IntWeight]] | None = None,
             onnx_ranges: Callable[[dict[str, Any]], dict[str, tuple]] | None = None):
  """Registers ``factory(paths: list[str], **options) -> Method`` under ``name``.

  Args:
    name: the method's name (``--method NAME``).
    *options: its :class:`Option` declarations (checked here).
    help: one line for ``--help`` (default: the factory's docstring's first line).
    prepare: ``(paths, options, model, variables, input_shape, context) -> options``
      fills in options that depend on the model rather than its params (Tucker's
      layer positions); ``compress`` calls it once, before saving the plan.
    selects: False if the method takes no tensor selection (its paths are ``[]``).
    decode: ``{path: (bytes, meta)} -> {path: array}``, the inverse of the
      method's ``encode`` (required with it, for ``eval --exported``).
    executions: ``{name: ExecutionMode}``, ways its layers run (``--execution``).
    default_execution: the execution ``bench`` times by default.
    renamed: ``{earlier key: current key}`` of options renamed since plans were
      saved with them: a saved plan's earlier keys are read as the current ones.
    describe: ``options -> str`` saying what a plan step chose (``compress`` and
      ``summary --workdir`` print it; Tucker's ranks per layer).
    stablehlo: ``(trainable, cstate) -> {path: () -> tensor}``: each function rebuilds
      a tensor the method runs with from host constants at their compressed width
      (int8 codes and float scales), called inside the traced forward pass that
      ``export --format stablehlo`` serializes, so the module embeds those constants.
    onnx: ``(trainable, cstate) -> {path: IntWeight}``: the integer codes and scales
      (or codebook) of the tensors it compresses, which ``export --format onnx``
      stores as integer initializers feeding ONNX Runtime's int8 kernels.
    onnx_ranges: ``options -> {kernel path: (in scale, in zero point, out scale, out
      zero point)}``: the uint8 activation grids a method trained with (``act_quant``),
      used by ``export --format onnx --activations static`` instead of calibrating.

  Raises:
    ValueError: a bad name or option declaration, or a name taken by another module.
  """
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"method name {name!r}: use lower-case letters, digits and '_'")
  names = [o.name for o in options]
  if len(set(names)) != len(names):
    raise ValueError(f"method {name!r} declares an option twice: {names}")
  for option in options:
    check_declaration(name, option)

  def wrap(factory):
    module = factory.__module__
    if module == "__main__":
      _LOG.warning("method %r is registered by a script (__main__): runs compressed with it "
                   "can be evaluated only by that script; put it in a module and use "
                   "--plugin MODULE or an entry point", name)
    if name in METHODS._specs and METHODS._specs[name].module != module:
      raise ValueError(f"method {name!r} is registered by both "
                       f"{METHODS._specs[name].module} and {module}")
    for mode in executions or {}:
      if not re.fullmatch(r"[a-z][a-z0-9_]*", mode) or mode == "float":
        raise ValueError(f"method {name!r}: bad execution name {mode!r}")
    METHODS._specs[name] = MethodSpec(
        name, factory, tuple(options), help or (factory.__doc__ or "").split("\n")[0],
        module, prepare, selects, decode, dict(executions or {}), default_execution,
        dict(renamed or {}), describe, stablehlo, onnx, onnx_ranges)
    return factory
  return wrap


def spec(name: str) -> MethodSpec:
  """The registered method ``name``; ValueError listing the valid ones."""
  if name not in METHODS:
    raise ValueError(f"unknown --method {name!r}; valid: {', '.join(sorted(METHODS))}")
  return METHODS[name]


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
  """``options`` of method ``name`` validated, converted and completed with defaults.

  Raises:
    ValueError: an option the method does not take, or a bad value (the message
      names ``--NAME`` and the method).
  """
  s = spec(name)
  options = current_keys(s, options)
  known = {o.key: o for o in s.options}
  unknown = sorted(set(options) - set(known))
  if unknown:
    raise ValueError(f"--method {name} takes no option {', '.join(unknown)}; its options: "
                     f"{', '.join('--' + o.name for o in s.options if not o.hidden) or 'none'}")
  return {k: o.check(options[k], f"{name}: --{o.name}") if k in options else o.default
          for k, o in known.items()}


def build(name: str, paths: list[str] | tuple[str, ...] = (), **options: Any) -> Method:
  """The method ``name`` over ``paths`` with ``options`` (checked, defaults filled in).

  >>> m = build("qat", ["fc1/kernel"], bits=4)
  >>> m.name, m.paths
  ('qat', ('fc1/kernel',))
  >>> build("qat", ["fc1/kernel"], bits=1)
  Traceback (most recent call last):
  ...
  ValueError: qat: --bits must be in [2, 16], got 1
  """
  if isinstance(paths, str):
    raise ValueError(f"paths must be a list of parameter paths, got the string {paths!r}")
  method = spec(name).factory(list(paths), **check_options(name, options))
  return method if method.paths is not None else method._replace(paths=tuple(paths))


def current_keys(s: MethodSpec, options: dict[str, Any]) -> dict[str, Any]:
  """``options`` with the keys a plan saved under an option's earlier name
  (``s.renamed``) read as its current one."""
  return {s.renamed.get(k, k): v for k, v in options.items()}


def describe_step(step: dict[str, Any]) -> str:
  """One line for a saved plan step: its method, how many tensors it selected and
  what its ``describe`` hook says it chose.

  >>> describe_step({"method": "quantize", "options": {"bits": 4}, "paths": ["fc1/kernel"]})
  'quantize on 1 tensor'
  """
  s = spec(step["method"])
  n = len(step["paths"])
  said = s.describe(current_keys(s, step["options"])) if s.describe else None
  return (f"{s.name} on {n} tensor{'' if n == 1 else 's'}" if s.selects else s.name) + (
      f": {said}" if said else "")


def plan_step(name: str, paths: list[str], options: dict[str, Any]) -> dict[str, Any]:
  """A plan step as checkpoints store it: method, its module, options, paths."""
  return {"method": name, "module": spec(name).module, "options": options,
          "paths": list(paths)}


def ensure(plan: list[dict], *, trusted: bool = True) -> None:
  """Imports the module recorded for each plan step whose method is not registered.

  Args:
    plan: the steps (``{"method", "module", ...}``).
    trusted: the plan comes from a local run folder; an exported file is not
      trusted: its modules are never imported (load them with ``--plugin``).

  Raises:
    ValueError: a step's method cannot be found (the message names its module).
  """
  for step in plan:
    if step["method"] in METHODS:
      continue
    module = step.get("module")
    if module and not trusted:
      raise ValueError(f"method {step['method']!r} is not registered; this file says module "
                       f"{module!r} provides it: if you trust it, pass --plugin {module}")
    if module:
      _import(module, f"this run's method {step['method']!r}")
    if step["method"] not in METHODS:
      raise ValueError(f"this run uses method {step['method']!r}"
                       + (f" from module {module!r}" if module else "")
                       + ", which is not installed: install it or pass --plugin MODULE")


def with_defaults(plan: list[dict]) -> list[dict]:
  """``plan`` with every option its steps leave out at the method's default (and the
  method's module), so a plan saved before an option existed equals the same plan
  written now.

  >>> with_defaults([{"method": "tucker", "options": {}, "paths": []}])[0]["options"]["hooi_iters"]
  0
  """
  ensure(plan)
  out = []
  for step in plan:
    s = METHODS[step["method"]]
    defaults = {o.key: o.default for o in s.options}
    out.append(step | {"module": s.module,
                       "options": defaults | current_keys(s, step["options"])})
  return out


def plan_methods(plan: list[dict]) -> list[Method]:
  """The methods of a saved plan ``[{"method", "options", "paths"}, ...]``, in order."""
  ensure(plan)
  return [build(p["method"], p["paths"], **p["options"]) for p in plan]


def from_plan(plan: list[dict], held: int = 0) -> Method:
  """The stacked method of a saved plan (``held``: see :func:`base.stack`)."""
  return stack(plan_methods(plan), held)


def cli_options() -> dict[str, list[tuple[str, Option]]]:
  """``{option name: [(method, Option), ...]}`` of every command-line method option
  (hidden ones left out), in name order."""
  out: dict[str, list[tuple[str, Option]]] = {}
  for name in sorted(METHODS):
    for option in METHODS[name].options:
      if not option.hidden:
        out.setdefault(option.name, []).append((name, option))
  return dict(sorted(out.items()))
