"""Optimizers, learning-rate schedules and weight decay from optax."""

from __future__ import annotations

from typing import Sequence

import jax
import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")


def make_schedule(name: str, lr: float, total_steps: int, *, warmup_steps: int = 0,
                  decay_steps: Sequence[int] = (), decay_factor: float = 0.1
                  ) -> optax.Schedule:
  """A learning-rate schedule over ``total_steps`` optimizer steps.

  Args:
    name: ``constant``, ``step`` (multiply by ``decay_factor`` at each of
      ``decay_steps``; default at 50% and 75% of training) or ``cosine`` (to 0).
    lr: peak learning rate.
    total_steps: steps of the whole run.
    warmup_steps: linear warm-up from 0 to ``lr`` prepended to any schedule.
    decay_steps: boundaries of the ``step`` schedule.
    decay_factor: multiplier of the ``step`` schedule at each boundary.
  """
  if name not in SCHEDULES:
    raise ValueError(f"unknown --schedule {name!r}; valid: {', '.join(SCHEDULES)}")
  if lr <= 0:
    raise ValueError(f"--lr must be positive, got {lr}")
  warmup_steps = min(warmup_steps, total_steps)
  rest = max(total_steps - warmup_steps, 1)
  if name == "constant":
    main = optax.constant_schedule(lr)
  elif name == "cosine":
    main = optax.cosine_decay_schedule(lr, rest)
  else:
    bounds = [s - warmup_steps for s in decay_steps] if decay_steps else [rest // 2, rest * 3 // 4]
    main = optax.piecewise_constant_schedule(lr, {int(b): decay_factor for b in bounds if b > 0})
  if not warmup_steps:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])


def _decay_mask(params):
  # Decay kernels only: biases and batch-norm scales/offsets are left alone.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(name: str, schedule: optax.Schedule, *, momentum: float = 0.9,
                   weight_decay: float = 0.0, nesterov: bool = False
                   ) -> optax.GradientTransformation:
  """``sgd`` (with momentum), ``adam`` (coupled L2) or ``adamw`` (decoupled)."""
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown --optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
  if weight_decay < 0:
    raise ValueError(f"--weight-decay must be >= 0, got {weight_decay}")
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=weight_decay, mask=_decay_mask)
  base = (optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov)
          if name == "sgd" else optax.adam(schedule))
  if not weight_decay:
    return base
  return optax.chain(optax.add_decayed_weights(weight_decay, _decay_mask), base)
