"""A workdir holds one run: the check that a rerun is that run (or ``--overwrite``),
resumption from its latest complete checkpoint (broken ones set aside), and the
guards that keep a non-finite or diverging state out of its checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
from typing import TYPE_CHECKING, Any

import jax

from jcompress import atomic, data, models, parallel
from jcompress.checkpoint import ITEMS, BrokenCheckpointError, Checkpoints, first_nonfinite
from jcompress.train.state import TrainState
from jcompress.transforms import registry

if TYPE_CHECKING:
  from jcompress.train.loop import TrainConfig


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN, infinite or diverged; the last good checkpoint is kept."""


def read_metrics(path: pathlib.Path) -> list[dict]:
  """The records of ``metrics.jsonl``, one per epoch."""
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def warn(message: str) -> None:
  if parallel.is_main_process():
    print(f"warning: {message}", file=sys.stderr)


# Options a resumed run may change: they do not change its trajectory.
RESUMABLE_CHANGES = ("epochs", "keep", "save_every", "eval_batch_size", "data_dir",
                     "tensorboard", "log_every")
_FLAGS = {"model_config": "--width/--model-arg", "init_from": "--init-from/--from"}


def _normal(key: str, value: Any, config: TrainConfig) -> Any:
  """``value`` of option ``key`` as saved in JSON, with equivalent spellings made equal."""
  if key == "augment" and value is None:
    return data.spec(config.dataset).augment
  if key == "init_from" and isinstance(value, str):
    return os.path.realpath(value)
  if key == "compression":
    return registry.with_defaults(value)
  return json.loads(json.dumps(value))


def _shown(value: Any) -> str:
  text = json.dumps(value) if not isinstance(value, str) else value
  return text if len(text) <= 80 else text[:77] + "..."


def differences(meta: dict, config: TrainConfig) -> list[str]:
  """The options of ``config`` that differ from those checkpoint ``meta`` was trained
  with, as ``--lr: saved 0.05, now 0.1``; ``RESUMABLE_CHANGES`` are not counted. A
  checkpoint written before its training options were saved is compared by its
  compression plan only. Options ``config`` leaves to the model's recipe are
  compared at their resolved values (``TrainConfig.resolved``)."""
  config = config.resolved()
  out = []
  if _normal("compression", meta["compression"], config) != _normal(
      "compression", config.compression, config):
    out.append(f"the compression plan: saved {_shown(meta['compression'])}, now "
               f"{_shown(config.compression)}")
  saved = meta.get("train_config")
  if not isinstance(saved, dict):
    return out
  now = {**dataclasses.asdict(config),
         "model_config": models.resolve_config(config.model, **config.model_config)}
  for key, value in now.items():
    if (key in RESUMABLE_CHANGES or key in ("model", "dataset", "compression", "overwrite")
        or key not in saved):
      continue
    if _normal(key, saved[key], config) != _normal(key, value, config):
      flag = _FLAGS.get(key, f"--{key.replace('_', '-')}")
      out.append(f"{flag}: saved {_shown(saved[key])}, now {_shown(value)}")
  return out


def _check_same_run(ckpts: Checkpoints, epoch: int, meta: dict, config: TrainConfig,
                    variables: dict | None = None) -> None:
  """Raises ValueError unless checkpoint ``epoch`` (its ``meta``) was written by the
  run ``config`` describes: the same model and dataset (with ``variables``, the
  mismatched parameter paths are named), the same trajectory options, and no more
  epochs than ``config.epochs``."""
  workdir = ckpts.directory.parent
  what = f"--model {config.model} on --dataset {config.dataset}"
  if (meta["model"], meta["dataset"]) != (config.model, config.dataset):
    if variables is None:
      return  # resume names the mismatched parameter paths
    ckpts.check_fits(epoch, variables, what)
    raise ValueError(f"{ckpts.directory} holds a run of --model {meta['model']} on --dataset "
                     f"{meta['dataset']}, not {what}; use another --workdir")
  if variables is not None:
    ckpts.check_fits(epoch, variables, what)
  fresh = "start afresh in another --workdir or with --overwrite"
  diffs = differences(meta, config)
  if diffs:
    raise ValueError(
        f"--workdir {workdir} holds a run with other settings ({'; '.join(diffs)}): a "
        f"workdir belongs to one run. Resume it with its saved settings (only "
        f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE_CHANGES)} may change), "
        f"or {fresh}")
  if epoch > config.epochs:
    raise ValueError(
        f"--workdir {workdir} holds checkpoint {ckpts.path(epoch)} of epoch {epoch}, beyond "
        f"--epochs {config.epochs}: it is another run's, or a longer one; give --epochs "
        f"{epoch} or more to continue it, or {fresh}")


def check_saved_run(workdir: pathlib.Path, config: TrainConfig) -> None:
  """``_check_same_run`` on ``workdir``'s latest complete checkpoint, if any: refuses
  another run's workdir before the data is loaded."""
  if not (workdir / "checkpoints").is_dir():
    return
  ckpts = Checkpoints(workdir, read_only=True)
  try:
    for epoch in ckpts.newest_first():
      if ckpts.problem(epoch, ITEMS) is None:
        _check_same_run(ckpts, epoch, ckpts.meta(epoch), config)
        return
  finally:
    ckpts.close()


def clear_run(workdir: pathlib.Path, log) -> None:
  """``--overwrite``: removes the earlier run's checkpoints and records from ``workdir``
  (nothing else in it)."""
  removed = []
  for name in ("checkpoints", BROKEN, "tensorboard"):
    path = workdir / name
    if path.is_symlink():
      path.unlink()
    elif path.is_dir():
      shutil.rmtree(path)
    else:
      continue
    removed.append(f"{name}/")
  for name in ("metrics.jsonl", "config.json"):
    if (workdir / name).exists() or (workdir / name).is_symlink():
      (workdir / name).unlink()
      removed.append(name)
  if removed:
    log(f"--overwrite: removed the earlier run's {', '.join(removed)} from {workdir}")


def source_differences(config: TrainConfig, src_meta: dict) -> list[str]:
  """What keeps ``config`` from continuing the run of ``src_meta``, in words
  (``[]``: nothing): its model, dataset, model options, or a plan that does not
  start with the source's."""
  out = []
  if config.model != src_meta["model"]:
    out.append(f"it holds model {src_meta['model']}, this run trains {config.model}")
  if config.dataset != src_meta["dataset"]:
    out.append(f"it was trained on {src_meta['dataset']}, this run on {config.dataset}")
  if config.model == src_meta["model"]:
    mine, theirs = models.resolve_config(config.model, **config.model_config), \
        src_meta["model_config"]
    shown = lambda c, k: json.dumps(c[k]) if k in c else "the model's default"  # noqa: E731
    out += [f"its model option {k} is {shown(theirs, k)}, this run's {shown(mine, k)}"
            for k in sorted(mine.keys() | theirs.keys()) if mine.get(k) != theirs.get(k)]
  done = src_meta["compression"]
  if registry.with_defaults(config.compression[:len(done)]) != registry.with_defaults(done):
    names = lambda plan: " + ".join(step["method"] for step in plan)  # noqa: E731
    ours = config.compression[:len(done)]
    out.append(f"it was compressed with {names(done)}, " + (
        "this run starts uncompressed" if not ours else
        f"this run's plan starts with {names(ours)}" if names(ours) != names(done) else
        "this run's plan has other options or tensors for those steps"))
  return out


BROKEN = "broken-checkpoints"  # where train moves a workdir's broken checkpoints


def check_destination(source: str | os.PathLike, workdir: str | os.PathLike, *,
                      overwrite: bool = False, option: str = "--from") -> None:
  """Raises ValueError if writing ``workdir`` could write the run ``source``: the
  same folder (symlinks followed), a folder inside it, or ``source`` inside what
  a run in ``workdir`` writes or removes. ``option`` names ``source`` in the message."""
  src, dst = os.path.realpath(source), os.path.realpath(workdir)
  inside = lambda a, b: a == b or a.startswith(b.rstrip(os.sep) + os.sep)  # noqa: E731
  if inside(dst, src):
    where = f"{option} {source} itself" if dst == src else f"inside {option} {source}"
    raise ValueError(f"--workdir must differ from {option} and lie outside it ({workdir} is "
                     f"{where}): the source run is never written")
  owned = ["checkpoints", BROKEN] + (["metrics.jsonl", "config.json"] if overwrite else [])
  if any(inside(src, os.path.join(dst, name)) for name in owned):
    raise ValueError(f"{option} {source} lies inside what --workdir {workdir} writes: the "
                     "source run is never written")


def resume(ckpts: Checkpoints, state: TrainState, config: TrainConfig,
            metrics_path: pathlib.Path) -> tuple[TrainState, int]:
  """Restores the latest complete checkpoint, if any; returns the state and epochs done.

  Broken checkpoints newer than it (a folder missing, unreadable data) are moved to
  ``WORKDIR/broken-checkpoints`` with a warning, so the epochs they held are trained
  and saved again."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  broken: list[tuple[int, str]] = []
  for epoch in ckpts.newest_first():
    problem = ckpts.problem(epoch, ITEMS)
    if problem is None:
      _check_same_run(ckpts, epoch, ckpts.meta(epoch), config, variables)
      try:
        restored = ckpts.restore(epoch, state)
        break
      except BrokenCheckpointError as e:
        problem = e.reason
    broken.append((epoch, problem))
  else:
    if broken:
      raise BrokenCheckpointError(ckpts.directory, "no complete checkpoint to resume from ("
                                  + "; ".join(f"epoch {e}: {p}" for e, p in broken)
                                  + "); move them away, or start afresh in another "
                                  "--workdir or with --overwrite")
    return state, 0
  meta = ckpts.meta(epoch)
  if broken:
    if parallel.is_main_process():
      for e, problem in broken:
        dest = ckpts.set_aside(e, ckpts.directory.parent / BROKEN)
        warn(f"checkpoint {ckpts.path(e)} is broken ({problem}): moved it to {dest}; "
              f"resuming from epoch {epoch}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("jcompress: broken checkpoints set aside")
    ckpts.reload()
  state = restored
  if not parallel.is_main_process():
    return state, epoch
  # Lines of epochs after the checkpoint belong to work that was lost; the
  # checkpoint's own record is restored if the run died before writing it.
  records = [r for r in read_metrics(metrics_path) if r["epoch"] < epoch]
  records.append(meta["record"])
  atomic.write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in records))
  print(f"resuming from {ckpts.directory / str(epoch)} (epoch {epoch} of {config.epochs})")
  return state, epoch


def _kept(ckpts: Checkpoints) -> str:
  kept = ckpts.steps()
  return (f"the last good checkpoint (epoch {max(kept)}) is kept in {ckpts.directory}"
          if kept else "no checkpoint had been saved yet")


def divergence_limit(num_classes: int) -> float:
  """The mean training loss above which a run has diverged: 1000 times the loss of
  a uniform guess, ``log(num_classes)``. No model that learns comes near it, while a
  learning rate far too high (adam at ``--lr 30``) can keep the loss finite but huge."""
  return 1000 * math.log(max(num_classes, 2))


def check_finite(loss: float, epoch: int, step: int, ckpts: Checkpoints,
                 limit: float = math.inf) -> None:
  """Raises NonFiniteLossError if the mean training ``loss`` is not finite or
  exceeds ``limit`` (see ``divergence_limit``)."""
  if not math.isfinite(loss):
    raise NonFiniteLossError(
        f"training loss became {loss} in epoch {epoch + 1} by step {step + 1}; "
        f"stopped: {_kept(ckpts)}. Try a lower --lr.")
  if loss > limit:
    raise NonFiniteLossError(
        f"training diverged: mean loss {loss:.4g} in epoch {epoch + 1} by step {step + 1} "
        f"exceeds {limit:.4g} (1000 x log(classes)); stopped: {_kept(ckpts)}. "
        "Try a lower --lr.")


def check_finite_state(state: TrainState, test_loss: float, epoch: int,
                        ckpts: Checkpoints) -> None:
  """Raises NonFiniteLossError unless ``state`` (params, batch_stats, cstate) and
  its ``test_loss`` are finite: only such a state is saved as a checkpoint.
  ``epoch`` -1: one-shot compression."""
  bad = first_nonfinite({"params": state.params, "batch_stats": state.batch_stats,
                         "cstate": state.cstate})
  if bad is None and math.isfinite(test_loss):
    return
  what = (f"parameter {bad} became non-finite (NaN or infinity)" if bad
          else f"test loss became {test_loss}")
  if epoch < 0:
    raise NonFiniteLossError(f"{what} after one-shot compression; nothing saved")
  raise NonFiniteLossError(f"{what} in epoch {epoch + 1}; stopped: {_kept(ckpts)}. "
                           "Try a lower --lr.")
