"""Orbax checkpoints of a run's workdir.

Each checkpoint (one per saved epoch, in ``WORKDIR/checkpoints/<epoch>``) holds
three items: ``model`` (params, batch_stats, cstate: all that inference needs),
``train`` (step, opt_state, rng: what resuming needs too) and ``meta`` (JSON: the
model name and configuration, dataset, training options), so ``eval`` rebuilds the
model from the workdir alone. Orbax writes each checkpoint to a temporary folder
and renames it when complete, so a run killed mid-save leaves the previous ones
intact. Kept: the last ``keep`` checkpoints and the best by test accuracy.

Arrays are saved from wherever they live (replicated or sharded over a mesh, on
one or several processes: orbax writes each shard once and coordinates the
processes) and restored into the shardings of the target state, so a checkpoint
written on N devices restores on M. With several processes, every process calls
every method.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from jcompress.train.state import TrainState

def _paths(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
          tuple(leaf.shape) for path, leaf in flat}


def mismatches(expected, found) -> list[str]:
  """Differences between two trees of arrays as readable lines, by "/"-joined path."""
  want, have = _paths(expected), _paths(found)
  lines = [f"missing in checkpoint: {p} {want[p]}" for p in sorted(want.keys() - have.keys())]
  lines += [f"unexpected in checkpoint: {p} {have[p]}" for p in sorted(have.keys() - want.keys())]
  lines += [f"shape mismatch at {p}: model {want[p]} vs checkpoint {have[p]}"
            for p in sorted(want.keys() & have.keys()) if want[p] != have[p]]
  return lines


class Checkpoints:
  """The checkpoints of one workdir.

  Args:
    workdir: the run's directory (checkpoints go to ``workdir/checkpoints``).
    keep: how many of the latest checkpoints to keep (the best is kept too).
  """

  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 2):
    if keep < 1:
      raise ValueError(f"--keep must be at least 1, got {keep}")
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    policy = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False, create=True,
        preservation_policy=policy.AnyPreservationPolicy([
            policy.LatestN(n=keep),
            policy.BestN(get_metric_fn=lambda m: m["test_accuracy"], n=1)]))
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        "model": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler()})

  def steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def resolve(self, which: str | int = "latest") -> int:
    """The epoch of checkpoint ``which``: ``latest``, ``best`` or an epoch number."""
    steps = self.steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if which == "latest":
      return self._manager.latest_step()
    if which == "best":
      return max(steps, key=lambda s: (self.meta(s)["record"]["test_accuracy"], -s))
    if str(which).isdigit() and int(which) in steps:
      return int(which)
    raise ValueError(f"--checkpoint {which} not found; valid: latest, best, "
                     f"{', '.join(map(str, steps))}")

  def save(self, epoch: int, state: TrainState, meta: dict, metrics: dict) -> None:
    model = {"params": state.params, "batch_stats": state.batch_stats, "cstate": state.cstate}
    train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    self._manager.save(epoch, metrics=metrics, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model), train=ocp.args.StandardSave(train),
        meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def meta(self, epoch: int) -> dict:
    return self._manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def check_fits(self, epoch: int, variables: dict, what: str) -> None:
    """Raises ValueError naming each parameter path where the checkpoint and the
    model ``what`` disagree."""
    stored = self._manager.item_metadata(epoch)["model"].tree
    problems = mismatches({k: variables[k] for k in ("params", "batch_stats")},
                          {k: stored.get(k, {}) for k in ("params", "batch_stats")})
    if problems:
      raise ValueError(f"checkpoint {self.directory / str(epoch)} does not fit {what}:\n  "
                       + "\n  ".join(problems))

  def stored_shapes(self, epoch: int) -> dict:
    """The ``model`` item of checkpoint ``epoch`` (params, batch_stats, cstate) as a
    tree of ``jax.ShapeDtypeStruct``."""
    stored = self._manager.item_metadata(epoch)["model"].tree
    return {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored.get(k, {}))
            for k in ("params", "batch_stats", "cstate")}

  def restore(self, epoch: int, state: TrainState, *, model_only: bool = False) -> TrainState:
    """Restores checkpoint ``epoch`` into the structure and shardings of ``state``.

    With ``model_only`` the optimizer state of ``state`` is kept as it is (for
    evaluation, or starting a new run from trained weights).
    """
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    items: dict[str, Any] = {"model": ocp.args.StandardRestore(abstract(
        {"params": state.params, "batch_stats": state.batch_stats, "cstate": state.cstate}))}
    if not model_only:
      items["train"] = ocp.args.StandardRestore(abstract(
          {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}))
    got = self._manager.restore(epoch, args=ocp.args.Composite(**items))
    state = state.replace(**got["model"])
    return state if model_only else state.replace(**got["train"])

  def close(self) -> None:
    self._manager.close()
