"""Tests for jcompress.data: readers on the real files, cache, safety, batching."""

import gc
import gzip
import io
import os
import pickle
import shutil
import tarfile
import threading
import time

import jax
import numpy as np
import pytest
from PIL import Image

from jcompress import data
from jcompress.data import make_sample, order, readers, sources

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def _jpeg(color) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (32, 32), color).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def _tar(path, members):
  """Writes a .tar.gz; ``members`` maps a name to bytes or a (type, linkname) link."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(path, "w:gz") as tar:
    for name, content in members.items():
      info = tarfile.TarInfo(name)
      if isinstance(content, bytes):
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
      else:
        info.type, info.linkname = content
        tar.addfile(info)
  return path


def _cache_files(cache_dir):
  return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def _batches(x, y, **kw):
  kw = {"mean": (0.0,) * x.shape[-1], "std": (1.0,) * x.shape[-1], **kw}
  return [jax.tree.map(np.asarray, b) for b in data.batches(x, y, **kw)]


# -- names, specs -------------------------------------------------------------------


def test_names_and_specs():
  assert data.names() == ["cifar10", "fashion_mnist", "mnist", "mnist_sample", "moving_mnist"]
  assert data.spec("cifar10").image_shape == (32, 32, 3) and data.spec("cifar10").augment
  assert not data.spec("mnist").augment and len(data.spec("mnist").std) == 1
  with pytest.raises(ValueError, match="valid datasets: cifar10, fashion_mnist"):
    data.spec("imagenet")
  with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
    data.load("imagenet")


# -- real files ---------------------------------------------------------------------


def test_mnist_real(data_dir):
  ds = data.load("mnist", data_dir)
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (10000, 28, 28, 1)
  assert ds.train_labels.dtype == ds.test_labels.dtype == np.int32
  assert np.bincount(ds.train_labels).tolist() == MNIST_TRAIN_COUNTS
  assert ds.num_classes == 10 and "offline" in ds.source
  # The spec's statistics are this file's (README: mean 33.318, std 78.567).
  assert ds.train_images.mean() / 255 == pytest.approx(data.spec("mnist").mean[0], abs=1e-4)


def test_dataset_folder_given_directly(data_dir):
  ds = data.load("mnist", data_dir / "mnist", verbose=False)
  assert len(ds.train_images) == 60000
  with pytest.raises(ValueError, match="original MNIST files, not Fashion-MNIST"):
    data.load("fashion_mnist", data_dir / "mnist")


def test_cifar10_real(data_dir):
  ds = data.load("cifar10", data_dir)
  assert ds.train_images.shape == (50000, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (10000, 32, 32, 3)
  assert np.bincount(ds.train_labels).tolist() == [5000] * 10
  assert np.bincount(ds.test_labels).tolist() == [1000] * 10
  assert len(set(ds.train_labels[:30].tolist())) >= 8  # the copy is class by class: mixed
  assert "JPEG copy" in ds.source


def test_mnist_sample():
  ds = data.load("mnist_sample")
  assert ds.train_images.shape == (2000, 28, 28, 1) and ds.test_images.shape == (500, 28, 28, 1)
  assert ds.train_labels.dtype == np.int32 and ds.num_classes == 10
  assert set(ds.train_labels.tolist()) == set(range(10))


def test_mnist_sample_is_reproducible(data_dir, tmp_path):
  ds = data.load("mnist_sample")
  rebuilt = make_sample.build(data_dir, tmp_path / "sample.npz")
  with np.load(rebuilt) as npz:  # the file holds MNIST's first images, loaded mixed
    for split in ("train", "test"):
      x, y = npz[f"{split}_images"], npz[f"{split}_labels"]
      mixed = order.mixed_order(x, y)
      np.testing.assert_array_equal(x[mixed], getattr(ds, f"{split}_images"))
      np.testing.assert_array_equal(y[mixed], getattr(ds, f"{split}_labels"))


# -- cache --------------------------------------------------------------------------


def test_cache_hit_and_invalidation(data_dir, tmp_path, capsys):
  mnist = shutil.copytree(data_dir / "mnist", tmp_path / "data" / "mnist")
  cache = tmp_path / "cache"
  first = data.load("mnist", tmp_path / "data", cache_dir=cache)
  assert "decoded and cached" in capsys.readouterr().out
  start = time.perf_counter()
  second = data.load("mnist", tmp_path / "data", cache_dir=cache)
  assert time.perf_counter() - start < 5
  assert "cache hit" in capsys.readouterr().out
  for a, b in zip(first[1:5], second[1:5]):
    np.testing.assert_array_equal(a, b)
  assert len(_cache_files(cache)) == 1
  os.utime(mnist / "t10k-labels-idx1-ubyte.gz", (0, 0))  # a changed source file
  data.load("mnist", tmp_path / "data", cache_dir=cache)
  assert "decoded and cached" in capsys.readouterr().out
  assert len(_cache_files(cache)) == 2


def test_cache_write_is_atomic(tmp_path, monkeypatch):
  def fail(f, **arrays):
    f.write(b"partial")
    raise OSError("disk full")

  monkeypatch.setattr(np, "savez", fail)
  splits = readers.Splits(*[np.zeros((1, 28, 28, 1), np.uint8), np.zeros(1, np.int32)] * 2)
  with pytest.raises(OSError, match="disk full"):
    sources._write_cache(tmp_path / "x.npz", splits)
  assert _cache_files(tmp_path) == []


# -- corrupt, truncated and unsafe files --------------------------------------------


def _mnist_copy(data_dir, tmp_path, name, content):
  folder = shutil.copytree(data_dir / "mnist", tmp_path / "data" / "mnist")
  (folder / name).write_bytes(content)
  return tmp_path / "data"


@pytest.mark.parametrize("case", ["truncated_gz", "idx_size", "idx_magic"])
def test_corrupt_idx(data_dir, tmp_path, case):
  name = "t10k-labels-idx1-ubyte.gz"
  raw = gzip.decompress((data_dir / "mnist" / name).read_bytes())
  content, match = {
      "truncated_gz": (gzip.compress(raw)[:-100], "truncated or corrupt gzip"),
      "idx_size": (gzip.compress(raw[:-10]), r"declares shape \(10000,\)"),
      "idx_magic": (gzip.compress(b"\x00\x00\x0d\x01" + raw[4:]), "not an unsigned-byte IDX"),
  }[case]
  root = _mnist_copy(data_dir, tmp_path, name, content)
  with pytest.raises(ValueError, match=match) as err:
    data.load("mnist", root, cache_dir=tmp_path / "cache")
  assert name in str(err.value)
  assert _cache_files(tmp_path / "cache") == []


def test_truncated_cifar_archive(data_dir, tmp_path):
  cache = tmp_path / "cache"
  archive = tmp_path / "data" / "cifar10" / "cifar10-jpeg.tar.gz"
  archive.parent.mkdir(parents=True)
  with open(data_dir / "cifar10" / "cifar10-jpeg.tar.gz", "rb") as f:
    archive.write_bytes(f.read(200_000))
  with pytest.raises(ValueError, match="cifar10-jpeg.tar.gz: truncated or corrupt archive"):
    data.load("cifar10", tmp_path / "data", cache_dir=cache)
  assert _cache_files(cache) == []


def test_undecodable_jpeg(tmp_path):
  archive = _tar(tmp_path / "cifar10" / "cifar10-jpeg.tar.gz", {
      "train/cat/0000.jpg": _jpeg("red"), "train/cat/0001.jpg": _jpeg("red")[:200],
      "test/cat/0000.jpg": _jpeg("red")})
  with pytest.raises(ValueError, match="train/cat/0001.jpg: undecodable JPEG"):
    data.load("cifar10", tmp_path, cache_dir=tmp_path / "cache")
  assert _cache_files(tmp_path / "cache") == []
  _tar(archive, {"train/cat/0000.jpg": b"not a jpeg", "test/cat/0000.jpg": _jpeg("red")})
  with pytest.raises(ValueError, match="train/cat/0000.jpg: undecodable JPEG"):
    readers.read_cifar10_jpeg(archive)


@pytest.mark.parametrize("member, content", [
    ("../evil", b"x"),
    ("/abs/evil", b"x"),
    ("train/cat/0001.jpg", (tarfile.SYMTYPE, "/etc/passwd")),
    ("train/cat/0001.jpg", (tarfile.LNKTYPE, "../../etc/passwd")),
])
def test_unsafe_archive_rejected(tmp_path, member, content):
  _tar(tmp_path / "cifar10" / "cifar10-jpeg.tar.gz",
       {"train/cat/0000.jpg": _jpeg("red"), member: content})
  with pytest.raises(ValueError, match=f"refusing archive: member {member!r}"):
    data.load("cifar10", tmp_path)
  assert not (tmp_path / "evil").exists()


def test_cifar_jpeg_layout_and_order(tmp_path):
  archive = _tar(tmp_path / "a.tar.gz", {
      "train/cat/0001.jpg": _jpeg("blue"), "train/airplane/0000.jpg": _jpeg("white"),
      "train/cat/0000.jpg": _jpeg("red"), "test/truck/0000.jpg": _jpeg("black")})
  splits = readers.read_cifar10_jpeg(archive)
  assert splits.train_labels.tolist() == [0, 3, 3] and splits.test_labels.tolist() == [9]
  colors = splits.train_images.mean(axis=(1, 2))
  np.testing.assert_allclose(colors, [[255, 255, 255], [255, 0, 0], [0, 0, 255]], atol=10)
  _tar(archive, {"train/kitten/0000.jpg": _jpeg("red")})
  with pytest.raises(ValueError, match="unexpected member 'train/kitten/0000.jpg'"):
    readers.read_cifar10_jpeg(archive)


def _cifar_pickles(rng):
  images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 12)
  files = {}
  for i, name in enumerate(readers.CIFAR10_BATCHES):
    x = images[2 * i:2 * i + 2].transpose(0, 3, 1, 2).reshape(2, 3072)  # rows are CHW
    batch = pickle.dumps({b"data": x, b"labels": labels[2 * i:2 * i + 2].tolist(),
                          b"batch_label": b"synthetic"}, protocol=2)
    # The real batches were pickled by numpy 1.x, under numpy.core.
    assert b"numpy._core.multiarray" in batch
    files[name] = batch.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
  return images, labels, files


def test_cifar_python_archive_and_folder(tmp_path):
  images, labels, files = _cifar_pickles(np.random.default_rng(0))
  _tar(tmp_path / "cifar10" / "cifar-10-python.tar.gz",
       {f"cifar-10-batches-py/{k}": v for k, v in files.items()})
  _tar(tmp_path / "cifar10" / "cifar10-jpeg.tar.gz", {"train/cat/0000.jpg": _jpeg("red")})
  ds = data.load("cifar10", tmp_path)  # the original pixels win over the JPEG copy
  assert "python batches" in ds.source and "cifar-10-python.tar.gz" in ds.source
  train, test = (order.mixed_order(images[s], labels[s]) for s in (slice(0, 10), slice(10, 12)))
  np.testing.assert_array_equal(ds.train_images, images[:10][train])
  np.testing.assert_array_equal(ds.test_images, images[10:][test])
  assert ds.train_labels.tolist() == labels[:10][train].tolist()
  assert ds.train_labels.dtype == np.int32
  folder = tmp_path / "extracted" / "cifar-10-batches-py"
  folder.mkdir(parents=True)
  for name, content in files.items():
    (folder / name).write_bytes(content)
  np.testing.assert_array_equal(data.load("cifar10", tmp_path / "extracted").test_images,
                                images[10:])


def test_cifar_python_refuses_code_and_missing_batches(tmp_path):
  _, _, files = _cifar_pickles(np.random.default_rng(0))
  files["test_batch"] = pickle.dumps({b"data": os.system}, protocol=2)
  archive = _tar(tmp_path / "c.tar.gz", {f"cifar-10-batches-py/{k}": v for k, v in files.items()})
  with pytest.raises(ValueError, match="test_batch: not a CIFAR-10 python batch.*refusing"):
    readers.read_cifar10_python_tar(archive)
  del files["data_batch_3"]
  archive = _tar(tmp_path / "c.tar.gz", {f"cifar-10-batches-py/{k}": v for k, v in files.items()})
  with pytest.raises(ValueError, match=r"missing CIFAR-10 batches \['data_batch_3'\]"):
    readers.read_cifar10_python_tar(archive)


# -- source resolution --------------------------------------------------------------


def test_no_source_error(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  monkeypatch.delenv("JCOMPRESS_TFDS_DOWNLOAD", raising=False)
  monkeypatch.delenv("JCOMPRESS_DATA_DIR", raising=False)
  start = time.perf_counter()
  with pytest.raises(FileNotFoundError) as err:
    data.load("fashion_mnist")
  message = str(err.value)
  for needle in ("JCOMPRESS_DATA_DIR", "--data-dir", "JCOMPRESS_TFDS_DOWNLOAD=1",
                 "offline: skipped", "DIR/fashion_mnist/", "train-images-idx3-ubyte.gz"):
    assert needle in message
  monkeypatch.setenv("JCOMPRESS_DATA_DIR", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="cifar10-jpeg.tar.gz") as err:
    data.load("cifar10")
  assert f"offline {tmp_path}: found none of {tmp_path}/cifar10/" in str(err.value)
  assert time.perf_counter() - start < 20  # no download attempts, no retries


class _FakeBuilder:
  version = "3.0.1"

  def __init__(self, data_dir, splits):
    self.data_dir, self._splits = str(data_dir), splits

  def is_prepared(self):
    return True

  def as_data_source(self, split):
    return [self._splits[s] for s in split]


def test_tfds_source(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  splits = {s: [{"image": rng.integers(0, 256, (28, 28, 1), dtype=np.uint8),
                 "label": np.int64(i % 10)} for i in range(n)]
            for s, n in (("train", 5), ("test", 3))}
  (tmp_path / "dataset_info.json").write_text("{}")
  monkeypatch.setattr(tfds, "builder", lambda name, **kw: _FakeBuilder(tmp_path, splits))
  monkeypatch.delenv("JCOMPRESS_DATA_DIR", raising=False)
  ds = data.load("mnist", cache_dir=tmp_path / "cache")
  assert ds.source == f"tfds mnist:3.0.1 in {tmp_path}"
  assert ds.train_images.shape == (5, 28, 28, 1) and sorted(ds.test_labels.tolist()) == [0, 1, 2]
  first = next(i for i, e in enumerate(splits["train"])
               if np.array_equal(e["image"], ds.train_images[0]))
  assert ds.train_labels[0] == first % 10
  monkeypatch.setenv("JCOMPRESS_TFDS_DOWNLOAD", "yes")
  with pytest.raises(ValueError, match="JCOMPRESS_TFDS_DOWNLOAD must be 0 or 1"):
    data.load("mnist")


# -- batches ------------------------------------------------------------------------


def _toy(n=10, shape=(4, 4, 3)):
  x = np.random.default_rng(1).integers(0, 256, (n, *shape), dtype=np.uint8)
  return x, np.arange(n, dtype=np.int32)


def test_num_batches():
  assert data.num_batches(10, 4, False) == 3 and data.num_batches(10, 4, True) == 2
  assert data.num_batches(8, 4, False) == data.num_batches(8, 4, True) == 2
  with pytest.raises(ValueError, match="batch_size"):
    data.num_batches(10, 0, False)


def test_eval_order_and_normalisation():
  x, y = _toy()
  mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
  out = _batches(x, y, batch_size=4, mean=mean, std=std)
  assert [b["label"].tolist() for b in out] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  image = np.concatenate([b["image"] for b in out])
  assert image.dtype == np.float32 and out[0]["label"].dtype == np.int32
  np.testing.assert_allclose(image, (x / 255 - np.array(mean)) / np.array(std), atol=1e-5)


def test_shuffle_deterministic_in_seed_and_epoch():
  x, y = _toy(50)
  run = lambda **kw: np.concatenate([b["label"] for b in _batches(x, y, batch_size=8, **kw)])
  a = run(seed=3, epoch=2)
  np.testing.assert_array_equal(a, run(seed=3, epoch=2))
  assert sorted(a.tolist()) == list(range(50))
  assert not np.array_equal(a, run(seed=3, epoch=1))
  assert not np.array_equal(a, run(seed=4, epoch=2))
  assert not np.array_equal(a, y)


def test_drop_remainder():
  x, y = _toy(10)
  out = _batches(x, y, batch_size=4, seed=0, drop_remainder=True)
  assert [len(b["label"]) for b in out] == [4, 4]
  assert [len(b["label"]) for b in _batches(x, y, batch_size=4, seed=0)] == [4, 4, 2]


def test_augment_is_a_real_crop_and_flip():
  h = w = 8
  rows, cols = np.meshgrid(np.arange(1, h + 1), np.arange(1, w + 1), indexing="ij")
  image = np.stack([rows, cols, np.full_like(rows, 7)], -1).astype(np.uint8)
  x = np.repeat(image[None], 64, axis=0)
  out = _batches(x, np.zeros(64, np.int32), batch_size=64, seed=0, augment=True)[0]["image"]
  assert out.shape == (64, h, w, 3) and out.dtype == np.float32
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  seen = set()
  for got in np.rint(out * 255).astype(np.uint8):
    matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (0, 1)
               if np.array_equal(got, (lambda c: c[:, ::-1] if flip else c)(
                   padded[dy:dy + h, dx:dx + w]))]
    assert matches, "an augmented image is not a crop of the padded image"
    seen.update(matches)
  assert {flip for _, _, flip in seen} == {0, 1} and len(seen) > 20


def test_augment_deterministic_and_needs_seed():
  x, y = _toy(20, (32, 32, 3))
  a = _batches(x, y, batch_size=8, seed=5, epoch=1, augment=True)
  b = _batches(x, y, batch_size=8, seed=5, epoch=1, augment=True, prefetch=0)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u["image"], v["image"])
  with pytest.raises(ValueError, match="augment=True needs a seed"):
    data.batches(x, y, 8, mean=(0,) * 3, std=(1,) * 3, augment=True)
  with pytest.raises(ValueError, match="mean and std need 3 values"):
    data.batches(x, y, 8, mean=(0,), std=(1,))


def test_prefetch_matches_synchronous():
  ds, s = data.load("mnist_sample"), data.spec("mnist_sample")
  kw = dict(mean=s.mean, std=s.std, seed=0, epoch=3, augment=True)
  sync = list(data.batches(ds.test_images, ds.test_labels, 64, prefetch=0, **kw))
  ahead = list(data.batches(ds.test_images, ds.test_labels, 64, prefetch=3, **kw))
  assert len(sync) == len(ahead) == 8 and isinstance(ahead[0]["image"], jax.Array)
  for u, v in zip(sync, ahead):
    np.testing.assert_array_equal(u["image"], v["image"])
    np.testing.assert_array_equal(u["label"], v["label"])


def _prefetch_threads():
  return [t for t in threading.enumerate() if t.name == "jcompress-prefetch"]


def test_prefetch_stops_when_consumer_stops():
  x, y = _toy(100)
  it = data.batches(x, y, 2, mean=(0,) * 3, std=(1,) * 3, seed=0, prefetch=2)
  next(it)
  assert len(_prefetch_threads()) == 1
  it.close()
  assert not _prefetch_threads()
  it = data.batches(x, y, 2, mean=(0,) * 3, std=(1,) * 3, seed=0, prefetch=2)
  next(it)
  del it
  gc.collect()
  assert not _prefetch_threads()


class _Exploding(np.ndarray):
  def __getitem__(self, index):
    raise RuntimeError("boom in the producer")


def test_prefetch_reraises_producer_errors():
  x, y = _toy()
  it = data.batches(x.view(_Exploding), y, 4, mean=(0,) * 3, std=(1,) * 3, prefetch=2)
  with pytest.raises(RuntimeError, match="boom in the producer"):
    next(it)
  assert not _prefetch_threads()


def test_moving_mnist_is_generated_from_mnist(data_dir):
  ds = data.load("moving_mnist", data_dir)
  assert ds.train_images.shape == (60000, 8, 32, 32, 1) and ds.test_images.shape[0] == 10000
  mnist = data.load("mnist", data_dir)
  np.testing.assert_array_equal(ds.train_labels, mnist.train_labels)
  s = data.spec("moving_mnist")
  batch = next(data.batches(ds.test_images, ds.test_labels, 4, mean=s.mean, std=s.std))
  assert batch["image"].shape == (4, 8, 32, 32, 1)
