"""TensorBoard event files of a run, in ``WORKDIR/tensorboard/`` beside ``metrics.jsonl``.

Written with tensorboardX (``pip install 'jcompress[tensorboard]'``; no TensorFlow).
Every scalar is logged at the run's optimizer step, so the per-step and per-epoch
curves share one x axis:

- every ``--log-every`` steps: ``train/loss`` and ``train/accuracy`` (means over
  the steps since the last such scalars, within the epoch), ``train/lr`` (the rate of the last step) and ``train/images_per_sec``
  (the steps' wall time; an epoch's first step, which may compile, is not timed);
- every epoch: ``epoch/train_loss``, ``epoch/train_accuracy``, ``epoch/test_loss``,
  ``epoch/test_accuracy``, ``epoch/lr``, ``epoch/images_per_sec`` (the values of
  ``metrics.jsonl``'s line; a one-shot compression logs its test loss and accuracy at
  step 0), and ``compression/sparsity`` (the fraction of zero weights the model runs
  with) and ``compression/param_bytes`` (the params at the plan's bits per weight,
  32 elsewhere), written before the epoch's checkpoint is saved.

A resumed run appends a new events file; first, the events after the checkpoint it
resumes from are dropped from the folder's files (the steps they logged are trained
again), so every step of a tag appears once. :func:`read_scalars` reads the folder
back without TensorFlow.

>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> board = Board(folder, schedule=lambda step: 0.1, log_every=2)
>>> for step in (1, 2):
...   board.step(step, {"loss": 0.5 * 8, "correct": 6, "count": 8})
>>> board.epoch({"step": 2, "train_loss": 0.5, "test_accuracy": 0.7})
>>> board.close()
>>> scalars = read_scalars(folder)
>>> scalars["train/loss"], scalars["epoch/test_accuracy"]
([(2, 0.5)], [(2, 0.699999988079071)])
"""

from __future__ import annotations

import os
import pathlib
import struct
import time
from typing import Any, Callable

import jax

FOLDER = "tensorboard"
EXTRA = "pip install 'jcompress[tensorboard]'"
_EPOCH_KEYS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr",
               "images_per_sec")


def available() -> bool:
  """Whether tensorboardX can be imported."""
  try:
    import tensorboardX  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def enabled(option: bool | None) -> bool:
  """``--tensorboard``'s effect: None (not given) writes event files when
  tensorboardX is installed; True without it is an error naming the extra."""
  if option is None:
    return available()
  if option and not available():
    raise ValueError(f"--tensorboard needs tensorboardX, which is not installed: {EXTRA} "
                     "(or pass --no-tensorboard)")
  return bool(option)


class Board:
  """Writes a run's scalars to ``folder`` (see the module doc).

  Args:
    folder: the event files' folder (created).
    schedule: the learning-rate schedule (``step - 1 -> lr``).
    log_every: steps between per-step scalars.
    resume_step: the step of the checkpoint the run resumes from; events after it
      are dropped first (-1: no checkpoint, every earlier event is dropped).
  """

  def __init__(self, folder: str | os.PathLike, schedule: Callable[[int], Any],
               log_every: int = 50, resume_step: int = 0):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self.folder = pathlib.Path(folder)
    self.folder.mkdir(parents=True, exist_ok=True)
    truncate(self.folder, resume_step)
    # tensorboardX names a file by the second and host: the nanosecond keeps two of
    # the same second apart and in order
    self.writer = SummaryWriter(logdir=str(self.folder), flush_secs=30,
                                filename_suffix=f".{time.time_ns()}")
    self.schedule, self.log_every = schedule, log_every
    self._sums: Any = None  # the window's sums since the last per-step scalars
    self._timed: Any = None  # images of its timed steps
    self._clock: float | None = None

  def step(self, step: int, out: dict) -> None:
    """Adds one step's summed ``out`` (``loss`` summed over the batch, ``correct``,
    ``count``); every ``log_every`` steps, writes their means."""
    if self._clock is None:  # an epoch's first step (it may compile): time from its end
      jax.block_until_ready(out)
      self._clock = time.perf_counter()
    else:
      self._timed = out["count"] if self._timed is None else self._timed + out["count"]
    self._sums = out if self._sums is None else jax.tree.map(lambda a, b: a + b,
                                                             self._sums, out)
    if step % self.log_every:
      return
    sums = {k: float(v) for k, v in self._sums.items()}
    now = time.perf_counter()
    self.writer.add_scalar("train/loss", sums["loss"] / sums["count"], step)
    self.writer.add_scalar("train/accuracy", sums["correct"] / sums["count"], step)
    self.writer.add_scalar("train/lr", float(self.schedule(step - 1)), step)
    if self._timed is not None and now > self._clock:
      self.writer.add_scalar("train/images_per_sec", float(self._timed) / (now - self._clock),
                             step)
    self._sums, self._timed, self._clock = None, None, now

  def epoch(self, record: dict, compression: Callable[[], dict] | None = None) -> None:
    """Writes an epoch's ``metrics.jsonl`` record at its ``step``, and the
    ``compression/*`` scalars ``compression()`` gives, and flushes."""
    for key in _EPOCH_KEYS:
      if key in record:
        self.writer.add_scalar(f"epoch/{key}", float(record[key]), int(record["step"]))
    for key, value in (compression() if compression else {}).items():
      self.writer.add_scalar(f"compression/{key}", float(value), int(record["step"]))
    self.writer.flush()
    self._sums, self._timed, self._clock = None, None, None  # the next epoch starts afresh

  def close(self) -> None:
    self.writer.close()


def _records(path: pathlib.Path) -> list[bytes]:
  """The raw TFRecord frames of an events file (length, its CRC, data, its CRC);
  a truncated last frame (a crash mid-write) is left out."""
  data, out, i = path.read_bytes(), [], 0
  while i + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[i:i + 8])
    end = i + 12 + length + 4
    if end > len(data):
      break
    out.append(data[i:end])
    i = end
  return out


def _event(frame: bytes):
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  event = event_pb2.Event()
  event.ParseFromString(frame[12:-4])
  return event


def _files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.glob("events.out.tfevents.*") if p.is_file())


def truncate(folder: str | os.PathLike, step: int) -> None:
  """Drops the events after ``step`` from ``folder``'s event files (rewritten
  atomically, frames copied byte for byte)."""
  from jcompress import atomic  # pylint: disable=import-outside-toplevel
  for path in _files(pathlib.Path(folder)):
    frames = _records(path)
    kept = [f for f in frames if _event(f).step <= step]
    if len(kept) != len(frames) or len(path.read_bytes()) != sum(map(len, frames)):
      atomic.write_bytes(path, b"".join(kept))


def read_scalars(folder: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """``{tag: [(step, value), ...]}`` of every scalar in ``folder``'s event files, in
  file and write order (needs tensorboardX's protobuf modules, not TensorFlow)."""
  out: dict[str, list[tuple[int, float]]] = {}
  for path in _files(pathlib.Path(folder)):
    for frame in _records(path):
      event = _event(frame)
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.setdefault(value.tag, []).append((int(event.step), value.simple_value))
  return out


class _Off:
  """No event files (``--no-tensorboard``, tensorboardX missing, or not process 0)."""

  def step(self, step: int, out: dict) -> None:
    pass

  def epoch(self, record: dict, compression: Callable[[], dict] | None = None) -> None:
    pass

  def close(self) -> None:
    pass


def open_board(workdir: str | os.PathLike, option: bool | None, schedule: Callable[[int], Any],
               log_every: int, resume_step: int, main: bool = True) -> Board | _Off:
  """The run's :class:`Board` in ``WORKDIR/tensorboard`` when ``option``
  (``--tensorboard``; see :func:`enabled`) asks for one and this is process 0,
  else a writer of nothing. ``resume_step``: the step of the checkpoint resumed
  from, -1 when there is none (every earlier event is dropped)."""
  if not (main and enabled(option)):
    return _Off()
  return Board(pathlib.Path(workdir) / FOLDER, schedule, log_every, resume_step)
