"""Readers for the standard public dataset files, decoded into uint8 NHWC arrays.

Every reader returns :class:`Splits` and raises ``ValueError`` naming the file (and
the archive member) when a file is truncated, corrupt or laid out unexpectedly.
Archives are read member by member into memory, never extracted, and an archive
holding a link, a device file or a path that leaves its root is refused outright.
"""

from __future__ import annotations

import gzip
import io
import math
import pathlib
import pickle
import struct
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np
from PIL import Image

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                   "horse", "ship", "truck")
CIFAR10_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                   "data_batch_5", "test_batch")
_CIFAR_SHAPE = (32, 32, 3)
# Errors that the gzip, zlib and tarfile modules raise on a truncated or damaged file.
_STREAM_ERRORS = (OSError, EOFError, zlib.error, tarfile.TarError)


class Splits(NamedTuple):
  """A dataset's arrays: images uint8 ``[N, H, W, C]``, labels int32 ``[N]``."""
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


def read_idx(path: pathlib.Path) -> np.ndarray:
  """Reads one gzipped unsigned-byte IDX file (the MNIST format).

  Args:
    path: a ``*-idx?-ubyte.gz`` file.

  Returns:
    A writable uint8 array of the shape the IDX header declares.

  Raises:
    ValueError: the gzip stream is damaged, or the header is not an unsigned-byte
      IDX header, or the payload size differs from the declared shape.
  """
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except _STREAM_ERRORS as e:
    raise ValueError(f"{path}: truncated or corrupt gzip file ({e})") from e
  if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
    raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
  header = 4 + 4 * raw[3]
  if len(raw) < header:
    raise ValueError(f"{path}: IDX header cut short ({len(raw)} bytes)")
  shape = struct.unpack(f">{raw[3]}I", raw[4:header])
  if len(raw) - header != math.prod(shape):
    raise ValueError(f"{path}: IDX header declares shape {shape} ({math.prod(shape)} "
                     f"bytes) but the file holds {len(raw) - header}: truncated or corrupt")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape).copy()


def read_idx_folder(folder: pathlib.Path) -> Splits:
  """Reads the four MNIST-format files :data:`IDX_FILES` from ``folder``."""
  arrays = [read_idx(folder / name) for name in IDX_FILES]
  for name, array, ndim in zip(IDX_FILES, arrays, (3, 1, 3, 1)):
    if array.ndim != ndim:
      raise ValueError(f"{folder / name}: expected a {ndim}-d IDX array, got shape "
                       f"{array.shape}")
  for images, labels in ((0, 1), (2, 3)):
    if len(arrays[images]) != len(arrays[labels]):
      raise ValueError(f"{folder}: {IDX_FILES[images]} holds {len(arrays[images])} "
                       f"images but {IDX_FILES[labels]} {len(arrays[labels])} labels")
  return Splits(arrays[0][..., None], arrays[1].astype(np.int32),
                arrays[2][..., None], arrays[3].astype(np.int32))


def _safe_members(tar: tarfile.TarFile, path: pathlib.Path) -> Iterator[tarfile.TarInfo]:
  """The regular files of ``tar``; refuses links, special files and escaping paths."""
  for member in tar:
    if member.issym() or member.islnk():
      raise ValueError(f"{path}: refusing archive: member {member.name!r} is a link to "
                       f"{member.linkname!r}")
    parts = pathlib.PurePosixPath(member.name).parts
    if member.name.startswith(("/", "\\")) or ".." in parts:
      raise ValueError(f"{path}: refusing archive: member {member.name!r} escapes the "
                       "archive root")
    if not (member.isfile() or member.isdir()):
      raise ValueError(f"{path}: refusing archive: member {member.name!r} is not a "
                       "regular file or folder")
    if member.isfile():
      yield member


def _read_tar(path: pathlib.Path) -> Iterator[tuple[tuple[str, ...], bytes]]:
  """Yields ``(path parts, content)`` of every regular file in a .tar.gz."""
  try:
    with tarfile.open(path, "r:gz") as tar:
      for member in _safe_members(tar, path):
        yield pathlib.PurePosixPath(member.name).parts, tar.extractfile(member).read()
  except _STREAM_ERRORS as e:
    raise ValueError(f"{path}: truncated or corrupt archive ({e})") from e


def _decode_jpeg(data: bytes, where: str) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
      if image.mode != "RGB" or image.size != _CIFAR_SHAPE[:2]:
        raise ValueError(f"{where}: expected a 32x32 RGB JPEG, got {image.mode} "
                         f"{image.size}")
      return np.asarray(image)
  except OSError as e:  # PIL's UnidentifiedImageError and truncation errors
    raise ValueError(f"{where}: undecodable JPEG ({e})") from e


def read_cifar10_jpeg(path: pathlib.Path) -> Splits:
  """Reads the CIFAR-10 image-folder archive ``cifar10-jpeg.tar.gz``.

  The layout is ``{train,test}/<class>/NNNN.jpg``: class folders in alphabetical
  order are the label ids, NNNN the image's rank within its class. Images come out
  sorted by class, then NNNN. Decoding is sequential: it is bound by Pillow's
  per-image Python overhead, so a thread pool measured no faster on 2 cores.

  Args:
    path: the ``.tar.gz`` archive.

  Returns:
    The train and test splits.

  Raises:
    ValueError: the archive is damaged or unsafe, holds an unexpected member or
      class, or a JPEG does not decode to 32x32 RGB.
  """
  entries: dict[str, list[tuple[int, int, str, bytes]]] = {"train": [], "test": []}
  for parts, data in _read_tar(path):
    member = "/".join(parts)
    if (len(parts) != 3 or parts[0] not in entries or parts[1] not in CIFAR10_CLASSES
        or not parts[2].endswith(".jpg") or not parts[2][:-4].isdigit()):
      raise ValueError(f"{path}: unexpected member {member!r}; expected "
                       f"train|test/<class>/NNNN.jpg with class in {CIFAR10_CLASSES}")
    entries[parts[0]].append((CIFAR10_CLASSES.index(parts[1]), int(parts[2][:-4]),
                              member, data))
  arrays = []
  for split, items in entries.items():
    if not items:
      raise ValueError(f"{path}: no {split}/<class>/NNNN.jpg members")
    items.sort(key=lambda item: item[:2])
    images = np.empty((len(items), *_CIFAR_SHAPE), np.uint8)
    for i, (_, _, member, data) in enumerate(items):
      images[i] = _decode_jpeg(data, f"{path}: {member}")
    arrays += [images, np.array([item[0] for item in items], np.int32)]
  return Splits(*arrays)


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles plain containers and numpy arrays only: a pickle can run code."""
  # _codecs.encode: how Python 3 writes bytes at pickle protocols 0-2.
  _ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
              ("numpy", "dtype"), ("_codecs", "encode")}

  def find_class(self, module: str, name: str):
    # The CIFAR batches were pickled by numpy 1.x, whose module numpy 2 renamed.
    module = module.replace("numpy.core.", "numpy._core.")
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
    return super().find_class(module, name)


def _cifar_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
  try:
    batch = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    images, labels = batch[b"data"], np.asarray(batch[b"labels"])
  except (pickle.UnpicklingError, EOFError, TypeError, KeyError, ValueError,
          IndexError) as e:
    raise ValueError(f"{where}: not a CIFAR-10 python batch ({e!r})") from e
  if (not isinstance(images, np.ndarray) or images.dtype != np.uint8
      or images.shape != (len(labels), 3 * 32 * 32) or labels.ndim != 1):
    raise ValueError(f"{where}: expected uint8 data [N, 3072] and N labels")
  return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int32)


def _cifar_batches(files: Mapping[str, bytes], where: str) -> Splits:
  missing = [name for name in CIFAR10_BATCHES if name not in files]
  if missing:
    raise ValueError(f"{where}: missing CIFAR-10 batches {missing}")
  batches = [_cifar_batch(files[name], f"{where}: {name}") for name in CIFAR10_BATCHES]
  train_images, train_labels = zip(*batches[:-1])
  return Splits(np.ascontiguousarray(np.concatenate(train_images)),
                np.concatenate(train_labels),
                np.ascontiguousarray(batches[-1][0]), batches[-1][1])


def read_cifar10_python_tar(path: pathlib.Path) -> Splits:
  """Reads the original ``cifar-10-python.tar.gz`` (pickled numpy batches).

  Args:
    path: the archive, whose batches sit in ``cifar-10-batches-py/``.

  Returns:
    The train split (``data_batch_1`` .. ``data_batch_5`` in order) and the test
    split (``test_batch``).

  Raises:
    ValueError: the archive is damaged or unsafe, or a batch is missing or malformed.
  """
  files = {parts[1]: data for parts, data in _read_tar(path)
           if len(parts) == 2 and parts[0] == "cifar-10-batches-py"}
  return _cifar_batches(files, str(path))


def read_cifar10_python_folder(folder: pathlib.Path) -> Splits:
  """Reads the extracted ``cifar-10-batches-py/`` folder; see the archive reader."""
  return _cifar_batches({name: (folder / name).read_bytes() for name in CIFAR10_BATCHES
                         if (folder / name).is_file()}, str(folder))
