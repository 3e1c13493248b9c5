"""The compression-method protocol: a method is pure functions over parameter pytrees.

A method turns a trained model's params into what compressed training and
evaluation need (no Flax modules, no I/O):

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
  for a step held from the run a model was compressed from: its schedule is over.
* ``optimizer(trainable, base) -> GradientTransformation``: wraps the base
  optimizer (``optax.partition`` groups for scales and latent weights, gradient
  masks). Default: ``base``.

Optional fields declare the rest of what a method is, each with a default that
makes a minimal method work in every command:

* ``bits(trainable, cstate) -> {path: bits per weight}`` for cost accounting;
  default (None): what ``encode`` writes, else 32.
* ``encode(trainable, cstate, zeros) -> {path: (bytes, meta)}``: the packed form
  of its tensors for ``jcompress export`` (``zeros``: ``{path: keep mask}`` of
  earlier methods, so a codec may store only kept entries); its registered
  ``decode`` reads them back. Default (None): the tensors are stored as float32.
* ``masks(trainable, cstate) -> {path: bool array}``: entries the method holds at
  zero (False). :func:`stack` keeps them zero in every later method's output,
  unless that method declares ``revives=True`` (its output is dense by design,
  e.g. a Tucker factorization), which ``compress`` warns about.
* ``loss(inputs, extra) -> scalar``: a training objective replacing
  ``inputs.loss`` (the cross-entropy, or the previous method's loss):
  distillation, a regularizer. ``extra`` is what ``extra(context)`` loaded on the
  host (a teacher's variables), passed to the jitted step as an argument;
  ``captures`` names the module outputs ``inputs.intermediates`` must hold.
* ``costs(summary, trainable, cstate) -> summary``: what the layers really run
  (Tucker's factor sequence) for ``summary`` and ``eval``.
* ``forward(trainable, cstate) -> context manager``: the model's forward pass in
  training and evaluation runs inside it (Flax ``nn.intercept_methods``: fake-
  quantized activations, :mod:`jcompress.transforms.act_quant`).

Methods are registered by name (:mod:`jcompress.transforms.registry`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Any, Callable, ContextManager, NamedTuple, Sequence

import jax.numpy as jnp
import optax

from jcompress.transforms import select as sel


class LossInputs(NamedTuple):
  """What a method's ``loss`` sees in the train step (all traced arrays)."""
  trainable: Any        # the whole trainable tree (every method's leaves)
  cstate: Any           # this method's compression state
  logits: Any
  labels: Any
  images: Any
  intermediates: Any    # captured module outputs ({} unless ``captures``)
  loss: Any             # the batch-mean loss so far (cross-entropy first)
  label_smoothing: float = 0.0


@dataclasses.dataclass(frozen=True)
class Context:
  """What the training layer lends a method's ``prepare`` and ``extra`` hooks.

  Attributes:
    mesh: the device mesh the run uses (None: the default one).
    load_model: ``source -> (flax module, variables, meta)`` of a trained run
      (a workdir), e.g. a distillation teacher.
    images: ``n -> float32 [n, H, W, C]``: the first ``n`` training images of the
      run's dataset, normalised as training sees them (calibration).
  """
  mesh: Any = None
  load_model: Callable[[str], tuple[Any, dict, dict]] | None = None
  images: Callable[[int], Any] | None = None


def _identity_update(trainable, cstate, step):
  return trainable, cstate


def _base_optimizer(trainable, base):
  return base


class Method(NamedTuple):
  """A compression method bound to its selected paths and options (see module doc)."""
  name: str
  init: Callable[[Any], tuple[Any, Any]]
  apply: Callable[[Any, Any], Any]
  update: Callable[[Any, Any, Any], tuple[Any, Any]] = _identity_update
  optimizer: Callable[[Any, optax.GradientTransformation],
                      optax.GradientTransformation] = _base_optimizer
  bits: Callable[[Any, Any], dict[str, float]] | None = None
  encode: Callable[[Any, Any, dict], dict[str, tuple[bytes, dict]]] | None = None
  masks: Callable[[Any, Any], dict[str, Any]] | None = None
  revives: bool = False
  loss: Callable[[LossInputs, Any], Any] | None = None
  extra: Callable[[Context], Any] | None = None
  captures: tuple[str, ...] = ()
  costs: Callable[[Any, Any, Any], Any] | None = None
  paths: tuple[str, ...] | None = None  # the selected tensors (None: unknown)
  forward: Callable[[Any, Any], ContextManager[None]] | None = None


def optional_float(text: Any) -> float | None:
  """An option value that may be ``none`` (or ``base``): None, else a float.

  >>> optional_float("none"), optional_float("1e-4")
  (None, 0.0001)
  """
  return None if str(text).lower() in ("none", "base") else float(text)


_RANGE = re.compile(r"^([\[(])\s*([^,\s]*)\s*,\s*([^\])\s]*)\s*([\])])$")


@dataclasses.dataclass(frozen=True)
class Option:
  """A method option: ``--<name>`` on the command line, ``<name_>`` as keyword.

  ``build`` checks every value against the declaration, from the CLI or from
  Python: ``type`` (``int``, ``float``, ``str``, ``bool``, ``dict``, or a parser
  ``str -> value`` applied to strings), ``choices``, and ``range``, an interval
  such as ``"(0, 1]"`` or ``"[1, inf)"`` (open ends with ``(``/``)``).
  """
  name: str
  type: Callable[[str], Any]
  default: Any
  help: str
  choices: tuple | None = None
  hidden: bool = False  # filled in by the method's ``prepare``, not a command-line flag
  range: str | None = None

  @property
  def key(self) -> str:
    """The factory's keyword: ``scale-init`` -> ``scale_init``."""
    return self.name.replace("-", "_")

  def check(self, value: Any, where: str) -> Any:
    """``value`` converted and validated; raises ValueError naming ``where``."""
    if value is None and (self.default is None or self.hidden):
      return value
    if self.type in (int, float, str, bool, dict):
      wanted = (int, float) if self.type is float else self.type
      if isinstance(value, bool) and self.type is not bool or not isinstance(value, wanted):
        if isinstance(value, str):
          value = _parse(self, value, where)
        else:
          raise ValueError(f"{where} must be {self.type.__name__}, got {value!r}")
      if self.type is float:
        value = float(value)
        if math.isnan(value):
          raise ValueError(f"{where} must be a number, got nan")
    elif isinstance(value, str):
      value = _parse(self, value, where)
    if self.choices is not None and value not in self.choices:
      raise ValueError(f"{where} must be one of {', '.join(map(str, self.choices))}, "
                       f"got {value!r}")
    if self.range is not None and value is not None and not _within(self.range, value):
      raise ValueError(f"{where} must be in {self.range}, got {value!r}")
    return value


def _parse(option: Option, text: str, where: str) -> Any:
  if option.type is bool:
    if text.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
      return text.lower() in ("true", "1", "yes", "on")
    raise ValueError(f"{where} must be true or false, got {text!r}")
  if option.type is dict:
    raise ValueError(f"{where} cannot be given as text")
  try:
    return option.type(text)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{where}: {text!r} is not a valid value ({e})") from None


def _within(interval: str, value: Any) -> bool:
  left, low, high, right = _RANGE.match(interval).groups()
  low = -math.inf if low in ("", "-inf") else float(low)
  high = math.inf if high in ("", "inf") else float(high)
  if not isinstance(value, (int, float)) or math.isnan(value):
    return False
  return ((low <= value if left == "[" else low < value)
          and (value <= high if right == "]" else value < high))


def check_declaration(method: str, option: Option) -> None:
  """Raises ValueError for an option that cannot work (bad name, default, range)."""
  where = f"method {method!r}, option {option.name!r}"
  if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", option.name):
    raise ValueError(f"{where}: names are lower-case words joined by '-'")
  if not callable(option.type):
    raise ValueError(f"{where}: type {option.type!r} is not callable")
  if option.choices is not None and not option.choices:
    raise ValueError(f"{where}: empty choices")
  if option.range is not None:
    match = _RANGE.match(option.range)
    try:
      ok = match is not None and all(v in ("", "inf", "-inf") or float(v) is not None
                                     for v in match.groups()[1:3])
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f"{where}: range {option.range!r} is not an interval like '(0, 1]'")
  if option.default is not None:
    option.check(option.default, f"{where}: default")


@dataclasses.dataclass(frozen=True)
class ExecutionMode:
  """One way a method's compressed layers run at inference (``--execution NAME``).

  ``run(methods, index, data, cstate) -> context manager``: the forward pass runs
  inside it; ``methods`` is the plan, ``index`` this method's place in it,
  ``cstate`` the stacked state (``{"0": ..., "1": ...}``) and ``data`` the
  trainable tree or, with ``prepare(methods, index, trainable, cstate)``, what
  it computed on the host from the concrete state (e.g. sparse matrices).
  ``skips_zeros``: the mode multiplies only nonzero weights, so ``bench`` counts
  their FLOPs (``2 * nonzero MACs - outputs`` per layer), not the dense ones.
  """
  run: Callable[[Sequence[Method], int, Any, Any], ContextManager[None]]
  help: str
  prepare: Callable[[Sequence[Method], int, Any, Any], Any] | None = None
  skips_zeros: bool = False  # it multiplies only nonzero weights: FLOPs count those


IDENTITY = Method("none", init=lambda params: (params, {}), apply=lambda t, c: t)


def bits_of(method: Method, trainable: Any, cstate: Any, zeros: dict | None = None
            ) -> dict[str, float]:
  """``method.bits``, or the bits per weight its ``encode`` writes, or ``{}`` (32)."""
  if method.bits is not None:
    return method.bits(trainable, cstate)
  if method.encode is None:
    return {}
  out = {}
  for path, (payload, meta) in method.encode(trainable, cstate, zeros or {}).items():
    size = math.prod(meta.get("shape", ())) if "shape" in meta else None
    if size:
      out[path] = 8 * len(payload) / size
  return out


def _hold(tree: Any, masks: dict[str, Any], paths: tuple[str, ...] | None) -> Any:
  """``tree`` with the False entries of ``masks`` set to zero (at ``paths`` only)."""
  if not masks:
    return tree
  flat = sel.flatten(tree)
  held = {p: m for p, m in masks.items() if p in flat and (paths is None or p in paths)}
  if not held:
    return tree
  flat.update({p: jnp.where(m, flat[p], jnp.zeros((), flat[p].dtype)) for p, m in held.items()})
  return sel.unflatten(flat)


def _and(masks: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
  out = dict(masks)
  for path, m in new.items():
    out[path] = m if path not in out else out[path] & m
  return out


def stack(methods: list[Method], held: int = 0) -> Method:
  """Methods applied in order (e.g. prune, then ternarize) as one Method.

  ``cstate`` is ``{"0": cstate of the first, "1": ...}``. Each method's ``init``
  sees the trainable tree left by the previous ones; in the forward pass each
  ``apply`` passes on the leaves it does not own, so the first method's output
  feeds the second, and the zeros that earlier methods' ``masks`` hold stay zero
  in a later method's output unless it ``revives`` them. Updates run in order;
  optimizers nest (the last outermost); losses chain. The first ``held`` methods
  (the steps a source run already did) get ``update`` with ``step=None`` and
  add no loss: their schedules and objectives are over.

  >>> from jcompress.transforms import registry
  >>> m = stack([registry.build("prune", ["w"], sparsity="0.5"),
  ...            registry.build("binary", ["w"])])  # alpha * sign(w): sign(0) is +1
  >>> t, c = m.init({"w": jnp.array([1.0, -2.0, 3.0, -4.0])})
  >>> m.apply(t, c)["w"].tolist()  # the pruned weights stay zero
  [0.0, 0.0, 1.75, -1.75]
  """
  if not methods:
    return IDENTITY
  methods = list(methods)

  def zeros_before(trainable, cstate) -> list[dict[str, Any]]:
    """The keep masks in force when each method runs (and after the last)."""
    out, masks = [], {}
    for i, m in enumerate(methods):
      out.append(masks)
      if m.revives:
        masks = {p: v for p, v in masks.items() if m.paths is not None and p not in m.paths}
      if m.masks is not None:
        masks = _and(masks, m.masks(trainable, cstate[str(i)]))
    return out + [masks]

  def init(params):
    cstate = {}
    for i, m in enumerate(methods):
      params, cstate[str(i)] = m.init(params)
    return params, cstate

  def apply(trainable, cstate):
    zeros = zeros_before(trainable, cstate)
    for i, m in enumerate(methods):
      trainable = m.apply(trainable, cstate[str(i)])
      if not m.revives:
        trainable = _hold(trainable, zeros[i], m.paths)
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
    zeros = zeros_before(trainable, cstate)
    for i, m in enumerate(methods):
      out.update(bits_of(m, trainable, cstate[str(i)], zeros[i]))
      trainable = m.apply(trainable, cstate[str(i)])
    return out

  def masks(trainable, cstate):
    return zeros_before(trainable, cstate)[-1]

  def loss(inputs, extra):
    value = inputs.loss
    stacked = inputs.cstate
    for i, m in enumerate(methods):
      if m.loss is not None and i >= held:
        value = m.loss(inputs._replace(loss=value, cstate=stacked[str(i)]),
                       None if extra is None else extra[str(i)])
    return value

  def extra(context):
    return {str(i): m.extra(context) if m.extra is not None and i >= held else None
            for i, m in enumerate(methods)}

  def costs(summary, trainable, cstate):
    for i, m in enumerate(methods):
      if m.costs is not None:
        summary = m.costs(summary, trainable, cstate[str(i)])
    return summary

  @contextlib.contextmanager
  def forward(trainable, cstate):
    with contextlib.ExitStack() as stack_:
      for i, m in enumerate(methods):
        if m.forward is not None:
          stack_.enter_context(m.forward(trainable, cstate[str(i)]))
      yield

  any_loss = any(m.loss is not None for m in methods[held:])
  return Method(
      "+".join(m.name for m in methods), init, apply, update, optimizer, bits,
      masks=masks if any(m.masks for m in methods) else None,
      loss=loss if any_loss else None,
      extra=extra if any(m.extra for m in methods[held:]) else None,
      captures=tuple(dict.fromkeys(c for m in methods[held:] for c in m.captures)),
      costs=costs if any(m.costs for m in methods) else None,
      paths=None if any(m.paths is None for m in methods) else tuple(
          dict.fromkeys(p for m in methods for p in m.paths)),
      forward=forward if any(m.forward for m in methods) else None)
