"""The user's own data: ``npz:PATH`` and ``folder:PATH`` datasets.

* ``npz:PATH``: a ``.npz`` holding ``x_train, y_train, x_test, y_test``; images
  ``[N, H, W, C]`` or ``[N, H, W]``, uint8 or float in ``[0, 1]`` (scaled by 255),
  labels integers in ``[0, K)`` where ``K - 1`` is the largest training label.
* ``folder:PATH``: an image-folder tree as torchvision's ImageFolder,
  ``PATH/{train,test}/<class>/*.png|jpg|jpeg``; the sorted class folder names are
  the labels; both splits must hold the same class folders. Other files are
  ignored; every image must have the same size (grayscale images give one channel,
  any other mode three).

Sizes are checked before anything is allocated: each ``.npy`` header of the
``.npz`` against its member's size, each image's header against the first one's
size, and the decoded total against :data:`MAX_BYTES`. A file or link that leads
outside ``PATH`` is refused. Mean and standard deviation per channel come from the
training split (:func:`spec`). Every error is a ``ValueError`` naming the file.

>>> is_user("npz:/tmp/x.npz"), is_user("mnist")
(True, False)
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
import zipfile
from typing import NamedTuple

import numpy as np
from PIL import Image

from jcompress.data import readers

PREFIXES = ("npz:", "folder:")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# The most bytes a decoded user dataset may take in memory (uint8), checked first.
MAX_BYTES = 4 << 30
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_DEFLATE_MAX_RATIO = 1032


def is_user(name: str) -> bool:
  """Whether ``name`` is a user dataset (``npz:PATH`` or ``folder:PATH``)."""
  return isinstance(name, str) and name.startswith(PREFIXES) and len(name.split(":", 1)[1]) > 0


def canonical(name: str) -> str:
  """``name`` with its path made absolute, so a run's record works from any folder.

  >>> canonical("npz:/data/x.npz")
  'npz:/data/x.npz'
  """
  kind, path = name.split(":", 1)
  return f"{kind}:{os.path.abspath(os.path.expanduser(path))}"


class Located(NamedTuple):
  """A user dataset found on disk, not yet decoded.

  Attributes:
    description: for logs, e.g. ``npz file /data/x.npz``.
    key_files: the files whose path, size and mtime key the decoded-data cache.
    image_shape: ``(H, W, C)`` of one image (from headers only).
    num_classes: number of labels.
    read: decodes the splits (checked by the caller).
  """
  description: str
  key_files: tuple[pathlib.Path, ...]
  image_shape: tuple[int, ...]
  num_classes: int
  read: object


def locate(name: str) -> Located:
  """Finds user dataset ``name`` and reads its headers (shape, classes), not its pixels.

  Raises:
    ValueError: a missing, unsafe or malformed file; the message names it.
  """
  kind, path = name.split(":", 1)
  path = pathlib.Path(path).expanduser()
  if kind == "npz":
    return _locate_npz(path)
  return _locate_folder(path)


# ---- npz ----

def _npy_header(npz: zipfile.ZipFile, info: zipfile.ZipInfo, where: str):
  with npz.open(info) as f:
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0), (3, 0)):
      raise ValueError(f"{where}: unsupported .npy version {version}")
    read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
        version, np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read(f)
    offset = f.tell()
  if dtype.hasobject:
    raise ValueError(f"{where}: holds Python objects ({dtype}); only numbers are read")
  if offset + math.prod(shape) * dtype.itemsize != info.file_size:
    raise ValueError(f"{where}: shape {shape} of {dtype} does not match the member's "
                     f"{info.file_size - offset} bytes: corrupt")
  return tuple(shape), dtype


def _locate_npz(path: pathlib.Path) -> Located:
  if not path.is_file():
    raise ValueError(f"{path}: no such .npz file")
  try:
    size = path.stat().st_size
    with zipfile.ZipFile(path) as npz:
      members = {info.filename[:-4]: info for info in npz.infolist()
                 if info.filename.endswith(".npy")}
      missing = [k for k in _NPZ_KEYS if k not in members]
      if missing:
        raise ValueError(f"{path}: missing arrays {missing}; expected {list(_NPZ_KEYS)}")
      shapes = {}
      for key in _NPZ_KEYS:
        info = members[key]
        where = f"{path}: {key}"
        if info.file_size > _DEFLATE_MAX_RATIO * max(info.compress_size, 1) or (
            info.compress_type == zipfile.ZIP_STORED and info.file_size > size):
          raise ValueError(f"{where}: claims {info.file_size} bytes, more than the file "
                           "can hold: corrupt")
        shapes[key] = _npy_header(npz, info, where)
  except zipfile.BadZipFile as e:
    raise ValueError(f"{path}: not a .npz file ({e})") from e
  for split in ("train", "test"):
    (xs, xt), (ys, yt) = shapes[f"x_{split}"], shapes[f"y_{split}"]
    if len(xs) not in (3, 4) or (len(xs) == 4 and xs[3] not in (1, 3)):
      raise ValueError(f"{path}: x_{split} is {xs}, expected [N, H, W] or [N, H, W, C] "
                       "with C 1 or 3")
    if xt.kind not in "uif" or (xt.kind in "ui" and xt != np.uint8):
      raise ValueError(f"{path}: x_{split} is {xt}, expected uint8 or float")
    if len(ys) != 1 or yt.kind not in "ui":
      raise ValueError(f"{path}: y_{split} is {yt} {ys}, expected integers [N]")
    if ys[0] != xs[0]:
      raise ValueError(f"{path}: x_{split} holds {xs[0]} images but y_{split} {ys[0]} labels")
    if xs[0] == 0:
      raise ValueError(f"{path}: no {split} images (x_{split} is empty)")
  item = lambda s: tuple(s[1:]) + ((1,) if len(s) == 3 else ())  # noqa: E731
  shape_train, shape_test = item(shapes["x_train"][0]), item(shapes["x_test"][0])
  if shape_train != shape_test:
    raise ValueError(f"{path}: x_train images are {shape_train} but x_test {shape_test}")
  total = (shapes["x_train"][0][0] + shapes["x_test"][0][0]) * math.prod(shape_train)
  if total > MAX_BYTES:
    raise ValueError(f"{path}: {total} bytes of images, more than the {MAX_BYTES} allowed")
  with np.load(path, allow_pickle=False) as npz:
    y_train = npz["y_train"]
  if y_train.min() < 0:
    raise ValueError(f"{path}: y_train holds a negative label {int(y_train.min())}")
  return Located(f"npz file {path}", (path,), shape_train, int(y_train.max()) + 1,
                 functools.partial(_read_npz, path, shape_train))


def _images(x: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
  if x.dtype.kind == "f":
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
      raise ValueError(f"{where}: float images must be finite and in [0, 1] (got "
                       f"[{x.min()}, {x.max()}]); divide by 255 or store uint8")
    x = np.round(x * 255).astype(np.uint8)
  return np.ascontiguousarray(x.reshape(len(x), *shape))


def _read_npz(path: pathlib.Path, shape: tuple[int, ...]) -> readers.Splits:
  with np.load(path, allow_pickle=False) as npz:
    arrays = {k: npz[k] for k in _NPZ_KEYS}
  return readers.Splits(_images(arrays["x_train"], shape, f"{path}: x_train"),
                        arrays["y_train"].astype(np.int32),
                        _images(arrays["x_test"], shape, f"{path}: x_test"),
                        arrays["y_test"].astype(np.int32))


# ---- image folders ----

def _list_split(root: pathlib.Path, split: str) -> dict[str, list[pathlib.Path]]:
  """``{class: [image files]}`` of ``root/split``, sorted; refuses links leaving ``root``."""
  folder = root / split
  if not folder.is_dir():
    raise ValueError(f"{folder}: missing split folder (expected {root}/{{train,test}}/"
                     "<class>/*.png|jpg)")
  real_root = root.resolve()
  classes: dict[str, list[pathlib.Path]] = {}
  for entry in sorted(folder.iterdir()):
    if entry.name.startswith(".") or not entry.is_dir():
      continue
    if not entry.resolve().is_relative_to(real_root):
      raise ValueError(f"{entry}: a link leading outside {root}; refusing it")
    files = []
    for f in sorted(entry.iterdir()):
      if f.name.startswith(".") or f.suffix.lower() not in IMAGE_SUFFIXES:
        continue  # not an image: ignored
      if not f.resolve().is_relative_to(real_root):
        raise ValueError(f"{f}: a link leading outside {root}; refusing it")
      if f.is_file():
        files.append(f)
    classes[entry.name] = files
  if not classes:
    raise ValueError(f"{folder}: no class folders")
  return classes


def _header(f: pathlib.Path) -> tuple[tuple[int, int], int]:
  """``((H, W), channels)`` from an image's header (nothing decoded)."""
  try:
    with Image.open(f, formats=["PNG", "JPEG"]) as image:
      return (image.size[1], image.size[0]), 1 if image.mode in ("L", "1", "I;16") else 3
  except (OSError, Image.DecompressionBombError) as e:
    raise ValueError(f"{f}: not a readable PNG or JPEG image ({e})") from e


def _locate_folder(root: pathlib.Path) -> Located:
  if not root.is_dir():
    raise ValueError(f"{root}: no such image folder")
  splits = {split: _list_split(root, split) for split in ("train", "test")}
  if set(splits["train"]) != set(splits["test"]):
    only = sorted(set(splits["train"]) ^ set(splits["test"]))
    raise ValueError(f"{root}: train and test must hold the same class folders; "
                     f"{only[0]!r} is in one only (missing {root}/"
                     f"{'test' if only[0] in splits['train'] else 'train'}/{only[0]})")
  files = [f for split in splits.values() for fs in split.values() for f in fs]
  for split, classes in splits.items():
    if not any(classes.values()):
      raise ValueError(f"{root}/{split}: no images (*.png, *.jpg) in its class folders")
  size, channels = _header(files[0])
  for f in files[1:]:
    other, c = _header(f)
    if other != size:
      raise ValueError(f"{f}: image is {other[1]}x{other[0]}, but {files[0]} is "
                       f"{size[1]}x{size[0]}: all images must have the same size")
    channels = max(channels, c)
  shape = (*size, channels)
  if len(files) * math.prod(shape) > MAX_BYTES:
    raise ValueError(f"{root}: {len(files)} images of {shape}, more than the {MAX_BYTES} "
                     "bytes allowed")
  return Located(f"image folders {root}", tuple(files), shape, len(splits["train"]),
                 functools.partial(_read_folder, splits, shape))


def _read_folder(splits: dict, shape: tuple[int, ...]) -> readers.Splits:
  arrays = []
  names = sorted(splits["train"])
  for split in ("train", "test"):
    items = [(names.index(c), f) for c, fs in splits[split].items() for f in fs]
    images = np.empty((len(items), *shape), np.uint8)
    for i, (_, f) in enumerate(items):
      try:
        with Image.open(f, formats=["PNG", "JPEG"]) as image:
          pixels = np.asarray(image.convert("L" if shape[2] == 1 else "RGB"))
      except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{f}: undecodable image ({e})") from e
      if pixels.shape[:2] != shape[:2]:
        raise ValueError(f"{f}: decodes to {pixels.shape[:2]}, expected {shape[:2]}")
      images[i] = pixels.reshape(shape)
    arrays += [images, np.array([label for label, _ in items], np.int32)]
  return readers.Splits(*arrays)


def statistics(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and standard deviation of uint8 ``[N, H, W, C]`` on the 0-1 scale.

  >>> statistics(np.full((2, 4, 4, 1), 255, np.uint8))
  ((1.0,), (0.0,))
  """
  flat = images.reshape(-1, images.shape[-1])
  sums, squares = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
  for start in range(0, len(flat), 1 << 22):  # bounded float64 memory
    chunk = flat[start:start + (1 << 22)].astype(np.float64) / 255
    sums += chunk.sum(0)
    squares += (chunk ** 2).sum(0)
  mean = sums / len(flat)
  std = np.sqrt(np.maximum(squares / len(flat) - mean ** 2, 0))
  return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)
