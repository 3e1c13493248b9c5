"""Readers for the standard public dataset files, decoded into uint8 NHWC arrays.

Every reader returns :class:`Splits` and raises ``ValueError`` naming the file (and
the archive member) when a file is truncated, corrupt or laid out unexpectedly.
Archives are read member by member into memory, never extracted, and an archive
holding a link, a device or sparse file or a path that leaves its root is refused
outright.

No size a file claims is trusted before it is checked: an IDX header is read and
checked (magic, dims, size against :data:`IDX_MAX_ITEMS` and against what the
gzip file can hold) before its array is allocated, then exactly that many bytes
are streamed in; a tar member (and a tar's own long-name or pax header) larger
than the largest legitimate one, or an archive with too many members or bytes,
is refused before it is read (:data:`CIFAR_JPEG_CAPS`, :data:`CIFAR_PYTHON_CAPS`).
So a small file cannot make a reader allocate much more than the real dataset.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pathlib
import pickle
import struct
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

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


# IDX files: the largest legitimate one is MNIST's (and Fashion-MNIST's) training
# set, 60000 items; a file claiming more than 10x that is refused before anything is
# allocated (600000 images of 28x28 are 470 MB). Larger MNIST-format sets exist
# (QMNIST's 402953 NIST digits) and stay under it.
IDX_MAX_ITEMS = 10 * 60000
# Deflate cannot expand more than 1032:1, so a gzip file of n bytes never holds more
# than 1032 n: a header claiming more is refused without reading further.
_DEFLATE_MAX_RATIO = 1032
_CHUNK = 1 << 20


def _idx_header(f, path: pathlib.Path) -> tuple[int, ...]:
  magic = f.read(4)
  if len(magic) < 4 or magic[:3] != b"\x00\x00\x08":
    raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic.hex()})")
  dims = f.read(4 * magic[3])
  if len(dims) < 4 * magic[3]:
    raise ValueError(f"{path}: IDX header cut short ({4 + len(dims)} bytes)")
  return struct.unpack(f">{magic[3]}I", dims)


def read_idx(path: pathlib.Path, item_shape: tuple[int, ...] | None = None,
             max_items: int = IDX_MAX_ITEMS) -> np.ndarray:
  """Reads one gzipped unsigned-byte IDX file (the MNIST format).

  The header is read and checked first; the array is allocated only once its size
  is known to be sane, then exactly that many bytes are streamed into it.

  Args:
    path: a ``*-idx?-ubyte.gz`` file.
    item_shape: when given, the shape of one item: the header must declare
      ``(N, *item_shape)`` (``()`` for a labels file).
    max_items: the most items (first dimension) the header may declare.

  Returns:
    A writable uint8 array of the shape the IDX header declares.

  Raises:
    ValueError: the gzip stream is damaged, or the header is not an unsigned-byte
      IDX header, declares another item shape, more than ``max_items`` items or
      more bytes than the gzip file can hold, or the payload is shorter or longer
      than the declared shape.
  """
  try:
    compressed = path.stat().st_size
    with gzip.open(path, "rb") as f:
      shape = _idx_header(f, path)
      size = math.prod(shape)
      if item_shape is not None and (len(shape) != 1 + len(item_shape)
                                     or shape[1:] != tuple(item_shape)):
        expected = f"(N, {', '.join(map(str, item_shape))})" if item_shape else "(N,)"
        raise ValueError(f"{path}: IDX header declares shape {shape}; expected {expected}")
      if shape and shape[0] > max_items:
        raise ValueError(f"{path}: IDX header declares shape {shape}: {shape[0]} items, "
                         f"more than the {max_items} allowed (10x the largest MNIST "
                         "file); refusing to allocate it")
      if size > _DEFLATE_MAX_RATIO * compressed:
        raise ValueError(f"{path}: IDX header declares shape {shape} ({size} bytes), "
                         f"more than a {compressed}-byte gzip file can hold: corrupt")
      out = np.empty(size, np.uint8)
      view, got = memoryview(out), 0
      while got < size:
        n = f.readinto(view[got:got + _CHUNK])
        if not n:
          raise ValueError(f"{path}: IDX header declares shape {shape} ({size} bytes) "
                           f"but the file holds {got}: truncated or corrupt")
        got += n
      if f.read(1):
        raise ValueError(f"{path}: IDX header declares shape {shape} ({size} bytes) "
                         "but the file holds more: corrupt")
  except _STREAM_ERRORS as e:
    raise ValueError(f"{path}: truncated or corrupt gzip file ({e})") from e
  return out.reshape(shape)


def read_idx_folder(folder: pathlib.Path) -> Splits:
  """Reads the four MNIST-format files :data:`IDX_FILES` from ``folder``.

  Images must be ``[N, 28, 28]`` and labels ``[N]``, with at most
  :data:`IDX_MAX_ITEMS` items each.
  """
  arrays = [read_idx(folder / name, item_shape)
            for name, item_shape in zip(IDX_FILES, ((28, 28), (), (28, 28), ()))]
  for images, labels in ((0, 1), (2, 3)):
    if len(arrays[images]) != len(arrays[labels]):
      raise ValueError(f"{folder}: {IDX_FILES[images]} holds {len(arrays[images])} "
                       f"images but {IDX_FILES[labels]} {len(arrays[labels])} labels")
  return Splits(arrays[0][..., None], arrays[1].astype(np.int32),
                arrays[2][..., None], arrays[3].astype(np.int32))


class TarCaps(NamedTuple):
  """Limits on a tar archive, checked from its headers before anything is read.

  Attributes:
    member_bytes: the largest regular file (or long-name / pax header) accepted.
    total_bytes: the most bytes of members read, all together.
    members: the most members (files and folders) accepted.
  """
  member_bytes: int
  total_bytes: int
  members: int


# cifar10-jpeg.tar.gz: 60022 members: 60000 JPEGs of 692-1124 bytes (55 MB in all)
# and 22 folders. The worst 32x32 RGB JPEG, random noise at quality 100 without
# chroma subsampling, is 4851 bytes: 64 KiB per member leaves room for metadata,
# 320 MiB in all is 5.5 KiB per image, and twice the members allows extra folders.
CIFAR_JPEG_CAPS = TarCaps(member_bytes=64 << 10, total_bytes=320 << 20, members=120_000)
# cifar-10-python.tar.gz: 6 batches of 31.0 MB (10000 x 3072 pixels pickled by
# Python 2), a 158-byte batches.meta, an 88-byte readme.html and a folder. 64 MiB
# also holds a batch re-pickled by Python 3 at protocol 2, where a byte >= 0x80
# takes two; only the 6 batches are read.
CIFAR_PYTHON_CAPS = TarCaps(member_bytes=64 << 20, total_bytes=6 * (64 << 20), members=100)
# Long-name and pax headers that tarfile reads whole while it parses the archive.
_TAR_META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                   tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_TAR_META_BYTES = 64 << 10


class _Refused(Exception):
  """A tar header refused by :class:`_CappedTarInfo`; the message lacks the path."""


class _CappedTarInfo(tarfile.TarInfo):
  """Refuses oversized long-name and pax headers, and sparse members, as tarfile
  parses them: tarfile reads such a header whole, and a sparse map into a list,
  before the member reaches :func:`_safe_members`."""

  def _proc_member(self, tar):  # pylint: disable=arguments-renamed
    if self.type in _TAR_META_TYPES and self.size > _TAR_META_BYTES:
      raise _Refused(f"a {'pax' if self.type in b'xgX' else 'long-name'} header of "
                     f"{self.size} bytes (at most {_TAR_META_BYTES})")
    if self.type == tarfile.GNUTYPE_SPARSE:
      raise _Refused(f"member {self.name!r} is a sparse file")
    return super()._proc_member(tar)

  def _proc_gnusparse_10(self, next, pax_headers, tar):  # pylint: disable=redefined-builtin
    raise _Refused(f"member {next.name!r} is a sparse file")


def _safe_members(tar: tarfile.TarFile, path: pathlib.Path,
                  caps: TarCaps) -> Iterator[tarfile.TarInfo]:
  """The regular files of ``tar``; refuses links, special, sparse, oversized files,
  escaping paths and more than ``caps.members`` members."""
  for count, member in enumerate(tar, 1):
    if count > caps.members:
      raise ValueError(f"{path}: refusing archive: more than {caps.members} members")
    if member.issym() or member.islnk():
      raise ValueError(f"{path}: refusing archive: member {member.name!r} is a link to "
                       f"{member.linkname!r}")
    parts = pathlib.PurePosixPath(member.name).parts
    if member.name.startswith(("/", "\\")) or ".." in parts:
      raise ValueError(f"{path}: refusing archive: member {member.name!r} escapes the "
                       "archive root")
    if not (member.isfile() or member.isdir()) or member.issparse():
      raise ValueError(f"{path}: refusing archive: member {member.name!r} is not a "
                       "regular file or folder")
    if member.isfile() and member.size > caps.member_bytes:
      raise ValueError(f"{path}: refusing archive: member {member.name!r} is "
                       f"{member.size} bytes, more than the {caps.member_bytes} allowed")
    if member.isfile():
      yield member


def _read_tar(path: pathlib.Path, caps: TarCaps,
              wanted: Callable[[tuple[str, ...]], bool] = lambda parts: True,
              ) -> Iterator[tuple[tuple[str, ...], bytes]]:
  """Yields ``(path parts, content)`` of the ``wanted`` regular files in a .tar.gz.

  Every member is checked against ``caps`` from its header before it is read; the
  members not ``wanted`` are checked and skipped, never read.
  """
  total = 0
  try:
    with tarfile.open(path, "r:gz", tarinfo=_CappedTarInfo) as tar:
      for member in _safe_members(tar, path, caps):
        parts = pathlib.PurePosixPath(member.name).parts
        if not wanted(parts):
          continue
        total += member.size
        if total > caps.total_bytes:
          raise ValueError(f"{path}: refusing archive: its members hold more than "
                           f"{caps.total_bytes} bytes")
        data = tar.extractfile(member).read(member.size)
        if len(data) != member.size:
          raise ValueError(f"{path}: member {member.name!r} is cut short: truncated "
                           "archive")
        yield parts, data
  except _Refused as e:
    raise ValueError(f"{path}: refusing archive: {e}") from None
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
  per-image Python overhead, so a thread pool measured no faster on 2 cores (about
  20 s for the 60,000 images); a progress bar shows on stderr when it is a terminal.

  Args:
    path: the ``.tar.gz`` archive.

  Returns:
    The train and test splits.

  Raises:
    ValueError: the archive is damaged or unsafe, holds an unexpected member or
      class, or a JPEG does not decode to 32x32 RGB.
  """
  entries: dict[str, list[tuple[int, int, str, bytes]]] = {"train": [], "test": []}
  for parts, data in _read_tar(path, CIFAR_JPEG_CAPS):
    member = "/".join(parts)
    if (len(parts) != 3 or parts[0] not in entries or parts[1] not in CIFAR10_CLASSES
        or not parts[2].endswith(".jpg") or not parts[2][:-4].isdigit()):
      raise ValueError(f"{path}: unexpected member {member!r}; expected "
                       f"train|test/<class>/NNNN.jpg with class in {CIFAR10_CLASSES}")
    entries[parts[0]].append((CIFAR10_CLASSES.index(parts[1]), int(parts[2][:-4]),
                              member, data))
  arrays = []
  with tqdm(total=sum(map(len, entries.values())), desc="decoding CIFAR-10 JPEGs",
            unit="img", file=sys.stderr, disable=None, leave=False) as bar:
    for split, items in entries.items():
      if not items:
        raise ValueError(f"{path}: no {split}/<class>/NNNN.jpg members")
      items.sort(key=lambda item: item[:2])
      images = np.empty((len(items), *_CIFAR_SHAPE), np.uint8)
      for i, (_, _, member, data) in enumerate(items):
        images[i] = _decode_jpeg(data, f"{path}: {member}")
        if i % 1000 == 999:
          bar.update(1000)
      bar.update(len(items) % 1000)
      arrays += [images, np.array([item[0] for item in items], np.int32)]
  return Splits(*arrays)


def _latin1_bytes(text: object, encoding: object = "latin1") -> bytes:
  """What a pickle's ``_codecs.encode(text, "latin1")`` call may do here: rebuild
  bytes from their latin-1 text (how Python 3 pickles bytes at protocols 0-2).
  Anything else (another codec, a non-str argument) is refused."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError(
        f"refusing to unpickle _codecs.encode of a {type(text).__name__} with encoding "
        f"{encoding!r}: only str with 'latin1' (pickled bytes) is accepted")
  return text.encode("latin-1")


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles plain containers and numpy arrays only: a pickle can run code."""
  _ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
              ("numpy", "dtype")}

  def find_class(self, module: str, name: str):
    # Python 3 pickles bytes at protocols 0-2 as _codecs.encode(text, "latin1"): a
    # function of ours that does only that stands in for the real one.
    if (module, name) == ("_codecs", "encode"):
      return _latin1_bytes
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
  files: dict[str, bytes] = {}
  wanted = lambda parts: (len(parts) == 2 and parts[0] == "cifar-10-batches-py"
                          and parts[1] in CIFAR10_BATCHES)
  for parts, data in _read_tar(path, CIFAR_PYTHON_CAPS, wanted):
    if parts[1] in files:
      raise ValueError(f"{path}: refusing archive: member {'/'.join(parts)!r} appears "
                       "twice")
    files[parts[1]] = data
  return _cifar_batches(files, str(path))


def read_cifar10_python_folder(folder: pathlib.Path) -> Splits:
  """Reads the extracted ``cifar-10-batches-py/`` folder; see the archive reader."""
  return _cifar_batches({name: _read_capped(folder / name, CIFAR_PYTHON_CAPS.member_bytes)
                         for name in CIFAR10_BATCHES if (folder / name).is_file()},
                        str(folder))


def _read_capped(path: pathlib.Path, cap: int) -> bytes:
  """A file's bytes; refuses one larger than ``cap`` before reading it."""
  with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    data = f.read(cap + 1) if size <= cap else b""
  if size > cap or len(data) > cap:
    raise ValueError(f"{path}: {max(size, len(data))} bytes, more than the {cap} a "
                     "CIFAR-10 batch can be")
  return data
