"""Any tfds image-classification dataset by name (jcompress.data.tfds_generic): real tfds
builders prepared here as array_record in a temporary tfds data dir (no TensorFlow),
trained and evaluated from the CLI; split options, --image-size, the errors, and the
streaming path giving the in-memory path's batches."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from jcompress import cli, data
from jcompress.data import tfds_generic

tfds = pytest.importorskip("tensorflow_datasets")


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def _examples(n: int, seed: int, varied: bool):
  """``n`` images of 3 classes, each class a bright row at its own height; sizes vary
  from 8x8 to 12x16 with ``varied``."""
  rng = np.random.default_rng(seed)
  for i in range(n):
    h, w = (8 + 2 * (i % 3), 8 + 4 * (i % 2)) if varied else (8, 8)
    x = (rng.random((h, w, 3)) * 60).astype(np.uint8)
    x[(i % 3) * h // 3] = 255
    yield i, {"image": _png(x), "label": i % 3}


class JcTinyShapes(tfds.core.GeneratorBasedBuilder):
  """48 train / 12 test 8x8 RGB images of 3 classes."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 8, 3)),
        "label": tfds.features.ClassLabel(names=["top", "middle", "bottom"])}),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(48, 0), "test": self._generate_examples(12, 1)}

  def _generate_examples(self, n, seed):
    yield from _examples(n, seed, varied=False)


class JcTinyVaried(tfds.core.GeneratorBasedBuilder):
  """Images of varying sizes, splits train and validation (no test)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=3)}),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(24, 2),
            "validation": self._generate_examples(9, 3)}

  def _generate_examples(self, n, seed):
    yield from _examples(n, seed, varied=True)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  for builder in (JcTinyShapes, JcTinyVaried):
    builder(data_dir=str(root), file_format="array_record").download_and_prepare()
  return str(root)


@pytest.fixture(autouse=True)
def _no_tfds_env(monkeypatch):
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  monkeypatch.delenv(tfds_generic.STREAM_ENV, raising=False)
  tfds_generic._DATA_DIRS.clear()  # pylint: disable=protected-access


def _run(*argv) -> int:
  return cli.main([*argv, "--no-compile-cache"])


def _train(workdir, dataset, data_dir, *extra) -> int:
  return _run("train", "--model", "lenet300", "--dataset", dataset, "--data-dir", data_dir,
              "--workdir", str(workdir), "--epochs", "1", "--batch-size", "8", "--lr", "0.05",
              *extra)


def test_spec_from_builder_info(tfds_dir):
  spec = data.spec("tfds:jc_tiny_shapes", tfds_dir)
  assert (spec.image_shape, spec.num_classes) == ((8, 8, 3), 3)
  assert spec.class_names == ("top", "middle", "bottom") and not spec.augment
  ds = data.load("tfds:jc_tiny_shapes", tfds_dir, verbose=False)
  assert (len(ds.train_labels), len(ds.test_labels)) == (48, 12)
  assert np.allclose(spec.mean, ds.train_images.reshape(-1, 3).mean(0) / 255, atol=1e-4)
  assert np.bincount(ds.train_labels).tolist() == [16, 16, 16]
  # Without a data dir, the spec cached from the first pass answers.
  tfds_generic._DATA_DIRS.clear()  # pylint: disable=protected-access
  assert data.spec("tfds:jc_tiny_shapes") == spec


def test_train_eval_compress_by_name(tfds_dir, tmp_path, capsys):
  base, small = tmp_path / "base", tmp_path / "small"
  assert _train(base, "jc_tiny_shapes", tfds_dir) == 0
  meta = json.loads((base / "config.json").read_text())
  assert meta["dataset"] == "tfds:jc_tiny_shapes"
  assert (meta["input_shape"], meta["num_classes"]) == ([8, 8, 3], 3)
  assert _run("compress", "--from", str(base), "--workdir", str(small), "--method", "prune",
              "--data-dir", tfds_dir) == 0
  capsys.readouterr()
  assert _run("eval", "--workdir", str(small), "--data-dir", tfds_dir, "--json") == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["dataset"] == "tfds:jc_tiny_shapes" and 0 <= result["accuracy"] <= 1


def test_splits_and_image_size(tfds_dir, tmp_path):
  name = "tfds:jc_tiny_shapes;train=train[:50%];test=train[50%:]"
  ds = data.load(name, tfds_dir, verbose=False)
  assert (len(ds.train_labels), len(ds.test_labels)) == (24, 24)
  work = tmp_path / "varied"
  assert _train(work, "jc_tiny_varied", tfds_dir, "--test-split", "validation",
                "--image-size", "6x10") == 0
  meta = json.loads((work / "config.json").read_text())
  assert meta["dataset"] == "tfds:jc_tiny_varied;test=validation;size=6x10"
  assert meta["input_shape"] == [6, 10, 3]
  assert data.spec(meta["dataset"]).image_shape == (6, 10, 3)  # what eval and export read


@pytest.mark.parametrize("dataset, extra, message", [
    ("no_such_dataset_xyz", [], "unknown dataset 'no_such_dataset_xyz'; valid datasets: "
     "cifar10, fashion_mnist"),
    ("jc_tiny_shapes", ["--train-split", "train[:300%]"], "--train-split 'train[:300%]'"),
    ("jc_tiny_shapes", ["--test-split", "validation"], "--test-split 'validation'"),
    ("jc_tiny_varied", ["--test-split", "validation"], "give --image-size N or HxW"),
    ("jc_tiny_varied", ["--image-size", "8"], "has no 'test' split"),
    ("jc_tiny_shapes", ["--image-size", "0"], "--image-size must be N or HxW"),
    ("mnist_sample", ["--train-split", "train[:50%]"], "--train-split applies to tfds datasets"),
])
def test_errors_name_the_option(dataset, extra, message, tfds_dir, tmp_path, capsys):
  assert _train(tmp_path / "w", dataset, tfds_dir, *extra) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1
  if "unknown" in message:
    assert "any tfds image-classification dataset" in err
  assert not (tmp_path / "w").exists()  # refused before any work


def test_not_prepared_offline(tmp_path, capsys):
  assert _train(tmp_path / "w", "jc_tiny_shapes", str(tmp_path / "empty")) == 2
  err = capsys.readouterr().err
  assert "jc_tiny_shapes is not prepared in" in err and str(tmp_path / "empty") in err


def test_streaming_gives_the_in_memory_batches(tfds_dir, monkeypatch):
  name = "tfds:jc_tiny_shapes"
  memory = data.load(name, tfds_dir, verbose=False)
  monkeypatch.setenv(tfds_generic.STREAM_ENV, "1")  # every dataset is too large: streamed
  streamed = data.load(name, tfds_dir, verbose=False)
  assert isinstance(streamed.train_images, tfds_generic.StreamedImages)
  assert streamed.train_images.shape == memory.train_images.shape
  np.testing.assert_array_equal(streamed.test_labels, memory.test_labels)
  spec = data.spec(name, tfds_dir)
  for epoch in (0, 1):
    pairs = zip(*(data.batches(ds.train_images, ds.train_labels, 8, mean=spec.mean,
                               std=spec.std, seed=3, epoch=epoch, augment=True,
                               drop_remainder=True) for ds in (memory, streamed)))
    for a, b in pairs:
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])
  np.testing.assert_array_equal(streamed.test_images[np.arange(12)], memory.test_images)
