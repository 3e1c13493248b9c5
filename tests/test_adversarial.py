"""Adversarial inputs (issue 18): bad option values and malformed export files end
in one line ``jcompress COMMAND: error: ...`` naming the option, file or tensor,
with exit status 2 and no traceback; sizes read in a file never allocate beyond
the model (proved under ``RLIMIT_AS`` in a subprocess); the restricted unpickler
rebuilds pickled bytes and nothing else.

Every bad file is crafted here from a real export of a tiny run (LeNet-300-100,
the embedded MNIST sample, one epoch) by rewriting its JSON header: the magic
``JCMPRS01``, a little-endian uint32 header length, the header, the payload.
"""

import codecs
import copy
import json
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

from jcompress import export
from jcompress.cli import main
from jcompress.data import readers
from jcompress.train.compress import compress
from jcompress.train.loop import TrainConfig, train_and_evaluate

TRAIN = ["train", "--model", "lenet300", "--dataset", "mnist_sample", "--epochs", "1",
         "--batch-size", "64"]


def _quiet(*_):
  pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A trained run, its pruned copy (one-shot) and both exports."""
  root = tmp_path_factory.mktemp("adversarial")
  train_and_evaluate(TrainConfig(model="lenet300", dataset="mnist_sample", epochs=1,
                                 batch_size=64, lr=1e-3, optimizer="adam"), root / "base",
                     log=_quiet)
  compress(root / "base", root / "pruned", "prune", {"sparsity": "0.9"}, epochs=0, log=_quiet)
  for name in ("base", "pruned"):  # the codecs' own bytes (tests/test_entropy.py: coded)
    assert main(["export", "--workdir", str(root / name), "--out", str(root / f"{name}.jcm"),
                 "--entropy", "none"]) == 0
  return root


def _one_error(err: str, command: str) -> str:
  """The single stderr line of a failed command, checked for its form."""
  assert "Traceback" not in err, err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(f"jcompress {command}: error: "), err
  return lines[0]


def _fails(argv, capsys) -> str:
  """Runs the command; it must fail with status 2 and one error line, which is returned."""
  capsys.readouterr()
  try:
    rc = main(argv)
  except SystemExit as e:  # argparse's errors (still one line: cli._Parser)
    rc = e.code
  assert rc == 2
  return _one_error(capsys.readouterr().err, argv[0])


# --- option values -------------------------------------------------------------------

@pytest.mark.parametrize("argv, option", [
    (TRAIN + ["--lr", "nan"], "--lr"),
    (TRAIN + ["--lr", "inf"], "--lr"),
    (TRAIN + ["--momentum", "nan"], "--momentum"),
    (TRAIN + ["--weight-decay=-inf"], "--weight-decay"),
    (TRAIN + ["--warmup-epochs", "inf"], "--warmup-epochs"),
    (TRAIN + ["--decay-factor", "nan"], "--decay-factor"),
    (TRAIN + ["--label-smoothing", "nan"], "--label-smoothing"),
    (TRAIN + ["--decay-epochs", "1,nan"], "--decay-epochs"),
    (TRAIN + ["--width", "inf"], "--width"),
    (TRAIN + ["--model-arg", "dropout=NaN"], "--model-arg"),
    (TRAIN + ["--model-arg", "dropout=1e999"], "--model-arg"),
    (TRAIN + ["--seed", str(2 ** 70)], "--seed"),
    (TRAIN + ["--seed", "-1"], "--seed"),
    (["compress", "--from", "a", "--workdir", "b", "--method", "prune", "--lr", "nan"], "--lr"),
    (["compress", "--from", "a", "--workdir", "b", "--method", "prune", "--momentum", "inf"],
     "--momentum"),
    (["summary", "--model", "lenet300", "--pj-per-mac", "nan"], "--pj-per-mac"),
    (["summary", "--model", "fcn", "--width", "inf"], "--width"),
])
def test_non_finite_and_out_of_range_values_refused_when_parsed(argv, option, tmp_path,
                                                                 capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  line = _fails(argv + (["--workdir", "w"] if argv[0] == "train" else []), capsys)
  assert f"argument {option}" in line
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("field, value, option", [
    ("seed", 2 ** 70, "--seed"), ("seed", -1, "--seed"), ("lr", float("nan"), "--lr"),
    ("momentum", float("inf"), "--momentum"), ("warmup_epochs", float("nan"), "--warmup-epochs"),
    ("decay_epochs", (1e9,), "--decay-epochs"), ("decay_epochs", (-1.0,), "--decay-epochs"),
])
def test_train_config_validate_names_the_option(field, value, option):
  config = TrainConfig(model="lenet300", dataset="mnist_sample", epochs=3, **{field: value})
  with pytest.raises(ValueError, match=option):
    config.validate()


def test_decay_epochs_beyond_the_run_is_an_error(tmp_path, capsys):
  line = _fails(TRAIN + ["--schedule", "step", "--decay-epochs", "1e9",
                         "--workdir", str(tmp_path / "w")], capsys)
  assert "--decay-epochs" in line and "--epochs 1" in line
  assert not (tmp_path / "w").exists()


def test_bad_select_regex_is_an_error(runs, tmp_path, capsys):
  line = _fails(["compress", "--from", str(runs / "base"), "--workdir", str(tmp_path / "w"),
                 "--method", "prune", "--select", "("], capsys)
  assert "--select '('" in line and "regular expression" in line
  assert not (tmp_path / "w").exists()


def test_export_out_a_directory_leaves_nothing_behind(runs, tmp_path, capsys):
  out = tmp_path / "exp"
  out.mkdir()
  line = _fails(["export", "--workdir", str(runs / "base"), "--out", str(out)], capsys)
  assert f"--out {out} is a directory" in line
  assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"] and not any(out.iterdir())


# --- malformed export files ----------------------------------------------------------

def _read(path: pathlib.Path) -> tuple[dict, bytes]:
  blob = path.read_bytes()
  (length,) = struct.unpack("<I", blob[8:12])
  text = blob[12:12 + length]
  return json.loads(zlib.decompress(text) if blob[:8] == export.MAGIC_Z else text), \
      blob[12 + length:]


def _write(path: pathlib.Path, header, payload: bytes, raw: bytes | None = None) -> pathlib.Path:
  text = raw if raw is not None else json.dumps(header).encode()
  path.write_bytes(export.MAGIC + struct.pack("<I", len(text)) + text + payload)
  return path


def _entry(header: dict, path: str) -> dict:
  return next(e for e in header["tensors"] if e["path"] == path)


def _set(path, key, value):
  def change(h):
    _entry(h, path)[key] = value
  return change


def _set_meta(path, **values):
  def change(h):
    _entry(h, path)["meta"].update(values)
  return change


def _drop(path):
  def change(h):
    h["tensors"] = [e for e in h["tensors"] if e["path"] != path]
  return change


def _top(key, value):
  def change(h):
    h[key] = value
  return change


def _nan_offset(h):
  _entry(h, "fc1/bias")["offset"] = float("nan")  # json.dumps writes NaN


def _tensors_dict(h):
  h["tensors"] = {e["path"]: e for e in h["tensors"]}


def _duplicate(h):
  h["tensors"].append(copy.deepcopy(h["tensors"][0]))


# (which export, how its header changes, what the error line must say)
MALFORMED = {
    "negative shape": ("base", _set("fc1/bias", "shape", [-1]), "'fc1/bias' has a bad shape [-1]"),
    "missing tensor": ("base", _drop("fc2/bias"), "params/fc2/bias of the model is missing"),
    "dot-dot path": ("base", _set("fc1/bias", "path", "../fc1/bias"),
                     "'../fc1/bias' has a bad collection or path"),
    "tensors as a dict": ("base", _tensors_dict, "the header has no tensor list"),
    "no tensors": ("base", _top("tensors", []), "params/fc1/bias of the model is missing"),
    "NaN offset": ("base", _nan_offset, "'fc1/bias' has a bad offset nan"),
    "offset past the end": ("base", _set("fc3/bias", "offset", 10 ** 12),
                            "'fc3/bias' lies outside the"),
    "twice the same tensor": ("base", _duplicate, "appears twice"),
    "negative bits": ("base", _set("fc1/kernel", "bits", -4), "'fc1/kernel' has bad bits -4"),
    "bits as text": ("base", _set("fc1/kernel", "bits", "4"), "'fc1/kernel' has bad bits '4'"),
    "num_classes -3": ("base", _top("num_classes", -3), "num_classes must be a positive integer"),
    "unknown model": ("base", _top("model", "resnet9000"), "holds model 'resnet9000'"),
    "model_config not an object": ("base", _top("model_config", [1]), "model_config must be"),
    "unknown model option": ("base", _top("model_config", {"depth": 3}), "has no option depth"),
    "unknown dataset": ("base", _top("dataset", "svhn"), "unknown dataset 'svhn'"),
    "input shape not the dataset's": ("base", _top("input_shape", [28, 28, 3]),
                                      "input_shape [28, 28, 3] is not mnist_sample's"),
    "compression not a list": ("base", _top("compression", "prune"),
                               "compression plan is not a list"),
    "unknown encoding": ("base", _set("fc1/bias", "encoding", "zzz"),
                         "unknown encoding 'zzz' of fc1/bias"),
    "float32 meta shape": ("base", _set_meta("fc1/bias", shape=[40000, 40000]),
                           "'fc1/bias' has shape [300] but its meta says [40000, 40000]"),
    "layout not an object": ("pruned", _set_meta("fc1/kernel", layout=[0, 1]),
                             "'fc1/kernel' (prune) is corrupt"),
    "index bits 40": ("pruned", _set_meta("fc1/kernel", index_bits=40),
                      "'fc1/kernel' (prune) is corrupt: ValueError: bits must be"),
    "unknown sparse format": ("pruned", _set_meta("fc1/kernel", format="zzz"),
                              "unknown sparse format 'zzz'"),
    "short bitmask": ("pruned", _set_meta("fc1/kernel", format="bitmask",
                                          layout={"mask": [0, 10], "values": [10, 100]}),
                      "mask cannot cover 235200 entries"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_export_is_one_clear_error(runs, tmp_path, capsys, case):
  which, change, message = MALFORMED[case]
  header, payload = _read(runs / f"{which}.jcm")
  change(header)
  bad = _write(tmp_path / "bad.jcm", header, payload)
  line = _fails(["eval", "--exported", str(bad)], capsys)
  assert str(bad) in line and message in line


@pytest.mark.parametrize("case", ["deep JSON", "header not JSON", "bad magic", "directory",
                                  "missing file", "header longer than the file"])
def test_unreadable_export_is_one_clear_error(runs, tmp_path, capsys, case):
  _, payload = _read(runs / "base.jcm")
  bad = tmp_path / "bad.jcm"
  if case == "deep JSON":
    _write(bad, None, payload, b"[" * 200_000 + b"]" * 200_000)
    message = "the header is not valid JSON"
  elif case == "header not JSON":
    _write(bad, None, payload, b"{nope")
    message = "the header is not valid JSON"
  elif case == "bad magic":
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    message = "not a jcompress export"
  elif case == "directory":
    bad.mkdir()
    message = "is a directory"
  elif case == "missing file":
    message = "No such file or directory"
  else:
    bad.write_bytes(export.MAGIC + struct.pack("<I", 2 ** 32 - 1) + b"{}")
    message = "header length 4294967295 exceeds the file"
  line = _fails(["eval", "--exported", str(bad)], capsys)
  assert str(bad) in line and message in line


def test_header_caps(runs, tmp_path, capsys):
  header, payload = _read(runs / "base.jcm")
  deep = 1
  for _ in range(export.MAX_DEPTH):
    deep = [deep]
  nested = header | {"model_config": {"a": deep}}
  line = _fails(["eval", "--exported", str(_write(tmp_path / "deep.jcm", nested, payload))], capsys)
  assert f"nests deeper than {export.MAX_DEPTH} levels" in line
  many = header | {"tensors": [header["tensors"][0]] * (export.MAX_TENSORS + 1)}
  line = _fails(["eval", "--exported", str(_write(tmp_path / "many.jcm", many, payload))], capsys)
  assert f"more than the {export.MAX_TENSORS} allowed" in line


def test_well_formed_crafted_export_still_loads(runs, tmp_path, capsys):
  """The crafting itself is faithful: an unchanged header round-trips."""
  header, payload = _read(runs / "pruned.jcm")
  good = _write(tmp_path / "good.jcm", header, payload)
  assert main(["eval", "--exported", str(good), "--json"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  record = json.loads((runs / "pruned" / "metrics.jsonl").read_text().splitlines()[-1])
  assert result["accuracy"] == pytest.approx(record["test_accuracy"], abs=1e-6)


# --- memory: sizes claimed in a file, under an address-space cap ---------------------

_CAPPED = textwrap.dedent("""
    import contextlib, io, json, resource, sys, traceback
    from jcompress.cli import main
    from jcompress.measure import load_exported
    good, cases = sys.argv[1], json.loads(sys.argv[2])
    load_exported(good)  # JAX started, a model built and decoded: the baseline
    with open("/proc/self/status") as f:
      vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (400 << 20), resource.RLIM_INFINITY))
    out = {}
    for path in cases:
      err = io.StringIO()
      try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
          rc = main(["eval", "--exported", path])
      except BaseException:
        rc, err = None, io.StringIO(traceback.format_exc())
      out[path] = [rc, err.getvalue()]
    print(json.dumps(out))
""")


def _tucker_factors(shapes):
  def change(h):
    e = _entry(h, "fc1/kernel")
    e.update(encoding="tucker", module="jcompress.transforms.tucker", length=0,
             meta={"shapes": shapes, "layout": {"core": [0, 0], "u_in": [0, 0], "u_out": [0, 0]}})
  return change


def _both_shapes(h):
  e = _entry(h, "fc1/kernel")
  e["shape"] = e["meta"]["shape"] = [40000, 40000]
  e["meta"].update(format="bitmask", layout={"mask": [0, 100], "values": [100, 1000]})


MEMORY = {  # each would allocate gigabytes if the size it claims were trusted
    "bitmask 40000x40000 in the meta": ("pruned", _set_meta(
        "fc1/kernel", shape=[40000, 40000], format="bitmask",
        layout={"mask": [0, 100], "values": [100, 1000]}),
        "'fc1/kernel' has shape [784, 300] but its meta says [40000, 40000]"),
    "bitmask 40000x40000 in the entry": ("pruned", _both_shapes,
                                         "params/fc1/kernel has shape [40000, 40000], the model"),
    "1e12 relative entries": ("pruned", _set_meta("fc1/kernel", entries=10 ** 12),
                              "cannot hold 1000000000000 codes"),
    "1e12 kept entries": ("pruned", _set_meta("fc1/kernel", format="bitmask", kept=10 ** 12,
                                              layout={"mask": [0, 29400], "values": [29400, 100]}),
                          "the meta says 1000000000000"),
    "Tucker factors of 50000^2 from no bytes": ("base", _tucker_factors(
        [[0, 0], [50000, 0], [50000, 0]]),
        "rebuild a kernel of shape [50000, 50000], not [784, 300]"),
    "Tucker core of 50000^2": ("base", _tucker_factors(
        [[50000, 50000], [784, 50000], [300, 50000]]), "'fc1/kernel' (tucker) is corrupt"),
}


def test_claimed_sizes_never_allocate(runs, tmp_path):
  cases = {}
  for name, (which, change, message) in MEMORY.items():
    header, payload = _read(runs / f"{which}.jcm")
    change(header)
    cases[str(_write(tmp_path / f"{len(cases)}.jcm", header, payload))] = (name, message)
  sparse = tmp_path / "sparse.jcm"  # a 100 MiB file of holes: the header says 96 MiB
  with open(sparse, "wb") as f:
    f.write(export.MAGIC + struct.pack("<I", 96 << 20))
    f.truncate(100 << 20)
  cases[str(sparse)] = ("header of 96 MiB", "header length 100663296 exceeds the file or the "
                        "67108864-byte limit")
  cases["/dev/zero"] = ("/dev/zero", "/dev/zero is not a regular file")
  proc = subprocess.run([sys.executable, "-c", _CAPPED, str(runs / "pruned.jcm"),
                         json.dumps(list(cases))], capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parents[1])))
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  for path, (name, message) in cases.items():
    rc, err = results[path]
    assert rc == 2, (name, err)
    line = _one_error(err, "eval")
    assert path in line and message in line, (name, line)


# --- the restricted unpickler --------------------------------------------------------

class _Encode:
  def __init__(self, *args):
    self.args = args

  def __reduce__(self):
    return codecs.encode, self.args  # pickled as _codecs.encode


def _batch(data) -> bytes:
  return pickle.dumps({b"data": data, b"labels": [0]}, protocol=2)


def test_unpickler_rebuilds_bytes_only_from_latin1_text():
  pixels = bytes(range(256)) * 12
  loaded = readers._ArrayUnpickler(
      __import__("io").BytesIO(pickle.dumps({b"x": pixels}, protocol=2)), encoding="bytes").load()
  assert loaded == {b"x": pixels}  # protocol 2 writes bytes as _codecs.encode(text, "latin1")
  assert b"_codecs" in pickle.dumps(pixels, protocol=2)
  for args in (("abc", "rot13"), ("abc", "utf-16"), (b"abc", "latin1"), (12, "latin1"),
               ("abc", "hex")):
    with pytest.raises(ValueError, match="test_batch: not a CIFAR-10 python batch.*refusing "
                       "to unpickle _codecs.encode"):
      readers._cifar_batch(_batch(_Encode(*args)), "x.tar.gz: test_batch")


def test_unpickler_still_refuses_code():
  with pytest.raises(ValueError, match="refusing to unpickle posix.system|refusing to "
                     "unpickle os.system"):
    readers._cifar_batch(_batch(os.system), "test_batch")
  assert np.asarray(readers._cifar_batch(_batch(np.zeros((1, 3072), np.uint8)), "b")[0]).shape \
      == (1, 32, 32, 3)
