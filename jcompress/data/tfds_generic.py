"""Any tfds image-classification dataset by name, read offline from tfds's data dir.

``jcompress train --dataset cifar100`` (or ``svhn_cropped``, ``imagenette/160px``,
``tf_flowers``, ...) reads the dataset that tfds has prepared, as ``array_record``
files, in its data directory: ``--data-dir`` (``data_dir=``), else
``$TFDS_DATA_DIR``, else the folder this dataset's spec was first computed from,
else ``~/tensorflow_datasets``. Nothing is downloaded: a dataset that is not
prepared there is an error saying so. TensorFlow is not needed.

Everything a model and the pipeline need comes from the builder's info: the image
shape (``features['image'].shape``), the classes (``features['label']``: a
``ClassLabel``), and the mean and standard deviation per channel from one pass over
the training split, kept in jcompress's cache folder (:func:`jcompress.caches.root`)
with the decoded arrays. A dataset's name as jcompress records it is canonical,
``tfds:NAME`` followed by its non-default options (``;train=SPLIT``,
``;test=SPLIT``, ``;size=HxW``), so a run's ``config.json`` says what it read and
``eval`` / ``compress --from`` read the same.

Decoded splits that fit in :data:`STREAM_ENV` bytes (default 2 GiB) are decoded
once into the cache like the other datasets (:mod:`jcompress.data.sources`). Larger
ones are streamed: only labels and the example order are cached, and the images
are :class:`StreamedImages`, read from the ``array_record`` files on demand (random
access through ``tfds.data_source``) in the same class-mixed order
(:func:`jcompress.data.order.mixed_order`), so batches are those of the in-memory
path; :func:`jcompress.data.batches` reads only this process's rows of each batch,
in its prefetch thread.

>>> canonical("cifar100", train_split="train[:90%]", image_size=(64, 64))
'tfds:cifar100;train=train[:90%];size=64x64'
>>> parse("tfds:cifar100;size=64x64").image_size
(64, 64)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pathlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from jcompress import atomic, caches
from jcompress.data import order, readers, sources, specs, user

PREFIX = "tfds:"
STREAM_ENV = "JCOMPRESS_STREAM_BYTES"
STREAM_DEFAULT = 2 << 30
_NAME = re.compile(r"[a-z][a-z0-9_]*(/[A-Za-z0-9_.\-]+)?(:[0-9]+\.[0-9]+\.[0-9]+)?")
_KEYS = {"train": "train_split", "test": "test_split", "size": "image_size"}
_VERSION = 1  # of the spec and stream-index cache files
_CHUNK = 256  # records read at a time
_DATA_DIRS: dict[str, str] = {}  # name -> the data dir this process was given
_LOG = logging.getLogger(__name__)


class Options(NamedTuple):
  """A parsed ``tfds:`` name: the tfds name and the options (None: the default)."""
  name: str
  train_split: str | None = None
  test_split: str | None = None
  image_size: tuple[int, int] | None = None


def image_size(text: str) -> tuple[int, int]:
  """``--image-size``: ``N`` or ``HxW``, positive.

  >>> image_size("64"), image_size("32x48")
  ((64, 64), (32, 48))
  """
  parts = text.lower().split("x")
  if len(parts) in (1, 2) and all(p.isdigit() and int(p) > 0 for p in parts):
    return (int(parts[0]), int(parts[-1]))
  raise ValueError(f"--image-size must be N or HxW with positive integers, got {text!r}")


def parse(name: str) -> Options:
  """The tfds name and options of canonical ``name`` (``tfds:NAME;key=value...``).

  Raises:
    ValueError: not a ``tfds:`` name, or a malformed name or option.
  """
  if not specs.is_tfds(name):
    raise ValueError(f"{name!r} is not a tfds dataset name ({PREFIX}NAME)")
  base, *options = name[len(PREFIX):].split(";")
  if not _NAME.fullmatch(base):
    raise ValueError(f"dataset {name!r}: {base!r} is not a tfds name (like cifar100, "
                     "imagenette/160px or mnist:3.0.1)")
  values: dict[str, Any] = {}
  for option in options:
    key, sep, value = option.partition("=")
    if not sep or key not in _KEYS or not value or _KEYS[key] in values:
      raise ValueError(f"dataset {name!r}: bad option {option!r} (expected "
                       "train=SPLIT, test=SPLIT or size=HxW, each once)")
    values[_KEYS[key]] = image_size(value) if key == "size" else value
  return Options(base, **values)


def canonical(name: str, train_split: str | None = None, test_split: str | None = None,
              image_size: tuple[int, int] | None = None) -> str:  # pylint: disable=redefined-outer-name
  """The canonical name of tfds dataset ``name`` (bare or ``tfds:...``) with these
  options, each overriding the one ``name`` holds."""
  opts = parse(name if specs.is_tfds(name) else PREFIX + name)
  opts = opts._replace(**{k: v for k, v in (("train_split", train_split),
                                            ("test_split", test_split),
                                            ("image_size", image_size)) if v is not None})
  text = PREFIX + opts.name
  for key, value in (("train", opts.train_split), ("test", opts.test_split)):
    if value is not None:
      if ";" in value or not value.strip():
        raise ValueError(f"--{key}-split {value!r} is not a tfds split")
      text += f";{key}={value}"
  if opts.image_size is not None:
    text += f";size={opts.image_size[0]}x{opts.image_size[1]}"
  return text


def stream_limit() -> int:
  """Bytes of decoded images above which a dataset is streamed (``$JCOMPRESS_STREAM_BYTES``)."""
  text = os.environ.get(STREAM_ENV, "").strip()
  if not text:
    return STREAM_DEFAULT
  if not text.isdigit():
    raise ValueError(f"${STREAM_ENV} must be a number of bytes, got {text!r}")
  return int(text)


class _Prepared(NamedTuple):
  """What the builder's info says about a canonical name, checked."""
  opts: Options
  builder: Any
  image_key: str
  label_key: str
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]
  splits: tuple[str, str]
  counts: tuple[int, int]
  info_file: pathlib.Path
  description: str

  @property
  def decoded_bytes(self) -> int:
    return sum(self.counts) * int(np.prod(self.image_shape))


def _spec_file(name: str) -> pathlib.Path:
  return caches.root() / f"tfds-spec-{hashlib.sha256(name.encode()).hexdigest()[:16]}.json"


def _cached_spec(name: str) -> dict | None:
  try:
    saved = json.loads(_spec_file(name).read_text())
  except (OSError, ValueError):
    return None
  ok = isinstance(saved, dict) and saved.get("version") == _VERSION and saved.get("name") == name
  return saved if ok else None


def _root(name: str, data_dir: str | os.PathLike | None) -> str:
  """The tfds data dir to read ``name`` from (module docstring)."""
  saved = _cached_spec(name) or {}
  chosen = (data_dir or _DATA_DIRS.get(name) or os.environ.get("TFDS_DATA_DIR")
            or saved.get("data_dir") or "~/tensorflow_datasets")
  return os.path.abspath(os.path.expanduser(os.fspath(chosen)))


def _unknown(base: str) -> ValueError:
  return ValueError(f"unknown dataset {base!r}; valid datasets: {', '.join(specs.names())}, "
                    "npz:PATH, folder:PATH, or any tfds image-classification dataset "
                    f"(tfds knows no {base!r})")


def _split(builder, split: str, option: str) -> int:
  """The number of examples of ``split``, which must parse and be non-empty."""
  try:
    count = builder.info.splits[split].num_examples
  except (ValueError, KeyError, AssertionError, TypeError) as e:
    reason = str(e).strip("'\"").splitlines()[-1]
    raise ValueError(f"{option} {split!r} of {builder.name}: {reason} (splits: "
                     f"{', '.join(builder.info.splits)}; slices like train[:90%] work)"
                     ) from None
  if not count:
    raise ValueError(f"{option} {split!r} of {builder.name} holds no examples")
  return count


@functools.lru_cache(maxsize=16)
def _prepare(name: str, root: str) -> _Prepared:
  opts = parse(name)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError(f"dataset {name!r} is read through tensorflow-datasets, which is not "
                     "installed (a jcompress dependency): pip install tensorflow-datasets") from e
  try:
    builder = tfds.builder(opts.name, data_dir=root)
  except tfds.core.registered.DatasetNotFoundError:
    raise _unknown(opts.name) from None
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"tfds dataset {opts.name} is not prepared in {root}: prepare it once where there is "
        f"internet (tfds.builder({opts.name!r}, data_dir=DIR, file_format='array_record')"
        ".download_and_prepare()), then pass --data-dir DIR or set TFDS_DATA_DIR")
  info = builder.info
  if str(getattr(info.file_format, "value", info.file_format)) != "array_record":
    raise ValueError(f"tfds dataset {opts.name} in {root} is prepared as {info.file_format}, "
                     "which needs TensorFlow to read; prepare it with "
                     "file_format='array_record' (random access, no TensorFlow)")
  keys = info.supervised_keys
  image_key, label_key = (keys if isinstance(keys, tuple) and len(keys) == 2
                          and all(isinstance(k, str) for k in keys) else ("image", "label"))
  features = info.features
  image = features[image_key] if image_key in features else None
  label = features[label_key] if label_key in features else None
  if not (isinstance(image, tfds.features.Image) and isinstance(label, tfds.features.ClassLabel)
          and np.dtype(image.np_dtype) == np.uint8):
    raise ValueError(f"tfds dataset {opts.name} is not an image-classification dataset: it "
                     f"needs a uint8 Image feature and a ClassLabel (features: "
                     f"{', '.join(features)})")
  h, w, c = image.shape
  if c not in (1, 3):
    raise ValueError(f"tfds dataset {opts.name}: images have {c} channels; 1 or 3 are read")
  if opts.image_size is not None:
    h, w = opts.image_size
  elif h is None or w is None:
    raise ValueError(f"tfds dataset {opts.name}: images vary in size ({image.shape}); give "
                     "--image-size N or HxW to resize and center-crop them to one size")
  train = opts.train_split or "train"
  test = opts.test_split or "test"
  if opts.test_split is None and "test" not in info.splits:
    raise ValueError(f"tfds dataset {opts.name} has no 'test' split (splits: "
                     f"{', '.join(info.splits)}): give --test-split, e.g. validation, or "
                     "train[90%:] with --train-split train[:90%]")
  counts = (_split(builder, train, "--train-split"), _split(builder, test, "--test-split"))
  size = f", resized and center-cropped to {h}x{w}" if opts.image_size else ""
  return _Prepared(opts, builder, image_key, label_key, (h, w, c), tuple(label.names),
                   (train, test), counts, pathlib.Path(builder.data_dir) / "dataset_info.json",
                   f"tfds {opts.name}:{builder.version} in {builder.data_dir} "
                   f"(splits {train} / {test}{size})")


def check(name: str, data_dir: str | os.PathLike | None = None) -> None:
  """Checks ``name`` against its builder's info without decoding anything.

  Raises:
    ValueError: unknown name, not image classification, bad split, varying sizes
      without an image size.
    FileNotFoundError: the dataset is not prepared in the data dir.
  """
  _located(name, data_dir)


def _located(name: str, data_dir: str | os.PathLike | None):
  """``_prepare`` of ``name`` in its data dir, remembering a given ``data_dir``."""
  root = _root(name, data_dir)
  if data_dir:
    _DATA_DIRS[name] = root
  return _prepare(name, root)


def _fit(image: np.ndarray, shape: tuple[int, int, int], where: str) -> np.ndarray:
  """``image`` scaled to cover ``shape`` (bilinear) and center-cropped to it."""
  if image.ndim == 2:
    image = image[..., None]
  (h, w, c), (th, tw, tc) = image.shape, shape
  if c != tc:
    raise ValueError(f"{where}: an image has {c} channels, expected {tc}")
  if (h, w) == (th, tw):
    return image
  scale = max(th / h, tw / w)
  nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
  pil = Image.fromarray(image[..., 0] if c == 1 else image).resize((nw, nh), Image.BILINEAR)
  top, left = (nh - th) // 2, (nw - tw) // 2
  return np.asarray(pil).reshape(nh, nw, c)[top:top + th, left:left + tw]


def _reader(p: _Prepared, split: str) -> Callable[[Sequence[int]], tuple[np.ndarray, np.ndarray]]:
  """A function from record ids to (uint8 images of ``p.image_shape``, int32 labels)."""
  source = p.builder.as_data_source(split=split)
  resize = p.opts.image_size is not None

  def read(ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    records = source.__getitems__(list(ids)) if len(ids) else []
    images = np.empty((len(records), *p.image_shape), np.uint8)
    for i, record in enumerate(records):
      image = np.asarray(record[p.image_key], np.uint8)
      if resize:
        image = _fit(image, p.image_shape, p.description)
      elif image.shape != p.image_shape:
        raise ValueError(f"{p.description}: an image is {image.shape}, expected "
                         f"{p.image_shape}; give --image-size to resize")
      images[i] = image
    return images, np.array([r[p.label_key] for r in records], np.int32)
  read.count = len(source)  # type: ignore[attr-defined]
  return read


def _chunks(read) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  for start in range(0, read.count, _CHUNK):
    yield read(range(start, min(start + _CHUNK, read.count)))


def _read_all(p: _Prepared) -> readers.Splits:
  arrays = []
  for split in p.splits:
    parts = list(_chunks(_reader(p, split)))
    arrays += [np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])]
  return readers.Splits(*arrays)


class StreamedImages:
  """uint8 ``[N, H, W, C]`` images read on demand: row ``i`` is record ``order[i]`` of
  a tfds split. Indexing with an int, a slice or an index array returns a numpy
  array, as it would on the decoded array; nothing else is kept in memory."""
  dtype = np.dtype(np.uint8)
  ndim = 4

  def __init__(self, read, record_order: np.ndarray, image_shape: tuple[int, int, int]):
    self._read, self._order, self.shape = read, record_order, (len(record_order), *image_shape)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, index) -> np.ndarray:
    ids = self._order[index]
    if np.ndim(ids) == 0:
      return self._read([int(ids)])[0][0]
    return self._read(np.asarray(ids).tolist())[0]


def _stream_index(name: str, p: _Prepared, cache_dir: pathlib.Path, verbose: bool) -> dict:
  """Each split's record order (class-mixed, as the in-memory path's) and labels in
  that order, and the training split's statistics: one pass, cached."""
  stat = p.info_file.stat()
  key = hashlib.sha256(f"{_VERSION}|{name}|{p.description}|{p.info_file.resolve()}|"
                       f"{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
  path = cache_dir / f"tfds-stream-{key}.npz"
  fields = ("train_order", "train_labels", "test_order", "test_labels", "mean", "std")
  try:
    with np.load(path, allow_pickle=False) as npz:
      index = {k: npz[k] for k in fields}
    if all(len(index[f"{s}_order"]) == n for s, n in zip(("train", "test"), p.counts)):
      return index
  except (OSError, ValueError, KeyError, EOFError):
    pass
  if verbose:
    print(f"data: {name}: indexing {p.description} for streaming (once)...", flush=True)
  index, channels = {}, p.image_shape[-1]
  sums, squares, pixels = np.zeros(channels), np.zeros(channels), 0
  for split, tfds_split in zip(("train", "test"), p.splits):
    keys, labels = [], []
    for x, y in _chunks(_reader(p, tfds_split)):
      keys.append(order.mixed_keys(x, y))
      labels.append(y)
      if split == "train":
        flat = x.reshape(-1, channels).astype(np.float64) / 255
        sums, squares, pixels = sums + flat.sum(0), squares + (flat ** 2).sum(0), pixels + len(flat)
    record_order = np.argsort(np.concatenate(keys), kind="stable")
    index[f"{split}_order"] = record_order
    index[f"{split}_labels"] = np.concatenate(labels)[record_order]
  mean = sums / pixels
  index["mean"], index["std"] = mean, np.sqrt(np.maximum(squares / pixels - mean ** 2, 0))
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_open(path, "wb") as f:
      np.savez(f, **index)
  except OSError as e:
    _LOG.warning("data: could not write %s (%s); continuing without it", path, e)
  return index


def load(name: str, data_dir: str | os.PathLike | None = None, *,
         cache_dir: str | os.PathLike | None = None, verbose: bool = True) -> sources.Dataset:
  """``jcompress.data.load`` of a ``tfds:`` dataset (module docstring): decoded
  through the cache, or streamed when larger than :func:`stream_limit` bytes.

  Raises:
    ValueError: unknown name, not image classification, bad split, varying sizes
      without an image size.
    FileNotFoundError: the dataset is not prepared in the data dir.
  """
  p = _located(name, data_dir)
  cache = pathlib.Path(cache_dir) if cache_dir else caches.root()
  num_classes = len(p.class_names)
  if p.decoded_bytes > stream_limit():
    index = _stream_index(name, p, cache, verbose)
    images = [StreamedImages(_reader(p, split), index[f"{key}_order"], p.image_shape)
              for key, split in zip(("train", "test"), p.splits)]
    if verbose:
      print(f"data: {name}: streaming {p.description} ({p.decoded_bytes:,} bytes decoded, "
            f"over ${STREAM_ENV}={stream_limit():,})")
    return sources.Dataset(name, images[0], index["train_labels"], images[1],
                           index["test_labels"], num_classes, p.description + ", streamed")
  spec = specs.DatasetSpec(name, p.image_shape, num_classes, (), (), False)
  found = sources._Found(p.description, (p.info_file,),  # pylint: disable=protected-access
                         functools.partial(_read_all, p))
  splits = sources._through_cache(name, found, cache, verbose, spec)  # pylint: disable=protected-access
  return sources.Dataset(name, *splits, num_classes=num_classes, source=p.description)


def spec(name: str, data_dir: str | os.PathLike | None = None) -> specs.DatasetSpec:
  """The :class:`~jcompress.data.DatasetSpec` of a ``tfds:`` dataset: shape and classes
  from the builder's info, mean and std (at least 1/255) of its training split, no
  augmentation by default (``--augment``). Computed once and cached; without
  ``data_dir`` a cached spec is used as it is."""
  saved = _cached_spec(name)
  if not (saved and data_dir is None and name not in _DATA_DIRS):
    root = _root(name, data_dir)
    if data_dir:
      _DATA_DIRS[name] = root
    p = _prepare(name, root)
    stat = p.info_file.stat()
    info_key = f"{p.description}|{stat.st_size}|{stat.st_mtime_ns}"
    if not (saved and saved.get("info_key") == info_key):
      ds = load(name, root, verbose=False)
      if isinstance(ds.train_images, StreamedImages):
        index = _stream_index(name, p, caches.root(), verbose=False)
        mean, std = (tuple(round(float(v), 4) for v in index[k]) for k in ("mean", "std"))
      else:
        mean, std = user.statistics(ds.train_images)
      saved = {"version": _VERSION, "name": name, "info_key": info_key, "data_dir": root,
               "image_shape": list(p.image_shape), "num_classes": len(p.class_names),
               "class_names": list(p.class_names), "mean": list(mean),
               "std": [max(s, 1 / 255) for s in std]}
      try:
        caches.root().mkdir(parents=True, exist_ok=True)
        atomic.write_text(_spec_file(name), json.dumps(saved) + "\n")
      except OSError:
        pass  # recomputed next time
  return specs.DatasetSpec(name, tuple(saved["image_shape"]), saved["num_classes"],
                           tuple(saved["mean"]), tuple(saved["std"]), augment=False,
                           class_names=tuple(saved["class_names"]))
