"""Pure, jittable train and eval steps (the state is :class:`TrainState`).

``train_step(state, batch) -> (state, metrics)`` is pure; callers jit it where it
is called (``jax.jit(functools.partial(train_step, model=..., tx=...))``).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, ContextManager

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import optax

from jcompress.train.state import TrainState  # noqa: F401  (re-exported)
from jcompress.transforms import select
from jcompress.transforms.base import IDENTITY, LossInputs, Method
from jcompress.transforms.distill import capture


# (model, input_shape) -> the "/"-joined variable paths in creation order, recorded
# while ``_init`` is traced: jit returns dicts with sorted keys.
_CREATION_ORDER: dict[tuple, list[str]] = {}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init(model: nn.Module, input_shape: tuple[int, ...], rng: jax.Array) -> dict:
  variables = model.init({"params": rng, "dropout": rng},
                         jnp.zeros((1, *input_shape), jnp.float32), train=False)
  _CREATION_ORDER[(model, input_shape)] = list(select.flatten(variables))
  return variables


def init_variables(model: nn.Module, input_shape: tuple[int, ...], seed: int) -> dict:
  """The model's freshly initialised variables for inputs of ``input_shape``, with
  every dict in the model's creation order (what ``select(keep_ends=True)`` needs).

  Compiled as one XLA program (op-by-op initialisation compiles each op)."""
  input_shape = tuple(input_shape)
  variables = _init(model, input_shape, jax.random.split(jax.random.PRNGKey(seed))[0])
  order = dict.fromkeys(_CREATION_ORDER[(model, input_shape)], 0)
  return select.order_like(select.unflatten(order), variables)


# numpy versions of the primitives that build an initialiser's constants (jnp.zeros).
_CONSTANT_OPS = {
    "broadcast_in_dim": lambda x, *, shape, broadcast_dimensions, **_: np.broadcast_to(
        np.reshape(x, [x.shape[broadcast_dimensions.index(d)] if d in broadcast_dimensions
                       else 1 for d in range(len(shape))]), shape),
    "convert_element_type": lambda x, *, new_dtype, **_: np.asarray(x, new_dtype),
    "reshape": lambda x, *, new_sizes, **_: np.reshape(x, new_sizes),
}


def stand_in_state(model: nn.Module, input_shape: tuple[int, ...]) -> TrainState:
  """A stand-in for a fresh :func:`init_state` that counts the same costs (params,
  MACs, nonzeros, bytes), made without compiling anything: variables an
  initialiser sets to a constant (zero biases, unit batch-norm scales) hold it, the
  random ones (kernels) hold ones; read-only numpy arrays, no optimizer state.

  The initialisation is traced to a jaxpr, not run: compiling its random number
  generation takes most of a minute for the larger models on a CPU.
  """
  input_shape = tuple(input_shape)
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  closed, shapes = jax.make_jaxpr(functools.partial(_init.__wrapped__, model, input_shape),
                                  return_shape=True)(key)
  known = {v: np.asarray(c) for v, c in zip(closed.jaxpr.constvars, closed.consts)}
  value = lambda a: a.val if isinstance(a, jex.Literal) else known.get(a)  # noqa: E731
  for eqn in closed.jaxpr.eqns:
    args = [value(a) for a in eqn.invars]
    op = _CONSTANT_OPS.get(eqn.primitive.name)
    if op is not None and all(a is not None for a in args):
      known[eqn.outvars[0]] = op(*map(np.asarray, args), **eqn.params)
  leaves, treedef = jax.tree.flatten(shapes)
  leaves = [np.broadcast_to(np.asarray(value(v), s.dtype) if value(v) is not None
                            else np.ones((), s.dtype), s.shape)
            for v, s in zip(closed.jaxpr.outvars, leaves)]
  order = dict.fromkeys(_CREATION_ORDER[(model, input_shape)], 0)
  variables = select.order_like(select.unflatten(order), jax.tree.unflatten(treedef, leaves))
  return TrainState(step=np.zeros((), np.int32), params=variables["params"],
                    batch_stats=variables.get("batch_stats", {}), opt_state=(), rng=None,
                    cstate={})


def init_state(model: nn.Module, tx: optax.GradientTransformation,
               input_shape: tuple[int, ...], seed: int, method: Method = IDENTITY
               ) -> TrainState:
  """Initialises the model's variables, the compression ``method`` and the optimizer.

  ``tx`` is the base optimizer; the state's optimizer is ``method.optimizer`` of it.
  """
  variables = init_variables(model, input_shape, seed)
  trainable, cstate = method.init(variables["params"])
  return TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=method.optimizer(trainable, tx).init(trainable),
                    rng=jax.random.split(jax.random.PRNGKey(seed))[1], cstate=cstate)


def _variables(params, batch_stats):
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def _forward(method: Method, trainable, cstate) -> ContextManager[None]:
  """The context ``method.forward`` gives the forward pass (none: a null context)."""
  return (method.forward(trainable, cstate) if method.forward is not None
          else contextlib.nullcontext())


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
  """Per-example softmax cross-entropy with optional label smoothing."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


DTYPES = ("float32", "bfloat16")  # --dtype: the forward/backward compute dtype


def _cast(tree: Any, dtype) -> Any:
  """The floating leaves of ``tree`` as ``dtype`` (integer leaves untouched)."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                      else x, tree)


def train_step(state: TrainState, batch: dict, extra: Any = None, *,
               model: nn.Module, tx: optax.GradientTransformation,
               label_smoothing: float = 0.0, method: Method = IDENTITY,
               dtype: str = "float32") -> tuple[TrainState, dict]:
  """One optimizer step on ``batch`` = {"image", "label"}.

  The model runs with ``method.apply(state.params, state.cstate)`` (inside
  ``method.forward``'s context where it has one); ``tx`` must be
  the method's optimizer (``method.optimizer(params, base)``); ``method.update``
  follows the optimizer update. The loss is the cross-entropy, passed through
  ``method.loss`` if the method has one (distillation, a regularizer), with
  ``extra`` (what ``method.extra`` loaded: a teacher) and the outputs of the
  modules ``method.captures`` names.

  Mixed precision (``dtype="bfloat16"``): params, optimizer state, batch-norm
  statistics and compression state stay float32; ``method.apply``'s output (after
  its straight-through functions, whose cotangents thus arrive in float32) and the
  images are cast to ``dtype`` for the forward and backward pass; the logits are
  cast back, so the loss and softmax cross-entropy are float32, and so are the
  gradients (a cast's cotangent takes the input's dtype).
  Returns the new state and metrics ``loss`` (batch mean), ``correct`` and ``count``.
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  layers = method.captures
  compute = jnp.dtype(dtype)

  def loss_fn(params):
    applied, image = method.apply(params, state.cstate), batch["image"]
    if compute != jnp.float32:
      applied, image = _cast(applied, compute), image.astype(compute)
    with _forward(method, params, state.cstate):
      logits, updates = model.apply(
          _variables(applied, state.batch_stats), image,
          train=True, rngs={"dropout": dropout_rng},
          mutable=["batch_stats", "intermediates"] if layers else ["batch_stats"],
          capture_intermediates=capture(layers) if layers else False)
    if compute != jnp.float32:  # float32 losses; statistics kept in their dtype
      logits = logits.astype(jnp.float32)
      updates = {**updates, "intermediates": _cast(updates.get("intermediates", {}),
                                                   jnp.float32)}
      if state.batch_stats:
        updates["batch_stats"] = jax.tree.map(lambda new, old: new.astype(old.dtype),
                                              updates["batch_stats"], state.batch_stats)
    loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
    if method.loss is not None:
      loss = method.loss(LossInputs(params, state.cstate, logits, batch["label"], batch["image"],
                                    updates.get("intermediates", {}), loss, label_smoothing),
                         extra)
    return loss, (logits, updates.get("batch_stats", {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params, cstate = method.update(optax.apply_updates(state.params, updates), state.cstate,
                                 state.step + 1)
  correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"])
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, cstate=cstate)
  return new_state, {"loss": loss, "correct": correct, "count": batch["label"].shape[0]}


def eval_step(params, batch_stats, cstate, batch: dict, *, model: nn.Module,
              method: Method = IDENTITY,
              execution: Callable[[Any, Any], ContextManager[None]] | None = None) -> dict:
  """Sums of loss and correct predictions over the rows where ``batch["mask"]`` is 1.

  ``execution`` (static; ``jcompress.execution.get(name, plan methods)``) gives the
  context the forward pass runs in, e.g. Tucker layers as their factor sequence;
  None runs the model as it is on ``method.apply``'s params.
  """
  with (execution(params, cstate) if execution is not None else contextlib.nullcontext(),
        _forward(method, params, cstate)):
    logits = model.apply(_variables(method.apply(params, cstate), batch_stats), batch["image"],
                         train=False)
  mask = batch["mask"]
  loss = cross_entropy(logits, batch["label"])
  correct = jnp.argmax(logits, -1) == batch["label"]
  return {"loss": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask),
          "count": jnp.sum(mask)}
