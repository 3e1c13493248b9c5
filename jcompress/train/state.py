"""``TrainState``: everything a run needs to continue, saved whole in every checkpoint."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: saved whole in every checkpoint.

  Attributes:
    step: optimizer steps taken.
    params: the model's trainable parameters (the compression method's trainable tree).
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
