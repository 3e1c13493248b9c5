"""Orbax checkpoints of a run's workdir.

Each checkpoint (one per saved epoch, in ``WORKDIR/checkpoints/<epoch>``) holds
three items: ``model`` (params, batch_stats, cstate: all that inference needs),
``train`` (step, opt_state, rng: what resuming needs too) and ``meta`` (JSON: the
model name and configuration, dataset, training options), so ``eval`` rebuilds the
model from the workdir alone. Orbax writes each checkpoint to a temporary folder
and renames it when complete, so a run killed mid-save leaves the previous ones
intact. Kept: the last ``keep`` checkpoints and the best by test accuracy, also
across restarts (the policy reads the accuracy of checkpoints an earlier process
wrote from their ``meta`` item).

The ``meta`` item also holds a SHA-256 checksum of every array of the ``model``
and ``train`` items, verified on restore: damaged data is an error that names the
checkpoint, never a silently different model. Checkpoints written before
checksums existed still load. A checkpoint whose folders are incomplete or whose
data cannot be read raises :class:`BrokenCheckpointError`, which callers may answer
by using an earlier one (see ``jcompress.train.loop``).

Arrays are saved from wherever they live (replicated or sharded over a mesh, on
one or several processes: orbax writes each shard once and coordinates the
processes) and restored into the shardings of the target state, so a checkpoint
written on N devices restores on M. With several processes, every process calls
every method.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import hashlib
import math
import pathlib
import shutil
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.train.state import TrainState

ITEMS = ("meta", "model", "train")  # the folders of one complete checkpoint


class CheckpointError(ValueError):
  """A checkpoint cannot be used (damaged data, non-finite values, a failed save);
  the message names it."""


class BrokenCheckpointError(CheckpointError):
  """A checkpoint is incomplete (a folder missing) or its data cannot be read: an
  earlier complete one may be used instead. ``reason`` says what is wrong."""

  def __init__(self, path: pathlib.Path | str, reason: str):
    super().__init__(f"checkpoint {path} is broken: {reason}")
    self.path, self.reason = path, reason


_META_KEYS = {"model", "model_config", "dataset", "input_shape", "compression", "record"}


def _key(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _paths(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_key(path): tuple(leaf.shape) for path, leaf in flat}


def _host(x) -> np.ndarray | None:
  """``x`` as a host array; None for an array sharded over other processes."""
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if not x.is_fully_addressable:
      if not x.is_fully_replicated:
        return None
      x = x.addressable_data(0)
  return np.asarray(x)


def checksums(tree) -> dict[str, str]:
  """SHA-256 of each array of ``tree`` (its dtype, shape and bytes), by "/"-joined path."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = _host(leaf)
    if a is None:
      continue
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    out[_key(path)] = h.hexdigest()
  return out


@jax.jit
def _all_finite(leaves: list) -> list:
  """Per array, whether it is all finite: one program, not two per shape (each one
  compiled, or read from the compilation cache, by every command that restores)."""
  return [jnp.all(jnp.isfinite(x)) for x in leaves]


def first_nonfinite(tree) -> str | None:
  """The "/"-joined path of the first array of ``tree`` (in path order) holding a
  NaN or an infinity; None when all are finite."""
  flat = [(_key(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if jnp.issubdtype(getattr(leaf, "dtype", np.float32), jnp.inexact)]
  if not flat:
    return None
  finite = jax.device_get(_all_finite([leaf for _, leaf in flat]))
  bad = sorted(path for (path, _), ok in zip(flat, finite) if not ok)
  return bad[0] if bad else None


def _innermost(e: BaseException) -> BaseException:
  seen = {id(e)}
  while True:
    inner = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if inner is None or id(inner) in seen:
      return e
    seen.add(id(inner))
    e = inner


def _reason(e: BaseException) -> str:
  """The first line of ``e``'s innermost cause: what actually went wrong."""
  e = _innermost(e)
  line = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return line if len(line) <= 300 else line[:297] + "..."


def mismatches(expected, found) -> list[str]:
  """Differences between two trees of arrays as readable lines, by "/"-joined path."""
  want, have = _paths(expected), _paths(found)
  lines = [f"missing in checkpoint: {p} {want[p]}" for p in sorted(want.keys() - have.keys())]
  lines += [f"unexpected in checkpoint: {p} {have[p]}" for p in sorted(have.keys() - want.keys())]
  lines += [f"shape mismatch at {p}: model {want[p]} vs checkpoint {have[p]}"
            for p in sorted(want.keys() & have.keys()) if want[p] != have[p]]
  return lines


def _orbax_noise(unraisable) -> bool:
  exc, obj = unraisable.exc_value, unraisable.object
  if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
    return True
  code = getattr(obj, "cr_code", None)
  return code is not None and "orbax" in code.co_filename


def _quiet_orbax_read_noise() -> None:
  """After a failed read, orbax's other pending reads report "Exception ignored in
  <coroutine ...>" (and "Event loop is closed") tracebacks on stderr whenever they are
  collected, in other threads too: the read error is already in our message, so
  from then on those reports (and no others) are dropped."""
  previous = sys.unraisablehook
  if getattr(previous, "_jcompress_quiet", False):
    return

  def hook(unraisable):
    if not _orbax_noise(unraisable):
      previous(unraisable)
  hook._jcompress_quiet = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook


def _orbax():
  """``orbax.checkpoint``, imported on first use: 0.2 s that a command reading no
  checkpoint (``summary --model``) does not spend."""
  import orbax.checkpoint  # pylint: disable=import-outside-toplevel
  return orbax.checkpoint


def _accuracy(value) -> float:
  try:
    value = float(value)
  except (TypeError, ValueError):
    return -math.inf
  return value if math.isfinite(value) else -math.inf


@dataclasses.dataclass
class _LatestAndBest:
  """Orbax preservation policy: the latest ``keep`` checkpoints and the best by test
  accuracy (the earliest of equals, as ``Checkpoints.resolve("best")``).

  Orbax keeps the metrics of the checkpoints this process saved in memory only, so
  the accuracy of those an earlier process wrote (``metrics`` None) comes from their
  ``meta`` item through ``stored_accuracy``; orbax's own ``BestN`` kept them all."""
  keep: int
  stored_accuracy: Callable[[int], float]

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any = None) -> list[bool]:
    n = len(checkpoints)
    if n == 0:
      return []
    scores = [_accuracy(info.metrics["test_accuracy"]) if isinstance(info.metrics, dict)
              and "test_accuracy" in info.metrics else self.stored_accuracy(info.step)
              for info in checkpoints]
    best = max(range(n), key=lambda i: (scores[i], -checkpoints[i].step))
    return [i >= n - self.keep or i == best for i in range(n)]


class Checkpoints:
  """The checkpoints of one workdir.

  Args:
    workdir: the run's directory (checkpoints go to ``workdir/checkpoints``).
    keep: how many of the latest checkpoints to keep (the best is kept too).
    read_only: only read (``eval``, ``export``, a ``--from`` source): creates and
      deletes nothing.
  """

  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 2, read_only: bool = False):
    if keep < 1:
      raise ValueError(f"--keep must be at least 1, got {keep}")
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self._accuracies: dict[int, float] = {}
    self._read_only = read_only
    ocp = _orbax()
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False, create=not read_only,  # (orbax's read_only logs)
        preservation_policy=_LatestAndBest(keep, self._stored_accuracy))
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        "model": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler()})

  def _stored_accuracy(self, epoch: int) -> float:
    if epoch not in self._accuracies:
      try:
        self._accuracies[epoch] = _accuracy(self.meta(epoch)["record"]["test_accuracy"])
      except (CheckpointError, KeyError, TypeError):
        self._accuracies[epoch] = -math.inf  # unreadable: kept only while among the latest
    return self._accuracies[epoch]

  def path(self, epoch: int) -> pathlib.Path:
    return self.directory / str(epoch)

  def steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def problem(self, epoch: int, items: Sequence[str] = ("meta", "model")) -> str | None:
    """Why checkpoint ``epoch`` is incomplete (a folder of ``items`` missing, its
    meta unreadable), or None. Unreadable array data shows only on restore."""
    missing = [f"{item}/" for item in items if not (self.path(epoch) / item).is_dir()]
    if missing:
      return f"{' and '.join(missing)} missing"
    try:
      self._meta(epoch)
    except BrokenCheckpointError as e:
      return e.reason
    return None

  def reload(self) -> None:
    """Rereads the checkpoints folder (another process changed it)."""
    self._manager.reload()

  def newest_first(self) -> list[int]:
    return sorted(self.steps(), reverse=True)

  def set_aside(self, epoch: int, where: pathlib.Path) -> pathlib.Path:
    """Moves checkpoint ``epoch`` (a broken one) out of the checkpoints folder to
    ``where/<epoch>`` (``-2``, ``-3``... if taken) and returns its new path."""
    where.mkdir(parents=True, exist_ok=True)
    dest, i = where / str(epoch), 1
    while dest.exists():
      i += 1
      dest = where / f"{epoch}-{i}"
    shutil.move(str(self.path(epoch)), str(dest))
    self._manager.reload()
    return dest

  def resolve(self, which: str | int = "latest") -> int:
    """The epoch of checkpoint ``which``: ``latest``, ``best`` or an epoch number."""
    steps = self.steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if which == "latest":
      return self._manager.latest_step()
    if which == "best":
      readable = [s for s in steps if self.problem(s) is None]
      if not readable:
        raise BrokenCheckpointError(self.directory, "no complete checkpoint in it")
      return max(readable, key=lambda s: (_accuracy(self.meta(s)["record"]["test_accuracy"]), -s))
    if str(which).isdigit() and int(which) in steps:
      return int(which)
    raise ValueError(f"--checkpoint {which} not found; valid: latest, best, "
                     f"{', '.join(map(str, steps))}")

  def save(self, epoch: int, state: TrainState, meta: dict, metrics: dict) -> None:
    """Saves checkpoint ``epoch``, with the checksums of its arrays in its meta.

    Raises:
      CheckpointError: the save failed (disk full, permissions); the earlier
        checkpoints are intact and the partial one is removed.
    """
    model = {"params": state.params, "batch_stats": state.batch_stats, "cstate": state.cstate}
    train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    if self._read_only:
      raise CheckpointError(f"{self.directory} was opened read-only: not saving epoch {epoch}")
    sums = checksums({"model": model, "train": train})
    try:
      ocp = _orbax()
      saved = self._manager.save(epoch, metrics=metrics, args=ocp.args.Composite(
          model=ocp.args.StandardSave(model), train=ocp.args.StandardSave(train),
          meta=ocp.args.JsonSave({**meta, "checksums": sums})))
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - a failed save is reported, never half-kept
      self._remove_partial(epoch)
      steps = sorted(self.steps())
      kept = (f"epoch{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))}" if steps
              else "none")
      inner = _innermost(e)
      full = isinstance(inner, OSError) and inner.errno in (errno.ENOSPC, errno.EDQUOT)
      raise CheckpointError(
          f"could not save checkpoint {self.path(epoch)}: "
          f"{'disk full: ' if full else ''}{_reason(e)}; the earlier checkpoints "
          f"({kept}) are intact") from e
    if not saved:
      raise CheckpointError(f"could not save checkpoint {self.path(epoch)}: orbax skipped it "
                            f"(existing epochs {', '.join(map(str, self.steps()))})")
    self._accuracies[epoch] = _accuracy(metrics.get("test_accuracy"))

  def _remove_partial(self, epoch: int) -> None:
    """Removes what a failed save of ``epoch`` left: its temporary folders."""
    for tmp in self.directory.glob(f"{epoch}.orbax-checkpoint-tmp*"):
      shutil.rmtree(tmp, ignore_errors=True)
    try:
      self._manager.reload()
    except Exception:  # noqa: BLE001 - the save error is the one to report
      pass

  def _meta(self, epoch: int) -> dict:
    if not (self.path(epoch) / "meta").is_dir():
      raise BrokenCheckpointError(self.path(epoch), "meta/ missing")
    try:
      ocp = _orbax()
      meta = self._manager.restore(epoch, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - any failure to read it is a broken checkpoint
      raise BrokenCheckpointError(self.path(epoch),
                                  f"its meta cannot be read ({_reason(e)})") from e
    if not isinstance(meta, dict) or not _META_KEYS <= meta.keys():
      raise BrokenCheckpointError(self.path(epoch), "its meta is not a jcompress checkpoint's "
                                  f"(it lacks {', '.join(sorted(_META_KEYS - set(meta or ())))})")
    return meta

  def meta(self, epoch: int) -> dict:
    """The ``meta`` item of checkpoint ``epoch`` (without its checksums)."""
    meta = dict(self._meta(epoch))
    meta.pop("checksums", None)
    return meta

  def _item_metadata(self, epoch: int):
    if not (self.path(epoch) / "model").is_dir():
      raise BrokenCheckpointError(self.path(epoch), "model/ missing")
    try:
      return self._manager.item_metadata(epoch)["model"].tree
    except Exception as e:  # noqa: BLE001
      raise BrokenCheckpointError(self.path(epoch),
                                  f"its model metadata cannot be read ({_reason(e)})") from e

  def check_fits(self, epoch: int, variables: dict, what: str) -> None:
    """Raises ValueError naming each parameter path where the checkpoint and the
    model ``what`` disagree."""
    stored = self._item_metadata(epoch)
    problems = mismatches({k: variables[k] for k in ("params", "batch_stats")},
                          {k: stored.get(k, {}) for k in ("params", "batch_stats")})
    if problems:
      raise ValueError(f"checkpoint {self.directory / str(epoch)} does not fit {what}:\n  "
                       + "\n  ".join(problems))

  def stored_shapes(self, epoch: int) -> dict:
    """The ``model`` item of checkpoint ``epoch`` (params, batch_stats, cstate) as a
    tree of ``jax.ShapeDtypeStruct``."""
    stored = self._item_metadata(epoch)
    return {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored.get(k, {}))
            for k in ("params", "batch_stats", "cstate")}

  def restore(self, epoch: int, state: TrainState, *, model_only: bool = False) -> TrainState:
    """Restores checkpoint ``epoch`` into the structure and shardings of ``state``.

    With ``model_only`` the optimizer state of ``state`` is kept as it is (for
    evaluation, or starting a new run from trained weights).

    Raises:
      BrokenCheckpointError: a folder is missing or the data cannot be read.
      CheckpointError: an array does not match its checksum, or the model holds a
        NaN or an infinity (the message names the first such parameter path).
    """
    path = self.path(epoch)
    needed = ("meta", "model") if model_only else ITEMS
    missing = self.problem(epoch, needed)
    if missing:
      raise BrokenCheckpointError(path, missing)
    ocp = _orbax()
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    items: dict[str, Any] = {"model": ocp.args.StandardRestore(abstract(
        {"params": state.params, "batch_stats": state.batch_stats, "cstate": state.cstate}))}
    if not model_only:
      items["train"] = ocp.args.StandardRestore(abstract(
          {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}))
    got, unreadable = None, None
    try:
      got = self._manager.restore(epoch, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - unreadable data: a broken checkpoint
      _quiet_orbax_read_noise()
      unreadable = _reason(e)
    if unreadable is not None:
      gc.collect()
      raise BrokenCheckpointError(path, f"its data cannot be read ({unreadable})")
    stored = self._meta(epoch).get("checksums")
    if isinstance(stored, dict):  # checkpoints written before checksums have none
      found = checksums({name: got[name] for name in items})
      bad = sorted(p for p, h in found.items() if p in stored and stored[p] != h)
      if bad:
        raise CheckpointError(
            f"checkpoint {path} is damaged: {bad[0]} does not match its checksum"
            f"{f' (and {len(bad) - 1} more arrays)' if len(bad) > 1 else ''}; use an "
            "earlier --checkpoint, or move it away to resume from the previous one")
    nonfinite = first_nonfinite(got["model"])
    if nonfinite:
      raise CheckpointError(
          f"checkpoint {path} holds non-finite values (NaN or infinity), first at "
          f"{nonfinite}: it is not a usable model; use an earlier --checkpoint or retrain "
          "with a lower --lr")
    state = state.replace(**got["model"])
    return state if model_only else state.replace(**got["train"])

  def close(self) -> None:
    self._manager.close()
