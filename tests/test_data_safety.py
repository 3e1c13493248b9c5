"""Adversarial data files: memory bombs, lying headers, bad caches (issue 18, items 1, 2, 7).

Every file is generated at test time and is tiny: the bombs claim gigabytes in a
header, or decompress to gigabytes from a few MB of concatenated gzip members, and
are deleted when the module's tests end. The memory claims are proven in a
subprocess whose address space is capped (``RLIMIT_AS``) at its baseline after
importing numpy and jcompress.data plus 300 MB: the same files read with plain
``gzip``/``tarfile``/``np.load`` hit ``MemoryError`` there, jcompress's readers
stop with a one-line ``ValueError`` naming the file.
"""

import gzip
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest

from jcompress.data import readers, sources

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 1 << 30
_ZEROS_64MIB = None


def _zeros_64mib() -> bytes:
  """One gzip member of 64 MiB of zeros (65 KB); concatenated members are one stream."""
  global _ZEROS_64MIB
  if _ZEROS_64MIB is None:
    _ZEROS_64MIB = gzip.compress(bytes(64 << 20), compresslevel=9, mtime=0)
  return _ZEROS_64MIB


def _gzip_bomb(path, head: bytes, zero_gib: int, tail: bytes = b"") -> pathlib.Path:
  """A gzip file decompressing to ``head``, ``zero_gib`` GiB of zeros, ``tail``."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "wb") as f:
    f.write(gzip.compress(head, mtime=0))
    for _ in range(zero_gib * 16):
      f.write(_zeros_64mib())
    if tail:
      f.write(gzip.compress(tail, mtime=0))
  return path


def _idx(shape, body: bytes | None = None) -> bytes:
  header = b"\x00\x00\x08" + bytes([len(shape)]) + struct.pack(f">{len(shape)}I", *shape)
  return header + (bytes(int(np.prod(shape))) if body is None else body)


def _write_gz(path, raw: bytes) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(gzip.compress(raw, mtime=0))
  return path


def _labels(n) -> bytes:
  return (np.arange(n) % 10).astype(np.uint8).tobytes()


def _tiny_mnist(folder, n_train=20, n_test=10, **raw) -> pathlib.Path:
  """The four IDX files of a tiny MNIST; ``raw`` replaces a file's decompressed bytes."""
  rng = np.random.default_rng(0)
  content = {
      "train-images-idx3-ubyte.gz": _idx((n_train, 28, 28),
                                         rng.integers(0, 256, n_train * 784, np.uint8).tobytes()),
      "train-labels-idx1-ubyte.gz": _idx((n_train,), _labels(n_train)),
      "t10k-images-idx3-ubyte.gz": _idx((n_test, 28, 28),
                                        rng.integers(0, 256, n_test * 784, np.uint8).tobytes()),
      "t10k-labels-idx1-ubyte.gz": _idx((n_test,), _labels(n_test)),
  }
  for name, data in content.items():
    _write_gz(folder / name, raw.get(name.split("-idx")[0].replace("-", "_"), data))
  return folder


def _tar_header(name, size, kind=tarfile.REGTYPE) -> bytes:
  info = tarfile.TarInfo(name)
  info.size, info.type = size, kind
  return info.tobuf(format=tarfile.GNU_FORMAT)


def _listing(folder):
  return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# -- the memory-capped subprocess ----------------------------------------------------

_HARNESS = r"""
import gzip, json, pathlib, resource, sys, tarfile
import numpy as np
from jcompress.data import readers, sources

def vm_size():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmSize:"):
        return int(line.split()[1]) * 1024

limit = vm_size() + (300 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for case, expr, path in json.loads(sys.argv[1]):
  path = pathlib.Path(path)
  try:
    eval(expr)
    print(json.dumps([case, "no error"]), flush=True)
  except ValueError as e:
    print(json.dumps([case, "ValueError: " + str(e)]), flush=True)
  except MemoryError:
    if not case.startswith("control"):
      raise
    print(json.dumps([case, "MemoryError"]), flush=True)
"""


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
  """Builds the bomb files, runs every case in one capped subprocess, then deletes them.

  Returns ``{case: (path, outcome)}``; outcome is ``"ValueError: <message>"``.
  """
  if sys.platform != "linux":
    pytest.skip("RLIMIT_AS and /proc/self/status are Linux")
  root = tmp_path_factory.mktemp("bombs")
  files = {
      # A header claiming 40000^3 bytes with a 100-byte body.
      "idx_claim": _write_gz(root / "claim-idx3-ubyte.gz", _idx((40000,) * 3, bytes(100))),
      # A valid-looking header (10 images) followed by 3 GiB of zeros: 3 MB on disk.
      "idx_stream": _gzip_bomb(root / "stream-idx3-ubyte.gz", _idx((10, 28, 28)), 3),
      # MNIST's training images claiming 40000^3: found through load().
      "load_mnist": _tiny_mnist(root / "data" / "mnist",
                                train_images=_idx((40000,) * 3, bytes(100))).parent,
      # A JPEG archive member that really holds 2 GiB of zeros: 2 MB on disk.
      "tar_member": _gzip_bomb(root / "jpeg" / "cifar10" / "cifar10-jpeg.tar.gz",
                               _tar_header("train/cat/0000.jpg", 2 * GIB), 2,
                               bytes(1024)).parent.parent,
      "tar_python": _gzip_bomb(root / "python.tar.gz",
                               _tar_header("cifar-10-batches-py/data_batch_1", 2 * GIB), 2,
                               bytes(1024)),
      # A GNU long-name header of 2 GiB, which tarfile itself would read whole.
      "tar_longname": _gzip_bomb(root / "longname.tar.gz",
                                 _tar_header("././@LongLink", 2 * GIB, tarfile.GNUTYPE_LONGNAME),
                                 2, bytes(1024)),
      # An extracted batch file of 2 GiB (sparse on disk).
      "batch_folder": root / "cifar-10-batches-py",
      # A cache whose train_images header claims 10^9 images, with 20 behind it.
      "cache_claim": root / "mnist-cache.npz",
  }
  files["batch_folder"].mkdir()
  with open(files["batch_folder"] / "data_batch_1", "wb") as f:
    f.truncate(2 * GIB)
  _npz_with_header(files["cache_claim"], (10**9, 28, 28, 1))
  cases = [
      ("idx_claim", "readers.read_idx(path)"),
      ("idx_stream", "readers.read_idx(path)"),
      ("load_mnist", "sources.load('mnist', path, cache_dir=path / 'cache', verbose=False)"),
      ("tar_member", "sources.load('cifar10', path, cache_dir=path / 'cache', verbose=False)"),
      ("tar_python", "readers.read_cifar10_python_tar(path)"),
      ("tar_longname", "readers.read_cifar10_jpeg(path)"),
      ("batch_folder", "readers.read_cifar10_python_folder(path)"),
      ("cache_claim", "sources._read_cache(path, 'mnist')"),
      # Controls: the same files read naively do exhaust the capped address space.
      ("control_idx_stream", "gzip.open(path).read()"),
      ("control_tar_longname", "tarfile.open(path, 'r:gz').getmembers()"),
      ("control_cache_claim", "np.load(path)['train_images']"),
      ("control_alloc", "bytearray(400 << 20)"),
  ]
  files["alloc"] = root
  arg = json.dumps([(case, expr, str(files[case.removeprefix("control_")]))
                    for case, expr in cases])
  proc = subprocess.run([sys.executable, "-c", _HARNESS, arg], capture_output=True, text=True,
                        timeout=120, cwd=REPO)
  assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
  outcomes = dict(json.loads(line) for line in proc.stdout.splitlines())
  yield {case: (files.get(case), outcomes.get(case)) for case, _ in cases}
  shutil.rmtree(root)


def _npz_with_header(path, shape, dtype="|u1", n_real=20):
  """A cache .npz whose train_images header claims ``shape``, with ``n_real`` images."""
  arrays = {"train_images": None, "train_labels": np.zeros(n_real, np.int32),
            "test_images": np.zeros((n_real, 28, 28, 1), np.uint8),
            "test_labels": np.zeros(n_real, np.int32)}
  with zipfile.ZipFile(path, "w") as zf:
    for name, array in arrays.items():
      with zf.open(f"{name}.npy", "w") as f:
        if array is None:
          np.lib.format.write_array_header_1_0(
              f, {"descr": dtype, "fortran_order": False, "shape": shape})
          f.write(bytes(n_real * 784))
        else:
          np.lib.format.write_array(f, array)


def test_controls_exhaust_the_capped_memory(bombs):
  for case in ("control_idx_stream", "control_tar_longname", "control_cache_claim",
               "control_alloc"):
    assert bombs[case][1] == "MemoryError", case


def test_idx_header_claiming_huge_shape(bombs):
  path, outcome = bombs["idx_claim"]
  size = path.stat().st_size
  assert outcome == (f"ValueError: {path}: IDX header declares shape (40000, 40000, 40000) "
                     f"(64000000000000 bytes), more than a {size}-byte gzip file can hold: "
                     "corrupt")


def test_idx_stream_longer_than_its_header(bombs):
  path, outcome = bombs["idx_stream"]
  assert outcome == (f"ValueError: {path}: IDX header declares shape (10, 28, 28) "
                     "(7840 bytes) but the file holds more: corrupt")


def test_load_refuses_idx_of_wrong_shape(bombs):
  root, outcome = bombs["load_mnist"]
  assert outcome == (f"ValueError: {root}/mnist/train-images-idx3-ubyte.gz: IDX header "
                     "declares shape (40000, 40000, 40000); expected (N, 28, 28)")


def test_tar_member_of_2gib(bombs):
  root, outcome = bombs["tar_member"]
  assert outcome == (f"ValueError: {root}/cifar10/cifar10-jpeg.tar.gz: refusing archive: "
                     "member 'train/cat/0000.jpg' is 2147483648 bytes, more than the 65536 "
                     "allowed")
  path, outcome = bombs["tar_python"]
  assert outcome == (f"ValueError: {path}: refusing archive: member "
                     "'cifar-10-batches-py/data_batch_1' is 2147483648 bytes, more than the "
                     "67108864 allowed")


def test_tar_longname_header_of_2gib(bombs):
  path, outcome = bombs["tar_longname"]
  assert outcome == (f"ValueError: {path}: refusing archive: a long-name header of "
                     "2147483648 bytes (at most 65536)")


def test_extracted_batch_of_2gib(bombs):
  folder, outcome = bombs["batch_folder"]
  assert outcome == (f"ValueError: {folder}/data_batch_1: 2147483648 bytes, more than the "
                     "67108864 a CIFAR-10 batch can be")


def test_cache_header_claiming_huge_shape(bombs):
  path, outcome = bombs["cache_claim"]
  assert outcome == (f"ValueError: cache file {path}: train_images.npy: shape "
                     "(1000000000, 28, 28, 1) needs 784000000000 bytes but the member "
                     "holds 15680")


# -- IDX headers (in process: nothing large is ever allocated) ------------------------


@pytest.mark.parametrize("raw, item_shape, message", [
    (_idx((10,), bytes(15)), None, "IDX header declares shape (10,) (10 bytes) but the file "
                                   "holds more: corrupt"),
    (_idx((10,), bytes(5)), None, "IDX header declares shape (10,) (10 bytes) but the file "
                                  "holds 5: truncated or corrupt"),
    (_idx((10, 2)), (), "IDX header declares shape (10, 2); expected (N,)"),
    (_idx((700000,), b""), (), "IDX header declares shape (700000,): 700000 items, more than "
                               "the 600000 allowed (10x the largest MNIST file); refusing to "
                               "allocate it"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x01", None, "IDX header cut short (8 bytes)"),
    (b"\x00\x00\x0d\x01" + bytes(8), None, "not an unsigned-byte IDX file (magic 00000d01)"),
])
def test_idx_header_errors(tmp_path, raw, item_shape, message):
  path = _write_gz(tmp_path / "x-idx1-ubyte.gz", raw)
  with pytest.raises(ValueError) as err:
    readers.read_idx(path, item_shape)
  assert str(err.value) == f"{path}: {message}"


# -- tar archives ----------------------------------------------------------------------


def _tar_raw(path, blocks: bytes) -> pathlib.Path:
  return _write_gz(path, blocks + bytes(1024))


def _jpeg_tar(path, n):
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.new("RGB", (32, 32), "red").save(buf, format="JPEG")
  path.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(path, "w:gz") as tar:
    for i in range(n):
      info = tarfile.TarInfo(f"{'train' if i else 'test'}/cat/{i:04d}.jpg")
      info.size = len(buf.getvalue())
      tar.addfile(info, io.BytesIO(buf.getvalue()))
  return path, info.size


def test_tar_member_count_and_total_caps(tmp_path, monkeypatch):
  path, size = _jpeg_tar(tmp_path / "a.tar.gz", 4)
  assert len(readers.read_cifar10_jpeg(path).train_images) == 3
  monkeypatch.setattr(readers, "CIFAR_JPEG_CAPS", readers.TarCaps(64 << 10, 320 << 20, 3))
  with pytest.raises(ValueError) as err:
    readers.read_cifar10_jpeg(path)
  assert str(err.value) == f"{path}: refusing archive: more than 3 members"
  monkeypatch.setattr(readers, "CIFAR_JPEG_CAPS", readers.TarCaps(64 << 10, 3 * size, 100))
  with pytest.raises(ValueError) as err:
    readers.read_cifar10_jpeg(path)
  assert str(err.value) == (f"{path}: refusing archive: its members hold more than "
                            f"{3 * size} bytes")


@pytest.mark.parametrize("header, message", [
    (_tar_header("././@PaxHeader", 2 * GIB, tarfile.XHDTYPE),
     "a pax header of 2147483648 bytes (at most 65536)"),
    (_tar_header("train/cat/0000.jpg", 10, tarfile.GNUTYPE_SPARSE),
     "member 'train/cat/0000.jpg' is a sparse file"),
    (_tar_header("train/cat/readme.txt", 2 * GIB), "member 'train/cat/readme.txt' is "
                                                   "2147483648 bytes, more than the 65536 allowed"),
])
def test_tar_headers_refused_before_reading(tmp_path, header, message):
  path = _tar_raw(tmp_path / "c.tar.gz", header)
  with pytest.raises(ValueError) as err:
    readers.read_cifar10_jpeg(path)
  assert str(err.value) == f"{path}: refusing archive: {message}"


def test_python_tar_unread_member_capped_and_duplicate_batch(tmp_path):
  path = _tar_raw(tmp_path / "p.tar.gz", _tar_header("cifar-10-batches-py/readme.html", 2 * GIB))
  with pytest.raises(ValueError) as err:
    readers.read_cifar10_python_tar(path)
  assert str(err.value) == (f"{path}: refusing archive: member 'cifar-10-batches-py/readme.html'"
                            " is 2147483648 bytes, more than the 67108864 allowed")
  batch = _tar_header("cifar-10-batches-py/data_batch_1", 512) + bytes(512)
  path = _tar_raw(tmp_path / "p.tar.gz", batch + batch)
  with pytest.raises(ValueError) as err:
    readers.read_cifar10_python_tar(path)
  assert str(err.value) == (f"{path}: refusing archive: member "
                            "'cifar-10-batches-py/data_batch_1' appears twice")


# -- the decoded-data cache -------------------------------------------------------------


class _Marker:
  """Unpickling it would create ``path``: proof that a cache is never unpickled."""

  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return open, (self.path, "w")


def _cached_mnist(tmp_path):
  """A tiny MNIST, loaded once: returns (data root, its folder, cache file, dataset)."""
  folder = _tiny_mnist(tmp_path / "data" / "mnist")
  ds = sources.load("mnist", tmp_path / "data", cache_dir=tmp_path / "cache", verbose=False)
  [cache] = (tmp_path / "cache").iterdir()
  return tmp_path / "data", folder, cache, ds


def _splits(ds):
  return {k: getattr(ds, k) for k in readers.Splits._fields}


@pytest.mark.parametrize("case", ["label_200", "image_shape", "count", "empty", "missing",
                                  "int64_labels", "pickled", "truncated", "claim"])
def test_bad_cache_is_discarded_and_rebuilt(tmp_path, caplog, case):
  root, folder, cache, ds = _cached_mnist(tmp_path)
  arrays = _splits(ds)
  if case == "label_200":
    arrays["train_labels"] = arrays["train_labels"].copy()
    arrays["train_labels"][3] = 200
    reason = "train label 3 is 200, outside [0, 10)"
  elif case == "image_shape":
    arrays["train_images"] = np.zeros((20, 32, 32, 1), np.uint8)
    reason = "train_images.npy is uint8 (20, 32, 32, 1), expected uint8 (N, 28, 28, 1)"
  elif case == "count":
    arrays["train_labels"] = arrays["train_labels"][:19]
    reason = "train labels are int32 (19,), expected int32 (20,): one per image"
  elif case == "empty":
    arrays["train_images"] = arrays["train_images"][:0]
    arrays["train_labels"] = arrays["train_labels"][:0]
    reason = "no train images"
  elif case == "missing":
    del arrays["test_labels"]
    reason = ("holds ['test_images.npy', 'train_images.npy', 'train_labels.npy'], expected "
              "['test_images.npy', 'test_labels.npy', 'train_images.npy', 'train_labels.npy']")
  elif case == "int64_labels":
    arrays["test_labels"] = arrays["test_labels"].astype(np.int64)
    reason = "test_labels.npy is int64 (10,), expected int32 (N,)"
  elif case == "pickled":
    arrays["train_labels"] = np.array([_Marker(tmp_path / "pwned")] * 20, dtype=object)
    reason = "train_labels.npy is object (20,), expected int32 (N,)"
  if case == "truncated":
    cache.write_bytes(cache.read_bytes()[:1000])
    reason = "File is not a zip file"
  elif case == "claim":
    _npz_with_header(cache, (10**9, 28, 28, 1))
    reason = ("train_images.npy: shape (1000000000, 28, 28, 1) needs 784000000000 bytes but "
              "the member holds 15680")
  else:
    with open(cache, "wb") as f:
      np.savez(f, **arrays)
  with pytest.raises(ValueError) as err:
    sources._read_cache(cache, "mnist")
  assert str(err.value) == f"cache file {cache}: {reason}"
  caplog.clear()
  again = sources.load("mnist", root, cache_dir=tmp_path / "cache", verbose=False)
  assert [r.getMessage() for r in caplog.records] == [
      f"data: cache file {cache}: {reason}; discarding it and decoding offline IDX files in "
      f"{folder} again"]
  for k, v in _splits(ds).items():
    np.testing.assert_array_equal(getattr(again, k), v)
  assert not (tmp_path / "pwned").exists()
  caplog.clear()
  sources.load("mnist", root, cache_dir=tmp_path / "cache", verbose=False)  # rebuilt: a hit
  assert not caplog.records and _listing(tmp_path / "cache") == [cache.name]


def test_cache_and_sample_loaded_without_pickle(tmp_path, monkeypatch):
  calls = []
  real_load = np.load
  monkeypatch.setattr(np, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
  root, _, _, _ = _cached_mnist(tmp_path)
  sources.load("mnist", root, cache_dir=tmp_path / "cache", verbose=False)
  sources.load("mnist_sample", verbose=False)
  assert calls == [{"allow_pickle": False}] * 2


def test_empty_dataset_is_never_cached(tmp_path):
  folder = _tiny_mnist(tmp_path / "data" / "mnist", n_train=0)
  with pytest.raises(ValueError) as err:
    sources.load("mnist", tmp_path / "data", cache_dir=tmp_path / "cache", verbose=False)
  assert str(err.value) == f"offline IDX files in {folder}: no train images"
  assert _listing(tmp_path / "cache") == []


def test_cache_writer_never_follows_symlinks(tmp_path):
  root, _, cache, ds = _cached_mnist(tmp_path)
  victim = tmp_path / "victim"
  victim.write_bytes(b"precious")
  cache.unlink()
  cache.symlink_to(victim)  # at the cache's own name: read, found invalid, replaced
  for name in (cache.name + ".tmp", "." + cache.name + ".tmp"):
    (cache.parent / name).symlink_to(victim)
  sources.load("mnist", root, cache_dir=tmp_path / "cache", verbose=False)
  assert victim.read_bytes() == b"precious"
  assert cache.is_file() and not cache.is_symlink()
  assert sorted(_listing(cache.parent)) == sorted([cache.name, cache.name + ".tmp",
                                                   "." + cache.name + ".tmp"])


def test_cache_write_failure_is_a_warning(tmp_path, caplog):
  folder = _tiny_mnist(tmp_path / "data" / "mnist")
  not_a_dir = tmp_path / "cache"
  not_a_dir.write_bytes(b"")
  ds = sources.load("mnist", tmp_path / "data", cache_dir=not_a_dir, verbose=False)
  assert len(ds.train_images) == 20
  [record] = caplog.records
  assert record.getMessage().startswith(f"data: could not write cache file {not_a_dir}/mnist-")
  assert record.getMessage().endswith(f".npz ([Errno 17] File exists: '{not_a_dir}'); "
                                      "continuing without it")
  assert folder.is_dir() and not_a_dir.read_bytes() == b""


def test_cache_write_is_atomic_through_the_helper(tmp_path, monkeypatch):
  def fail(f, **arrays):
    f.write(b"partial")
    raise OSError(28, "No space left on device")

  cache = tmp_path / "x.npz"
  cache.write_bytes(b"old")
  monkeypatch.setattr(np, "savez", fail)
  splits = readers.Splits(*[np.zeros((1, 28, 28, 1), np.uint8), np.zeros(1, np.int32)] * 2)
  with pytest.raises(OSError, match="No space left on device"):
    sources._write_cache(cache, splits)
  assert _listing(tmp_path) == ["x.npz"] and cache.read_bytes() == b"old"


# -- through the CLI: a one-line error, no traceback -------------------------------------


def test_cli_train_on_idx_bomb_prints_one_line(tmp_path):
  bad = _idx((40000,) * 3, bytes(100))
  folder = _tiny_mnist(tmp_path / "data" / "mnist", train_images=bad)
  env = {**os.environ, "JCOMPRESS_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "jcompress.cli", "train", "--model", "lenet300", "--dataset",
       "mnist", "--data-dir", str(tmp_path / "data"), "--workdir", str(tmp_path / "run"),
       "--epochs", "1"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr
  assert (f"jcompress train: error: {folder}/train-images-idx3-ubyte.gz: IDX header declares "
          "shape (40000, 40000, 40000); expected (N, 28, 28)") in proc.stderr.splitlines()
  # Nothing of the dataset is cached (cli-*.json is the parser's, jcompress.cli_spec).
  assert [n for n in _listing(tmp_path / "cache") if not n.startswith("cli-")] == []
