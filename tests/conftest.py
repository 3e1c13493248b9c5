"""Shared fixtures: the offline data directory and an isolated cache."""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _shared_data() -> pathlib.Path | None:
  env = os.environ.get("JCOMPRESS_DATA_DIR")
  path = pathlib.Path(env) if env else REPO.parent / "shared" / "data"
  return path if (path / "mnist").is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  """The offline copy of the real datasets (``JCOMPRESS_DATA_DIR`` or ../shared/data)."""
  path = _shared_data()
  if path is None:
    pytest.skip("real datasets not found: set JCOMPRESS_DATA_DIR (CI sets ../shared/data)")
  return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
  """Every test of a process (pytest-xdist runs one per CPU) shares one session cache
  dir, never the user's ~/.cache. Commands run through ``cli.main`` share one
  persistent compilation cache in it (as a user's second command does): the many
  tests that train the same small model compile it once per process, which keeps CI
  short."""
  monkeypatch.setenv("JCOMPRESS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
  monkeypatch.delenv("JCOMPRESS_COMPILE_CACHE", raising=False)

# An outside package of methods for the plugin tests: imported only by their subprocesses.
collect_ignore = ["plugins"]


@pytest.fixture
def without_onnx(monkeypatch):
  """``import onnx`` / ``import onnxruntime`` fail, as without ``jcompress[deploy]``."""
  import builtins  # pylint: disable=import-outside-toplevel
  real = builtins.__import__

  def no_onnx(name, *args, **kwargs):
    if name.split(".")[0] in ("onnx", "onnxruntime"):
      raise ImportError(f"No module named {name!r}", name=name)
    return real(name, *args, **kwargs)
  monkeypatch.setattr(builtins, "__import__", no_onnx)


def workdir_logits(workdir, x):
  """The logits of ``workdir``'s model (its compression plan applied) on ``x``: what an
  exported file of it should reproduce."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jcompress.train.loop import load_workdir  # pylint: disable=import-outside-toplevel
  model, state, _, method = load_workdir(workdir)
  variables = {"params": method.apply(state.params, state.cstate)}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  if method.forward is None:
    return np.asarray(model.apply(variables, x, train=False))
  with method.forward(state.params, state.cstate):  # act_quant's activation rounding
    return np.asarray(model.apply(variables, x, train=False))
