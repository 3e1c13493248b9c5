"""The user's own data (``npz:PATH``, ``folder:PATH``): train, compress, eval from the
CLI on datasets made here, and bad inputs refused with one line naming the file."""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from jcompress import cli, data
from jcompress.data import user


def _arrays(n: int, seed: int, channels: int = 3):
  """``n`` 8x8 images of 3 classes, each class a bright row at its own height."""
  rng = np.random.default_rng(seed)
  y = np.arange(n) % 3
  x = (rng.random((n, 8, 8, channels)) * 60).astype(np.uint8)
  x[np.arange(n), y * 3] = 255
  return x, y


def _npz(path: pathlib.Path, **overrides) -> pathlib.Path:
  (xt, yt), (xs, ys) = _arrays(40, 0), _arrays(12, 1)
  arrays = {"x_train": xt, "y_train": yt, "x_test": xs, "y_test": ys} | overrides
  np.savez(path, **arrays)
  return path


def _folder(root: pathlib.Path) -> pathlib.Path:
  for split, (x, y) in (("train", _arrays(40, 0)), ("test", _arrays(12, 1))):
    for i, (image, label) in enumerate(zip(x, y)):
      folder = root / split / f"class{label}"
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(image).save(folder / f"{i:03d}.png")
  (root / "train" / "class0" / "README.txt").write_text("not an image: ignored")
  return root


def _run(*argv) -> int:
  return cli.main([*argv, "--no-compile-cache"])


@pytest.mark.parametrize("kind", ["npz", "folder"])
def test_train_compress_eval_on_own_data(kind, tmp_path, capsys):
  path = _npz(tmp_path / "d.npz") if kind == "npz" else _folder(tmp_path / "imgs")
  dataset = f"{kind}:{path}"
  spec = data.spec(dataset)
  assert (spec.image_shape, spec.num_classes) == ((8, 8, 3), 3)
  assert len(spec.mean) == 3 and all(0 < s for s in spec.std)
  ds = data.load(dataset, verbose=False)
  assert (len(ds.train_labels), len(ds.test_labels)) == (40, 12)  # README.txt ignored
  base, small = tmp_path / "base", tmp_path / "small"
  assert _run("train", "--model", "lenet300", "--dataset", dataset, "--workdir", str(base),
              "--epochs", "1", "--batch-size", "8", "--lr", "0.05", "--augment") == 0
  meta = json.loads((base / "config.json").read_text())
  assert meta["dataset"] == dataset and meta["input_shape"] == [8, 8, 3]
  assert _run("compress", "--from", str(base), "--workdir", str(small), "--method", "prune",
              "--epochs", "1", "--batch-size", "8") == 0
  capsys.readouterr()
  assert _run("eval", "--workdir", str(small), "--json") == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert 0 <= result["accuracy"] <= 1
  assert _run("summary", "--model", "lenet300", "--dataset", dataset, "--format", "json") == 0


def test_npz_nhw_float_images_and_relative_path(tmp_path, monkeypatch):
  (xt, yt), (xs, ys) = _arrays(40, 0, channels=1), _arrays(12, 1, channels=1)
  _npz(tmp_path / "g.npz", x_train=xt[..., 0] / 255.0, x_test=xs[..., 0] / 255.0)
  monkeypatch.chdir(tmp_path)
  ds = data.load("npz:g.npz", verbose=False)
  assert ds.train_images.shape == (40, 8, 8, 1) and ds.train_images.dtype == np.uint8
  assert sorted(ds.train_images.ravel().tolist()) == sorted(xt.ravel().tolist())


def _error(dataset: str) -> str:
  with pytest.raises(ValueError) as e:
    data.load(dataset, verbose=False)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_bad_npz_files(tmp_path):
  x, y = _arrays(12, 1)
  assert "outside [0, 3)" in _error(f"npz:{_npz(tmp_path / 'a.npz', y_test=y + 1)}")
  assert "label" in _error(f"npz:{_npz(tmp_path / 'b.npz', y_train=-_arrays(40, 0)[1])}")
  assert "12 images but y_test 11" in _error(f"npz:{_npz(tmp_path / 'c.npz', y_test=y[1:])}")
  assert "no test images" in _error(f"npz:{_npz(tmp_path / 'd.npz', x_test=x[:0], y_test=y[:0])}")
  assert "x_test (4, 4, 3)" in _error(f"npz:{_npz(tmp_path / 'e.npz', x_test=x[:, :4, :4])}")
  assert "[0, 1]" in _error(f"npz:{_npz(tmp_path / 'f.npz', x_test=x * 1.0)}")
  np.savez(tmp_path / "g.npz", x_train=x)
  assert "missing arrays" in _error(f"npz:{tmp_path / 'g.npz'}")
  (tmp_path / "h.npz").write_bytes(b"not a zip")
  assert str(tmp_path / "h.npz") in _error(f"npz:{tmp_path / 'h.npz'}")


def test_bad_image_folders(tmp_path):
  root = _folder(tmp_path / "imgs")
  bad = root / "train" / "class1" / "broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  assert str(bad) in _error(f"folder:{root}")
  bad.unlink()
  odd = root / "test" / "class2" / "big.png"
  Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(odd)
  assert str(odd) in _error(f"folder:{root}") and "same size" in _error(f"folder:{root}")
  odd.unlink()
  (root / "test" / "class3").mkdir()
  assert "class3" in _error(f"folder:{root}")
  (root / "test" / "class3").rmdir()
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside / "x.png")
  link = root / "train" / "class0" / "link.png"
  link.symlink_to(outside / "x.png")
  assert "outside" in _error(f"folder:{root}")
  link.unlink()
  for f in (root / "test").rglob("*.png"):
    f.unlink()
  assert "no images" in _error(f"folder:{root}")


def test_cli_errors_are_one_line(tmp_path, capsys):
  path = _npz(tmp_path / "a.npz", y_test=_arrays(12, 1)[1] + 1)
  assert _run("train", "--model", "lenet300", "--dataset", f"npz:{path}", "--workdir",
              str(tmp_path / "w"), "--epochs", "1") == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and str(path) in err and "outside [0, 3)" in err
  with pytest.raises(SystemExit):
    cli.main(["train", "--model", "lenet300", "--dataset", "SVHN!", "--workdir", "w"])
  assert "npz:PATH" in capsys.readouterr().err


def test_is_user_and_canonical():
  assert user.is_user("folder:x") and not user.is_user("npz:") and not data.is_user("mnist")
  assert user.canonical("npz:x.npz").startswith("npz:/")


@pytest.mark.slow
def test_conv_model_folder_train_compress_export_eval(tmp_path, capsys):
  """A CIFAR network (the depthwise-separable CNN, quick to compile) adapts to 8x8 RGB
  with 3 classes; the compressed model exports and its exported file evaluates on
  the same folder."""
  dataset = f"folder:{_folder(tmp_path / 'imgs')}"
  base, small, out = tmp_path / "base", tmp_path / "small", tmp_path / "m.jcz"
  assert _run("train", "--model", "dsc-small", "--dataset", dataset, "--workdir",
              str(base), "--epochs", "1", "--batch-size", "8") == 0
  assert _run("compress", "--from", str(base), "--workdir", str(small), "--method",
              "quantize", "--bits", "4", "--epochs", "0") == 0
  assert _run("export", "--workdir", str(small), "--out", str(out)) == 0
  capsys.readouterr()
  assert _run("eval", "--exported", str(out), "--json") == 0
  assert "accuracy" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
