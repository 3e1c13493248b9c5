"""The train state and pure, jittable train and eval steps.

``train_step(state, batch) -> (state, metrics)`` is pure; callers jit it where it
is called (``jax.jit(functools.partial(train_step, model=..., tx=...))``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: saved whole in every checkpoint.

  Attributes:
    step: optimizer steps taken.
    params: the model's trainable parameters.
    batch_stats: batch-norm running statistics ({} for models without BN).
    opt_state: the optimizer's state.
    rng: base PRNG key; step ``t`` uses ``fold_in(rng, t)`` so resuming replays it.
    cstate: compression state (masks, scales, thresholds; {} when uncompressed).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  cstate: Any


def init_state(model: nn.Module, tx: optax.GradientTransformation,
               input_shape: tuple[int, ...], seed: int) -> TrainState:
  """Initialises the model's variables and the optimizer for inputs ``input_shape``."""
  rng = jax.random.PRNGKey(seed)
  init_rng, state_rng = jax.random.split(rng)
  variables = model.init({"params": init_rng, "dropout": init_rng},
                         jnp.zeros((1, *input_shape), jnp.float32), train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params), rng=state_rng, cstate={})


def _variables(params, batch_stats):
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
  """Per-example softmax cross-entropy with optional label smoothing."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def train_step(state: TrainState, batch: dict, *, model: nn.Module,
               tx: optax.GradientTransformation, label_smoothing: float = 0.0
               ) -> tuple[TrainState, dict]:
  """One optimizer step on ``batch`` = {"image", "label"}.

  Returns the new state and metrics ``loss`` (batch mean), ``correct`` and ``count``.
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits, updates = model.apply(
        _variables(params, state.batch_stats), batch["image"], train=True,
        rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
    loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
    return loss, (logits, updates.get("batch_stats", {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"])
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, {"loss": loss, "correct": correct, "count": batch["label"].shape[0]}


def eval_step(params, batch_stats, batch: dict, *, model: nn.Module) -> dict:
  """Sums of loss and correct predictions over the rows where ``batch["mask"]`` is 1."""
  logits = model.apply(_variables(params, batch_stats), batch["image"], train=False)
  mask = batch["mask"]
  loss = cross_entropy(logits, batch["label"])
  correct = jnp.argmax(logits, -1) == batch["label"]
  return {"loss": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask),
          "count": jnp.sum(mask)}
