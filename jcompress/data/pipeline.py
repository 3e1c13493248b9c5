"""Batching: shuffle, CIFAR augmentation, normalisation and device prefetch.

Shuffling and augmentation draw from ``np.random.default_rng([seed, epoch])``, so
an epoch's batches depend on ``(seed, epoch)`` only: a run resumed at epoch ``e``
sees exactly the batches of an uninterrupted run.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import numpy as np

Batch = dict[str, jax.Array]
_PAD = 4  # CIFAR random crop: zero-pad each side by 4 pixels, crop back
_PUT_POLL_S = 0.1  # how often a producer blocked on a full queue checks for stop


def num_batches(n: int, batch_size: int, drop_remainder: bool) -> int:
  """The number of batches :func:`batches` yields for ``n`` examples.

  >>> num_batches(10, 4, drop_remainder=False), num_batches(10, 4, drop_remainder=True)
  (3, 2)
  """
  if n < 0 or batch_size < 1:
    raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
  return n // batch_size if drop_remainder else math.ceil(n / batch_size)


def _crop_flip(images: np.ndarray, rng: np.random.Generator, n: int,
               part: np.ndarray | slice) -> np.ndarray:
  """Random crop of the 4-pixel zero-padded images, then random horizontal flip.

  The offsets and flips are drawn for all ``n`` images of the global batch, of
  which ``images`` are the rows ``part``: each process of a run augments its rows
  exactly as a single process would.
  """
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (_PAD, _PAD), (_PAD, _PAD), (0, 0)))
  rows = rng.integers(0, 2 * _PAD + 1, n)[part][:, None] + np.arange(h)
  cols = rng.integers(0, 2 * _PAD + 1, n)[part][:, None]
  flip = (rng.random(n) < 0.5)[part]
  # [b, H + 2 pad, column offset, C, w]: one gather takes each image's rows and
  # column offset, copying w-long runs (gathering single pixels is 2x slower).
  windows = np.lib.stride_tricks.sliding_window_view(padded, w, axis=2)
  out = windows[np.arange(b)[:, None], rows, cols].transpose(0, 1, 3, 2)
  out[flip] = out[flip, :, ::-1]
  return out


def _host_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                  scale: np.ndarray, shift: np.ndarray, seed: int | None, epoch: int,
                  augment: bool, drop_remainder: bool, pad: bool,
                  part: np.ndarray | slice) -> Iterator[dict[str, np.ndarray]]:
  """The rows ``part`` of each global batch, as host arrays."""
  rng = None if seed is None else np.random.default_rng([seed, epoch])
  order = np.arange(len(images)) if rng is None else rng.permutation(len(images))
  for i in range(num_batches(len(images), batch_size, drop_remainder)):
    index = order[i * batch_size:(i + 1) * batch_size]
    n = len(index)
    if pad:  # the padding rows repeat image 0; the mask drops them
      index = np.pad(index, (0, batch_size - n))
    x = images[index[part]]
    if augment:
      x = _crop_flip(x, rng, len(index), part)
    x = x.astype(np.float32, order="C")
    x *= scale
    x += shift
    batch = {"image": x, "label": labels[index[part]]}
    if pad:
      batch["mask"] = (np.arange(batch_size) < n)[part]
    yield batch


class _Raised(NamedTuple):
  error: BaseException


_DONE = object()


def _prefetched(host: Iterator[dict[str, np.ndarray]], place: Callable[[dict], Batch],
                depth: int) -> Iterator[Batch]:
  """Runs ``host`` and ``place`` (onto devices) in a thread, ``depth`` batches ahead.

  Closing the generator (or dropping it) stops and joins the thread; an exception
  in the thread is re-raised here.
  """
  slots: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        slots.put(item, timeout=_PUT_POLL_S)
        return True
      except queue.Full:
        continue
    return False

  def produce() -> None:
    try:
      for batch in host:
        if not put(place(batch)):
          return
      put(_DONE)
    except BaseException as e:  # handed over: the consumer re-raises it
      put(_Raised(e))

  thread = threading.Thread(target=produce, name="jcompress-prefetch", daemon=True)
  thread.start()
  try:
    while (item := slots.get()) is not _DONE:
      if isinstance(item, _Raised):
        raise item.error
      yield item
  finally:
    stop.set()
    thread.join()


def _local_rows(sharding: jax.sharding.Sharding, batch_size: int) -> np.ndarray:
  """The rows of a global batch that this process's devices hold, in the order
  ``jax.make_array_from_process_local_data`` expects them."""
  try:
    index = sharding.addressable_devices_indices_map((batch_size,))
  except ValueError as e:
    raise ValueError(f"batch_size {batch_size} does not split evenly over {sharding}") from e
  spans = sorted({i[0].indices(batch_size) for i in index.values()})
  return np.concatenate([np.arange(*span) for span in spans])


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *,
            mean: Sequence[float], std: Sequence[float], seed: int | None = None,
            epoch: int = 0, augment: bool = False, drop_remainder: bool = False,
            pad: bool = False, sharding: jax.sharding.Sharding | None = None,
            prefetch: int = 2) -> Iterator[Batch]:
  """Iterates over ``(images, labels)`` in normalised batches placed on device.

  Args:
    images: uint8 ``[N, H, W, C]``.
    labels: integer ``[N]``.
    batch_size: examples per batch; the last batch is smaller unless
      ``drop_remainder``.
    mean: per-channel mean on the 0-1 scale (``len == C``).
    std: per-channel standard deviation on the 0-1 scale (``len == C``).
    seed: shuffle seed; ``None`` keeps the given order (evaluation).
    epoch: with ``seed``, selects the epoch's permutation and augmentation.
    augment: random crop (zero padding of 4 pixels) and horizontal flip, drawn per
      image; needs ``seed``.
    drop_remainder: drop the last, smaller batch.
    pad: pad the last, smaller batch to ``batch_size`` and add ``"mask"``, True
      for the real rows, to every batch (evaluation without recompiling).
    sharding: place each global batch with this sharding of its first axis
      (``parallel.batch_sharding(mesh)``); each process reads only the rows that
      its own devices hold. Needs full batches (``drop_remainder`` or ``pad``) of
      a size the sharding divides. Default: the default device.
    prefetch: batches prepared ahead by a background thread, already on device;
      0 prepares each batch when it is asked for.

  Returns:
    An iterator of ``{"image": float32 [B, H, W, C] (x / 255 - mean) / std,
    "label": int32 [B]}`` (and ``"mask": bool [B]`` with ``pad``); ``B`` is the
    global batch size, also with ``sharding`` over several processes.

  Raises:
    ValueError: shapes, dtypes or options are inconsistent.

  >>> x, y = np.zeros((10, 2, 2, 1), np.uint8), np.arange(10)
  >>> [b["label"].tolist() for b in batches(x, y, 4, mean=(0.,), std=(1.,), prefetch=0)]
  [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  """
  if images.ndim not in (4, 5) or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 [N, H, W, C] (or [N, T, H, W, C] video), got "
                     f"{images.dtype} {images.shape}")
  if labels.shape != images.shape[:1]:
    raise ValueError(f"labels must be [{len(images)}], got {labels.shape}")
  channels = images.shape[-1]
  if len(mean) != channels or len(std) != channels:
    raise ValueError(f"mean and std need {channels} values each, got {mean} and {std}")
  if augment and images.ndim != 4:
    raise ValueError("augment (crop and flip) applies to images, not video")
  if augment and seed is None:
    raise ValueError("augment=True needs a seed (augmentation is for shuffled training)")
  if prefetch < 0:
    raise ValueError(f"prefetch must be >= 0, got {prefetch}")
  num_batches(len(images), batch_size, drop_remainder)  # validates batch_size
  part, place = slice(None), jax.device_put
  if sharding is not None:
    if not (drop_remainder or pad):
      raise ValueError("a sharded batch must be full: pass drop_remainder or pad")
    part = _local_rows(sharding, batch_size)
    place = lambda batch: {k: jax.make_array_from_process_local_data(
        sharding, v, (batch_size, *v.shape[1:])) for k, v in batch.items()}
  # Full [H, W, C] factors: broadcasting a length-3 channel axis is 20x slower.
  std = np.asarray(std, np.float32)
  scale = np.broadcast_to(1 / (255 * std), images.shape[1:]).copy()
  shift = np.broadcast_to(-np.asarray(mean, np.float32) / std, images.shape[1:]).copy()
  host = _host_batches(images, labels.astype(np.int32, copy=False), batch_size,
                       scale=scale, shift=shift,
                       seed=seed, epoch=epoch, augment=augment,
                       drop_remainder=drop_remainder, pad=pad, part=part)
  if prefetch == 0:
    return (place(batch) for batch in host)
  return _prefetched(host, place, prefetch)
