"""Moving MNIST clips generated deterministically from MNIST digits.

Each clip shows one digit translating in a straight line across ``frames`` frames
of a black ``size x size`` canvas, from a random start to a different random end
position (rounded to whole pixels); its label is the digit's. The input of the
3D-conv video classifier ``c3d``.

>>> import numpy as np
>>> images = np.full((3, 28, 28, 1), 255, np.uint8)
>>> videos, labels = make_moving_mnist(images, np.array([7, 1, 4]))
>>> videos.shape, videos.dtype, labels.tolist()
((3, 8, 32, 32, 1), dtype('uint8'), [7, 1, 4])
>>> int(videos[0, 0].sum() // 255)  # the whole digit is on the canvas
784
"""

from __future__ import annotations

import numpy as np

DIGIT = 28


def make_moving_mnist(images: np.ndarray, labels: np.ndarray, *, frames: int = 8,
                      size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Turns MNIST digits into clips of one moving digit.

  Args:
    images: uint8 digits of shape (N, 28, 28, 1).
    labels: their N labels, returned unchanged.
    frames: frames per clip (at least 2).
    size: the canvas side, at least 29 so the digit has room to move.
    seed: seeds the start and end positions; clip i depends only on the seed, i
      and image i, so a prefix of the images gives a prefix of the clips.

  Returns:
    ``(videos, labels)``: uint8 clips of shape (N, frames, size, size, 1) and the labels.
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.ndim != 4 or images.shape[1:] != (DIGIT, DIGIT, 1) or images.dtype != np.uint8:
    raise ValueError(f"make_moving_mnist: images must be uint8 of shape (N, 28, 28, 1), got "
                     f"{images.dtype} {images.shape}")
  if labels.shape[:1] != images.shape[:1]:
    raise ValueError(f"make_moving_mnist: {len(labels)} labels for {len(images)} images")
  if frames < 2:
    raise ValueError(f"make_moving_mnist: frames must be at least 2, got {frames}")
  if size <= DIGIT:
    raise ValueError(f"make_moving_mnist: size must exceed {DIGIT}, got {size}")
  n, span = len(images), size - DIGIT + 1
  # Start and end as indices into the span x span grid of offsets, never equal.
  # One row of uniforms per clip, so clip i depends only on (seed, i).
  u = np.random.default_rng(seed).random((n, 2))
  cells = span * span
  start = (u[:, 0] * cells).astype(np.int64)
  end = (start + 1 + (u[:, 1] * (cells - 1)).astype(np.int64)) % cells
  start_yx = np.stack(np.divmod(start, span), axis=-1)
  end_yx = np.stack(np.divmod(end, span), axis=-1)
  t = np.linspace(0.0, 1.0, frames)[None, :, None]
  pos = np.rint(start_yx[:, None] + (end_yx - start_yx)[:, None] * t).astype(np.int64)
  videos = np.zeros((n, frames, size, size, 1), np.uint8)
  # One vectorised copy per distinct offset: at most span^2 of them.
  flat = pos[..., 0] * span + pos[..., 1]
  for offset in np.unique(flat):
    clip, frame = np.nonzero(flat == offset)
    y, x = divmod(int(offset), span)
    videos[clip, frame, y:y + DIGIT, x:x + DIGIT] = images[clip]
  return videos, labels
