"""Finds a dataset's source (offline files or tfds), decodes it once and caches it.

See the :mod:`jcompress.data` docstring for the sources, their order and the
environment variables.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import logging
import math
import os
import pathlib
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from jcompress import atomic, caches
from jcompress.data import order, readers, specs, user
from jcompress.data.moving_mnist import make_moving_mnist

DATA_DIR_ENV = "JCOMPRESS_DATA_DIR"
CACHE_DIR_ENV = caches.ROOT_ENV
TFDS_DOWNLOAD_ENV = "JCOMPRESS_TFDS_DOWNLOAD"
# Bump when decoding changes, so that caches written by older code are not read.
_CACHE_VERSION = 2  # 2: splits stored in order.mixed_order
# The original MNIST files' sizes, in readers.IDX_FILES order (shared/data/README.md):
# IDX files cannot say which dataset they hold, and Fashion-MNIST uses the same names.
_MNIST_SIZES = (9912422, 28881, 1648877, 4542)
SAMPLE_FILE = "mnist_sample.npz"
_LOG = logging.getLogger(__name__)


class Dataset(NamedTuple):
  """A loaded dataset: uint8 ``[N, H, W, C]`` images and int32 ``[N]`` labels.

  Attributes:
    name: the dataset's name (see :func:`jcompress.data.names`).
    train_images: training images, uint8 ``[N, H, W, C]``.
    train_labels: training labels, int32 ``[N]``.
    test_images: test images, uint8 ``[M, H, W, C]``.
    test_labels: test labels, int32 ``[M]``.
    num_classes: number of classes.
    source: where the arrays came from (files or tfds), for logs and reports.
  """
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  source: str


class _Unavailable(Exception):
  """A source that does not hold the dataset here; the message says why."""


class _Found(NamedTuple):
  description: str
  key_files: tuple[pathlib.Path, ...]  # their path, size and mtime key the cache
  read: Callable[[], readers.Splits]


def _expected_files(name: str, root: str) -> str:
  if name == "cifar10":
    return (f"{root}/cifar10/cifar-10-batches-py/ (extracted original), "
            f"{root}/cifar10/cifar-10-python.tar.gz (original) or "
            f"{root}/cifar10/cifar10-jpeg.tar.gz (image folders "
            "{train,test}/<class>/NNNN.jpg), or the same directly in " + root)
  return (f"{root}/{name}/{{{','.join(readers.IDX_FILES)}}} "
          f"(or the four files directly in {root})")


def _offline(name: str, root: pathlib.Path) -> _Found:
  if not root.is_dir():
    raise _Unavailable(f"data directory {root} does not exist")
  if name == "cifar10":
    for folder in (root / "cifar10", root):
      if (folder / "cifar-10-batches-py").is_dir():
        batches = folder / "cifar-10-batches-py"
        return _Found(f"offline CIFAR-10 python batches {batches}",
                      tuple(batches / f for f in readers.CIFAR10_BATCHES
                            if (batches / f).is_file()),
                      functools.partial(readers.read_cifar10_python_folder, batches))
      for archive, reader, kind in (
          ("cifar-10-python.tar.gz", readers.read_cifar10_python_tar, "python batches"),
          ("cifar10-jpeg.tar.gz", readers.read_cifar10_jpeg, "(JPEG copy)")):
        if (folder / archive).is_file():
          return _Found(f"offline CIFAR-10 {kind} {folder / archive}", (folder / archive,),
                        functools.partial(reader, folder / archive))
  else:
    for folder in (root / name, root):
      files = tuple(folder / f for f in readers.IDX_FILES)
      if all(f.is_file() for f in files):
        if name == "fashion_mnist" and tuple(f.stat().st_size for f in files) == _MNIST_SIZES:
          raise ValueError(f"{folder} holds the original MNIST files, not Fashion-MNIST; "
                           "point data_dir (--data-dir) at the folder holding fashion_mnist/")
        return _Found(f"offline IDX files in {folder}", files,
                      functools.partial(readers.read_idx_folder, folder))
  raise _Unavailable(f"found none of {_expected_files(name, str(root))}")


def read_offline(name: str, data_dir: str | os.PathLike) -> tuple[readers.Splits, str]:
  """The arrays of ``name``'s offline files in ``data_dir`` in the files' own order
  (not mixed, not cached), checked, and their description.

  Raises:
    FileNotFoundError: ``data_dir`` holds no files of ``name``.
  """
  try:
    found = _offline(name, pathlib.Path(data_dir))
  except _Unavailable as e:
    raise FileNotFoundError(f"{name}: {e}") from None
  splits = found.read()
  _check(name, splits, found.description)
  return splits, found.description


def _tfds_splits(sources: Sequence[Sequence[Mapping[str, Any]]]) -> readers.Splits:
  """Stacks the examples of tfds's train and test data sources."""
  arrays = []
  for source in sources:
    examples = list(source)
    arrays += [np.stack([np.asarray(e["image"], np.uint8) for e in examples]),
               np.array([e["label"] for e in examples], np.int32)]
  return readers.Splits(*arrays)


def _tfds(name: str) -> _Found:
  download = os.environ.get(TFDS_DOWNLOAD_ENV, "0")
  if download not in ("0", "1"):
    raise ValueError(f"{TFDS_DOWNLOAD_ENV} must be 0 or 1, got {download!r}")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
  try:
    # What tfds.data_source does, in steps: its download=False returns {} for an
    # unprepared dataset instead of failing. tfds reads TFDS_DATA_DIR once at
    # import; reading it here lets it change.
    builder = tfds.builder(name, data_dir=os.environ.get("TFDS_DATA_DIR") or None,
                           file_format="array_record")
    if not builder.is_prepared():
      if download == "0":
        raise _Unavailable(f"not prepared in {builder.data_dir}; set {TFDS_DOWNLOAD_ENV}=1 "
                           "to let tfds download and prepare it (needs internet and "
                           "TensorFlow)")
      builder.download_and_prepare()
    sources = builder.as_data_source(split=["train", "test"])
  except _Unavailable:
    raise
  except Exception as e:  # any tfds failure: recorded, and reported if nothing works
    raise _Unavailable(f"{type(e).__name__}: {e}") from e
  return _Found(f"tfds {name}:{builder.version} in {builder.data_dir}",
                (pathlib.Path(builder.data_dir) / "dataset_info.json",),
                functools.partial(_tfds_splits, sources))


def _cache_path(cache_dir: pathlib.Path, name: str, found: _Found) -> pathlib.Path:
  key = hashlib.sha256(f"{_CACHE_VERSION}|{name}|{found.description}".encode())
  for f in found.key_files:
    stat = f.stat()
    key.update(f"|{f.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
  stem = name.split(":", 1)[0] if ":" in name else name  # npz:PATH -> npz, tfds:.. -> tfds
  return cache_dir / f"{stem}-{key.hexdigest()[:16]}.npz"


def _shape_text(item_shape: tuple[int, ...]) -> str:
  """``(N, 28, 28, 1)``, or ``(N,)`` for labels."""
  return f"(N, {', '.join(map(str, item_shape))})" if item_shape else "(N,)"


def _npz_layout(npz: zipfile.ZipFile, file_size: int, name: str,
                spec: specs.DatasetSpec | None = None) -> None:
  """Checks each ``.npy`` header of a cache before numpy allocates what it claims.

  Raises:
    ValueError: another set of members, a dtype or shape that is not the dataset's,
      or a size that does not fit the member or the file (the message lacks the path).
  """
  spec = spec or specs.spec(name)
  expected = sorted(f"{field}.npy" for field in readers.Splits._fields)
  if sorted(npz.namelist()) != expected:
    raise ValueError(f"holds {sorted(npz.namelist())}, expected {expected}")
  for info in npz.infolist():
    field = info.filename[:-len(".npy")]
    images = field.endswith("images")
    # np.savez stores members uncompressed: a member can never hold more than the file.
    if info.file_size > file_size:
      raise ValueError(f"{info.filename} claims {info.file_size} bytes, more than the "
                       f"file's {file_size}")
    with npz.open(info) as f:
      version = np.lib.format.read_magic(f)
      if version not in ((1, 0), (2, 0)):
        raise ValueError(f"{info.filename}: unsupported .npy version {version}")
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, fortran, dtype = read_header(f)
      offset = f.tell()
    want_dtype = np.dtype(np.uint8 if images else np.int32)
    item_shape = spec.image_shape if images else ()
    if dtype != want_dtype or fortran or tuple(shape[1:]) != item_shape or not shape:
      raise ValueError(f"{info.filename} is {dtype} {shape}"
                       f"{' (Fortran order)' if fortran else ''}, expected {want_dtype} "
                       f"{_shape_text(item_shape)}")
    if offset + math.prod(shape) * dtype.itemsize != info.file_size:
      raise ValueError(f"{info.filename}: shape {shape} needs "
                       f"{math.prod(shape) * dtype.itemsize} bytes but the member holds "
                       f"{info.file_size - offset}")


def _read_cache(path: pathlib.Path, name: str,
                spec: specs.DatasetSpec | None = None) -> readers.Splits:
  """Reads and checks a cache file like a source: layout, shapes, counts, labels.

  Each ``.npy`` header is checked against the dataset's spec and the file's size
  before anything is allocated; then the arrays are checked as decoded data is
  (:func:`_check`). Arrays are loaded with ``allow_pickle=False``.

  Raises:
    ValueError: the cache is unreadable or invalid; the message names the file.
  """
  try:
    with open(path, "rb") as f:
      with zipfile.ZipFile(f) as npz:
        _npz_layout(npz, os.fstat(f.fileno()).st_size, name, spec)
      f.seek(0)
      with np.load(f, allow_pickle=False) as npz:
        splits = readers.Splits(*(npz[k] for k in readers.Splits._fields))
  except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f"cache file {path}: {e}") from e
  _check(name, splits, f"cache file {path}", spec)
  return splits


def _write_cache(path: pathlib.Path, splits: readers.Splits) -> None:
  """Writes atomically (:mod:`jcompress.atomic`): a crash leaves either no file or
  the whole file, and no symlink in the cache folder is followed."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic.atomic_open(path, "wb") as f:
    np.savez(f, **splits._asdict())


def _check(name: str, splits: readers.Splits, source: str,
           spec: specs.DatasetSpec | None = None) -> None:
  """Checks decoded arrays (fresh or from the cache) against the dataset's spec.

  Raises:
    ValueError: a split is empty, images are not uint8 of the spec's shape, labels
      are not int32, one per image, in ``[0, num_classes)``; names ``source``.
  """
  spec = spec or specs.spec(name)
  for split in ("train", "test"):
    images, labels = getattr(splits, f"{split}_images"), getattr(splits, f"{split}_labels")
    if images.dtype != np.uint8 or images.shape[1:] != spec.image_shape:
      raise ValueError(f"{source}: {split} images are {images.dtype} {images.shape[1:]}, "
                       f"expected uint8 {spec.image_shape}")
    if not len(images):
      raise ValueError(f"{source}: no {split} images")
    if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
      raise ValueError(f"{source}: {split} labels are {labels.dtype} {labels.shape}, "
                       f"expected int32 ({len(images)},): one per image")
    bad = (labels < 0) | (labels >= spec.num_classes)
    if bad.any():
      i = int(np.argmax(bad))
      raise ValueError(f"{source}: {split} label {i} is {labels[i]}, outside "
                       f"[0, {spec.num_classes})")


def _mixed(splits: readers.Splits) -> readers.Splits:
  """Each split in its class-mixed, content-determined order (:mod:`order`)."""
  train = order.mixed_order(splits.train_images, splits.train_labels)
  test = order.mixed_order(splits.test_images, splits.test_labels)
  return readers.Splits(splits.train_images[train], splits.train_labels[train],
                        splits.test_images[test], splits.test_labels[test])


def _load_sample() -> Dataset:
  resource = importlib.resources.files("jcompress.data") / "sample" / SAMPLE_FILE
  if not resource.is_file():
    raise FileNotFoundError(f"embedded sample {resource} is missing; rebuild it with "
                            "`python -m jcompress.data.make_sample --data-dir DIR`")
  with resource.open("rb") as f, np.load(f, allow_pickle=False) as npz:
    splits = _mixed(readers.Splits(*(npz[k] for k in readers.Splits._fields)))
  return Dataset("mnist_sample", *splits, num_classes=10,
                 source=f"embedded sample {resource} (first 2000 train / 500 test MNIST)")


def _through_cache(name: str, found: _Found, cache_dir: pathlib.Path, verbose: bool,
                   spec: specs.DatasetSpec | None = None) -> readers.Splits:
  """``found``'s splits, checked and class-mixed: from the cache when it holds them
  (see :func:`load`), else decoded and cached."""
  path = _cache_path(cache_dir, name, found)
  start = time.perf_counter()
  splits = None
  if path.is_file():
    try:
      splits = _read_cache(path, name, spec)
      how = f"cache hit {path}"
    except ValueError as e:
      _LOG.warning("data: %s; discarding it and decoding %s again", e,
                   found.description)
  if splits is None:
    if verbose:
      print(f"data: {name}: decoding {found.description} (once: later runs read the "
            "cache)...", flush=True)
    splits = found.read()
    _check(name, splits, found.description, spec)
    splits = _mixed(splits)
    try:
      _write_cache(path, splits)
      how = f"decoded and cached at {path}"
    except (OSError, ValueError) as e:
      _LOG.warning("data: could not write cache file %s (%s); continuing without it",
                   path, e)
      how = "decoded, not cached"
  if verbose:
    print(f"data: {name} from {found.description}: {how} "
          f"({time.perf_counter() - start:.1f} s)")
  return splits


def _load_user(name: str, cache_dir: str | os.PathLike | None,
               verbose: bool) -> Dataset:
  """``load`` of a user dataset (:mod:`jcompress.data.user`): headers first, then
  decoded through the cache like the other sources."""
  located = user.locate(name)
  spec = specs.DatasetSpec(name, located.image_shape, located.num_classes, (), (), False)
  found = _Found(located.description, located.key_files, located.read)
  splits = _through_cache(name, found, pathlib.Path(cache_dir) if cache_dir else caches.root(),
                          verbose, spec)
  return Dataset(name, *splits, num_classes=located.num_classes, source=located.description)


def user_spec(name: str) -> specs.DatasetSpec:
  """The :class:`~specs.DatasetSpec` of a user dataset: its shape and classes, the
  mean and standard deviation per channel of its training split (std at least
  1/255), no augmentation by default. Loads it (through the cache) once a process
  while PATH's own size and mtime stay the same.
  """
  try:
    stat = pathlib.Path(name.split(":", 1)[1]).expanduser().stat()
    key = (stat.st_size, stat.st_mtime_ns)
  except OSError:
    key = None  # missing: load says so
  return _user_spec(name, key)


@functools.lru_cache(maxsize=8)
def _user_spec(name: str, key: tuple[int, int] | None) -> specs.DatasetSpec:
  del key  # part of the lru_cache key only
  ds = load(name, verbose=False)
  mean, std = user.statistics(ds.train_images)
  return specs.DatasetSpec(name, ds.train_images.shape[1:], ds.num_classes, mean,
                           tuple(max(s, 1 / 255) for s in std), augment=False)


def load(name: str, data_dir: str | os.PathLike | None = None, *,
         cache_dir: str | os.PathLike | None = None, verbose: bool = True) -> Dataset:
  """Loads dataset ``name`` from the first source that has it, through the cache.

  Args:
    name: one of :func:`jcompress.data.names`, ``npz:PATH`` / ``folder:PATH``, or
      ``tfds:NAME[;options]`` (:mod:`jcompress.data.tfds_generic`).
    data_dir: the offline data directory (CLI ``--data-dir``); defaults to
      ``$JCOMPRESS_DATA_DIR``. When set it is tried before tfds. Unused by
      ``mnist_sample``, which ships inside the package.
    cache_dir: where decoded arrays are kept; defaults to jcompress's cache folder
      (:func:`jcompress.caches.root`: ``$JCOMPRESS_CACHE_DIR``, then
      ``$XDG_CACHE_HOME/jcompress``, then ``~/.cache/jcompress``).
    verbose: print the source used, whether the cache was hit and, before a decode
      (CIFAR-10's JPEGs take about 20 s), that it starts.

  The cache is checked when read as a source is (each ``.npy`` header against the
  spec and the file's size before allocating, then dtypes, shapes, non-empty
  splits, one label per image, labels in ``[0, num_classes)``; never unpickled).
  A cache file that fails is discarded with a logged warning naming it and why,
  and the dataset is decoded again from the source (which the cache key says is
  unchanged) and re-cached. A cache that cannot be written (read-only or full
  disk, the cache folder a file) is a warning too: the decoded arrays are
  returned uncached. Arrays that fail the checks (an empty split, say) are an
  error and are never cached.

  Returns:
    The dataset's arrays and where they came from.

  Raises:
    ValueError: unknown ``name``, or a source's files are corrupt or unsafe.
    FileNotFoundError: no source holds the dataset; says what was tried and
      which files are expected where.

  >>> ds = load("mnist_sample", verbose=False)
  >>> ds.train_images.shape, ds.test_labels.dtype
  ((2000, 28, 28, 1), dtype('int32'))
  """
  if user.is_user(name):
    return _load_user(name, cache_dir, verbose)
  if specs.is_tfds(name):  # any tfds image-classification dataset
    from jcompress.data import tfds_generic  # pylint: disable=import-outside-toplevel
    return tfds_generic.load(name, data_dir, cache_dir=cache_dir, verbose=verbose)
  spec = specs.spec(name)
  if name == "mnist_sample":
    return _load_sample()
  if name == "moving_mnist":  # derived from MNIST, generated in about a second
    mnist = load("mnist", data_dir, cache_dir=cache_dir, verbose=verbose)
    train = make_moving_mnist(mnist.train_images, mnist.train_labels, seed=0)
    test = make_moving_mnist(mnist.test_images, mnist.test_labels, seed=1)
    return Dataset(name, *train, *test, spec.num_classes,
                   f"generated from {mnist.source}")
  data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
  cache_dir = pathlib.Path(cache_dir) if cache_dir else caches.root()
  tried = []
  if data_dir:
    root = pathlib.Path(data_dir).expanduser()
    sources = [(f"offline {root}", functools.partial(_offline, name, root))]
  else:
    sources = []
    tried.append(f"offline: skipped, no data_dir given and ${DATA_DIR_ENV} unset")
  sources.append(("tfds", functools.partial(_tfds, name)))
  for label, locate in sources:
    try:
      found = locate()
    except _Unavailable as e:
      tried.append(f"{label}: {e}")
      if verbose:
        print(f"data: {name}: {label} unavailable: {e}")
      continue
    splits = _through_cache(name, found, cache_dir, verbose)
    return Dataset(name, *splits, num_classes=spec.num_classes, source=found.description)
  raise FileNotFoundError(
      f"no source holds dataset {name!r}. Tried:\n  " + "\n  ".join(tried) +
      f"\nDownload the standard files and pass data_dir= (CLI: --data-dir DIR) or set "
      f"{DATA_DIR_ENV}=DIR, where DIR holds " + _expected_files(name, "DIR"))
