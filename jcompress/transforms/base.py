"""The compression-method protocol and its registry.

A method turns a trained model's params into what compressed training and
evaluation need, as pure functions over pytrees (no Flax modules, no I/O):

* ``init(params) -> (trainable, cstate)``: ``trainable`` is what the optimizer
  updates (the params, possibly with extra leaves such as TTQ's learned scales
  ``<layer>/kernel_wp``); ``cstate`` holds non-trained arrays (masks, thresholds,
  integer codes). Both are pytrees of arrays: they are checkpointed as they are.
* ``apply(trainable, cstate) -> params``: the params the model runs with
  (ternarised, fake-quantised, masked...), jittable and differentiable; custom
  straight-through gradients live here (``jax.custom_vjp``). Its output has
  exactly the model's param structure.
* ``update(trainable, cstate, step) -> (trainable, cstate)``: runs after every
  optimizer step inside the jitted train step (re-apply masks, advance a pruning
  schedule). ``step`` is the new optimizer step count (a traced int32), or None
  for a step held from the run a model was compressed from (``--from``): its
  schedule is over, its state stays as it was (e.g. masks re-applied, not recomputed).
* ``optimizer(trainable, base) -> GradientTransformation``: wraps the base
  optimizer (``optax.multi_transform`` groups for scales and latent weights,
  gradient masks). Default: ``base``.
* ``bits(trainable, cstate) -> {path: bits per weight}``: storage precision per
  compressed tensor for cost accounting (paths of the *model* params).

A method is built by a factory registered with :func:`register`, called with the
selected paths and the method's options (plain JSON values, saved in the
checkpoint so the method can be rebuilt for ``eval``/``summary``/``export``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import optax


class Method(NamedTuple):
  """A compression method bound to its selected paths and options."""
  name: str
  init: Callable[[Any], tuple[Any, Any]]
  apply: Callable[[Any, Any], Any]
  update: Callable[[Any, Any, Any], tuple[Any, Any]] = lambda t, c, step: (t, c)
  optimizer: Callable[[Any, optax.GradientTransformation], optax.GradientTransformation] = (
      lambda trainable, base: base)
  bits: Callable[[Any, Any], dict[str, float]] = lambda trainable, cstate: {}


@dataclasses.dataclass(frozen=True)
class Option:
  """A method option, exposed by ``jcompress compress`` as ``--<name>``.

  ``name`` uses dashes on the command line and underscores as the factory's
  keyword. Options of different methods may share a name only with equal
  definitions.
  """
  name: str
  type: Callable[[str], Any]
  default: Any
  help: str
  choices: tuple | None = None
  hidden: bool = False  # filled in by the method's ``prepare``, not a command-line flag


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  name: str
  factory: Callable[..., Method]
  options: tuple[Option, ...]
  help: str
  prepare: Callable[..., dict[str, Any]] | None = None
  selects: bool = True  # False: the method compresses no tensors (distillation)


METHODS: dict[str, MethodSpec] = {}


def register(name: str, *options: Option, help: str = "",
             prepare: Callable[..., dict[str, Any]] | None = None, selects: bool = True):
  """Registers ``factory(paths: list[str], **options) -> Method`` under ``name``.

  ``prepare(paths, options, model, variables, input_shape) -> options``, if given,
  fills in options that depend on the model rather than its params (Tucker's
  layer positions); ``jcompress compress`` calls it once, before saving the plan.
  ``selects=False``: the method takes no tensor selection (its paths are ``[]``).
  """
  def wrap(factory):
    if name in METHODS:
      raise ValueError(f"method {name!r} registered twice")
    METHODS[name] = MethodSpec(name, factory, tuple(options),
                               help or (factory.__doc__ or "").split("\n")[0], prepare,
                               selects)
    return factory
  return wrap


def build(name: str, paths: list[str], **options: Any) -> Method:
  """The method ``name`` over ``paths`` with ``options`` (defaults filled in)."""
  if name not in METHODS:
    raise ValueError(f"unknown --method {name!r}; valid: {', '.join(sorted(METHODS))}")
  spec = METHODS[name]
  known = {o.name.replace("-", "_"): o for o in spec.options}
  unknown = sorted(set(options) - set(known))
  if unknown:
    raise ValueError(f"--method {name} takes no option {', '.join(unknown)}; its options: "
                     f"{', '.join('--' + o.name for o in spec.options) or 'none'}")
  values = {k: options.get(k, o.default) for k, o in known.items()}
  return spec.factory(list(paths), **values)


IDENTITY = Method("none", init=lambda params: (params, {}), apply=lambda t, c: t)


def stack(methods: list[Method], held: int = 0) -> Method:
  """Methods applied in order (e.g. prune, then ternarize) as one Method.

  ``cstate`` is ``{"0": cstate of the first, "1": ...}``. Each method's ``init``
  sees the trainable tree left by the previous ones; in the forward pass each
  ``apply`` passes on the leaves it does not own, so the first method's output
  feeds the second. Updates run in order; optimizers nest (the last outermost).
  The first ``held`` methods (the steps a source run already did) get ``update``
  with ``step=None``: their schedules do not start again.
  """
  if not methods:
    return IDENTITY
  if len(methods) == 1 and methods[0] is IDENTITY:
    return IDENTITY

  def init(params):
    cstate = {}
    for i, m in enumerate(methods):
      params, cstate[str(i)] = m.init(params)
    return params, cstate

  def apply(trainable, cstate):
    for i, m in enumerate(methods):
      trainable = m.apply(trainable, cstate[str(i)])
    return trainable

  def update(trainable, cstate, step):
    cstate = dict(cstate)
    for i, m in enumerate(methods):
      trainable, cstate[str(i)] = m.update(trainable, cstate[str(i)], None if i < held else step)
    return trainable, cstate

  def optimizer(trainable, base):
    for m in methods:
      base = m.optimizer(trainable, base)
    return base

  def bits(trainable, cstate):
    out: dict[str, float] = {}
    for i, m in enumerate(methods):
      out.update(m.bits(trainable, cstate[str(i)]))
    return out

  return Method("+".join(m.name for m in methods), init, apply, update, optimizer, bits)


def with_defaults(plan: list[dict]) -> list[dict]:
  """``plan`` with every option its steps leave out at the method's default, so a
  plan saved before an option existed equals the same plan written now.

  >>> import jcompress.transforms.tucker  # registers "tucker"
  >>> with_defaults([{"method": "tucker", "options": {}, "paths": []}])[0]["options"]["rank_multiple"]
  1
  """
  out = []
  for step in plan:
    spec = METHODS.get(step["method"])
    defaults = {o.name.replace("-", "_"): o.default for o in spec.options} if spec else {}
    out.append(step | {"options": defaults | step["options"]})
  return out


def plan_methods(plan: list[dict]) -> list[Method]:
  """The methods of a saved plan ``[{"method", "options", "paths"}, ...]``, in order."""
  return [build(p["method"], p["paths"], **p["options"]) for p in plan]


def from_plan(plan: list[dict], held: int = 0) -> Method:
  """The stacked method of a saved plan (``held``: see :func:`stack`)."""
  return stack(plan_methods(plan), held)
