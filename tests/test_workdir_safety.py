"""Issue 18, workdirs and checkpoints: one run per workdir, one process per workdir,
only finite and intact checkpoints, the source of ``compress`` never written,
broken steps skipped, retention across restarts, divergence caught, and a one-line
error (exit 2, no traceback) for each bad case."""

import errno
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest

from jcompress import workdir_lock
from jcompress.checkpoint import CheckpointError, Checkpoints
from jcompress.cli import main
from jcompress.train import loop, optim
from jcompress.train.runs import NonFiniteLossError
from jcompress.train.loop import TrainConfig, load_workdir, \
    read_metrics, train_and_evaluate
from jcompress.train.state import TrainState

RUN = ["--model", "lenet300", "--dataset", "mnist_sample", "--batch-size", "64",
       "--train-size", "256", "--optimizer", "adam", "--lr", "0.001", "--schedule", "constant"]


def _config(**kw) -> TrainConfig:
  return TrainConfig(**{**dict(model="lenet300", dataset="mnist_sample", batch_size=64,
                               train_size=256, optimizer="adam", lr=0.001,
                               schedule="constant", epochs=2), **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
  """A finished 2-epoch run (checkpoints 1 and 2); tests work on copies."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  assert main(["train", *RUN, "--epochs", "2", "--workdir", str(workdir)]) == 0
  return workdir


@pytest.fixture
def run(trained, tmp_path) -> pathlib.Path:
  copy = tmp_path / "run"
  shutil.copytree(trained, copy)
  return copy


def _with(argv: list[str], option: str, value: str) -> list[str]:
  """``argv`` with ``option`` set to ``value``."""
  argv = list(argv)
  if option in argv:
    argv[argv.index(option) + 1] = value
  else:
    argv += [option, value]
  return argv


def _error(capsys, argv: list[str]) -> str:
  """Runs the CLI expecting a one-line error: exit 2, no traceback; returns it."""
  capsys.readouterr()
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  lines = [l for l in err.splitlines() if l.startswith("jcompress ")]
  assert len(lines) == 1, err
  return lines[0]


def _snapshot(folder: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
          for p in sorted(folder.rglob("*"))}


# 3. A workdir belongs to one run ------------------------------------------------

@pytest.mark.parametrize("change, shown", [
    (["--lr", "0.1"], "--lr: saved 0.001, now 0.1"),
    (["--seed", "1"], "--seed: saved 0, now 1"),
    (["--train-size", "128"], "--train-size: saved 256, now 128"),
    (["--optimizer", "sgd"], "--optimizer: saved adam, now sgd"),
    (["--batch-size", "32"], "--batch-size: saved 64, now 32"),
    (["--label-smoothing", "0.1"], "--label-smoothing: saved 0.0, now 0.1"),
])
def test_resume_with_other_settings_is_refused(run, capsys, change, shown):
  before = _snapshot(run)
  line = _error(capsys, _with(["train", *RUN, "--epochs", "3", "--workdir", str(run)], *change))
  assert f"--workdir {run} holds a run with other settings ({shown})" in line
  assert "another --workdir or with --overwrite" in line
  assert _snapshot(run) == before  # nothing written: not config.json, not metrics.jsonl


def test_every_difference_is_listed_and_epochs_may_change(run, capsys):
  argv = ["train", *RUN, "--epochs", "3", "--workdir", str(run)]
  line = _error(capsys, _with(_with(_with(argv, "--optimizer", "sgd"), "--lr", "0.5"),
                              "--seed", "3"))
  assert ("--lr: saved 0.001, now 0.5; --optimizer: saved adam, now sgd; --seed: saved 0, "
          "now 3") in line
  # --epochs (continue longer), --keep, --save-every, --eval-batch-size may change.
  assert main(["train", *RUN, "--epochs", "3", "--keep", "3", "--eval-batch-size", "100",
               "--workdir", str(run)]) == 0
  assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
  assert json.loads((run / "config.json").read_text())["train_config"]["epochs"] == 3


def test_checkpoint_of_another_run_is_refused(trained, tmp_path, capsys):
  # "epoch 2 of 1": a later checkpoint copied into a run of fewer epochs
  copied = tmp_path / "copied"
  shutil.copytree(trained / "checkpoints" / "2", copied / "checkpoints" / "2")
  line = _error(capsys, ["train", *RUN, "--epochs", "1", "--workdir", str(copied)])
  assert (f"holds checkpoint {copied / 'checkpoints' / '2'} of epoch 2, beyond --epochs 1"
          in line and "give --epochs 2 or more" in line)
  assert not (copied / "metrics.jsonl").exists() and not (copied / "config.json").exists()
  # the same checkpoint under a run with another learning rate
  line = _error(capsys, _with(["train", *RUN, "--epochs", "5", "--workdir", str(copied)],
                              "--lr", "0.01"))
  assert "--lr: saved 0.001, now 0.01" in line


def test_compress_with_another_plan_is_refused(trained, tmp_path, capsys):
  dst = tmp_path / "pruned"
  base = ["compress", "--from", str(trained), "--workdir", str(dst), "--method", "prune"]
  assert main([*base, "--sparsity", "0.5"]) == 0
  before = _snapshot(dst)
  line = _error(capsys, [*base, "--sparsity", "0.8"])
  assert f"--workdir {dst} holds a run with other settings (the compression plan: saved" in line
  line = _error(capsys, [*base, "--sparsity", "0.5", "--lr", "0.01"])
  assert "--lr: saved 0.001, now 0.01" in line
  assert _snapshot(dst) == before


def test_overwrite_starts_afresh(run):
  record = train_and_evaluate(_config(epochs=1, lr=0.002, overwrite=True), run, log=print)
  assert record["epoch"] == 1
  assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1]
  assert Checkpoints(run).steps() == [1]
  config = json.loads((run / "config.json").read_text())["train_config"]
  assert config["lr"] == 0.002 and "overwrite" not in config
  assert not (run / workdir_lock.LOCK_NAME).exists()


# 4. One process per workdir ------------------------------------------------------

def _lock(workdir: pathlib.Path, pid: int, host: str | None = None) -> dict:
  holder = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00",
            "command": "jcompress train --workdir x"}
  (workdir / workdir_lock.LOCK_NAME).write_text(json.dumps(holder))
  return holder


def test_second_process_stops_at_once_naming_the_holder(run, tmp_path, capsys):
  other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    holder = _lock(run, other.pid)
    before = _snapshot(run)
    line = _error(capsys, ["train", *RUN, "--epochs", "3", "--workdir", str(run)])
    assert (f"--workdir {run} is in use by another jcompress run (pid {other.pid} on "
            f"{socket.gethostname()}, since 2026-01-01T00:00:00") in line
    line = _error(capsys, ["compress", "--from", str(tmp_path / "nope"), "--workdir", str(run),
                           "--method", "prune"])
    assert f"pid {other.pid}" in line  # before --from is even read
    assert _snapshot(run) == before  # the lock is the holder's, untouched
    # readers need no lock
    assert main(["eval", "--workdir", str(run)]) == 0
    assert main(["summary", "--workdir", str(run)]) == 0
    assert json.loads((run / workdir_lock.LOCK_NAME).read_text()) == holder
  finally:
    other.kill()
    other.wait()


def test_lock_of_another_host_names_the_file_to_delete(run, capsys):
  _lock(run, 12345, host="elsewhere.example")
  line = _error(capsys, ["train", *RUN, "--epochs", "2", "--workdir", str(run)])
  assert "pid 12345 on elsewhere.example" in line
  assert f"delete {run / workdir_lock.LOCK_NAME}" in line


def test_stale_lock_is_taken_over_and_released(run, capsys):
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  _lock(run, gone.pid)
  capsys.readouterr()
  assert main(["train", *RUN, "--epochs", "2", "--workdir", str(run)]) == 0
  err = capsys.readouterr().err
  assert f"took over the stale lock {run / workdir_lock.LOCK_NAME}" in err
  assert f"pid {gone.pid}" in err
  assert not (run / workdir_lock.LOCK_NAME).exists()


def test_lock_is_released_on_errors_and_empty_new_workdir_removed(tmp_path, capsys):
  new = tmp_path / "new" / "run"
  _error(capsys, ["compress", "--from", str(tmp_path / "missing"), "--workdir", str(new),
                  "--method", "prune"])
  assert not (tmp_path / "new").exists()  # created for the lock, removed again: empty
  with workdir_lock.hold(tmp_path / "w"):
    with workdir_lock.hold(tmp_path / "w"):  # re-entrant in the holding thread
      assert (tmp_path / "w" / ".lock").exists()
    assert (tmp_path / "w" / ".lock").exists()
  assert not (tmp_path / "w" / ".lock").exists()


# 5. A good checkpoint is a finite, intact one -------------------------------------

def test_params_blown_up_in_the_last_step_stop_the_run(tmp_path, capsys, monkeypatch):
  # The last step's update makes the weights NaN: the loss summed so far is finite.
  make = optim.make_optimizer
  monkeypatch.setattr(optim, "make_optimizer", lambda name, schedule, **kw: make(
      name, lambda t: jnp.where(t >= 3, jnp.nan, 1e-3), **kw))
  workdir = tmp_path / "nan"
  line = _error(capsys, ["train", *RUN, "--epochs", "2", "--workdir", str(workdir)])
  assert ("parameter params/fc1/bias became non-finite (NaN or infinity) in epoch 1; stopped: "
          "no checkpoint had been saved yet. Try a lower --lr.") in line
  assert not (workdir / "checkpoints").exists() or not list((workdir / "checkpoints").iterdir())
  assert read_metrics(workdir / "metrics.jsonl") == []


def test_nonfinite_test_loss_keeps_the_last_good_checkpoint(run, monkeypatch):
  real = loop.evaluate
  monkeypatch.setattr(loop, "evaluate", lambda *a, **k: {**real(*a, **k), "loss": float("inf")})
  with pytest.raises(NonFiniteLossError, match=r"test loss became inf in epoch 3; stopped: the "
                     r"last good checkpoint \(epoch 2\) is kept"):
    train_and_evaluate(_config(epochs=3), run, log=print)
  assert Checkpoints(run).steps() == [1, 2]
  assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("lr,optimizer", [("30", "sgd"), ("1000", "sgd"), ("30", "adam")])
def test_divergence_is_caught_at_every_learning_rate(tmp_path, capsys, lr, optimizer):
  # adam at --lr 30 keeps the loss finite (about 1e10): the divergence limit stops it.
  workdir = tmp_path / "div"
  line = _error(capsys, ["train", "--model", "lenet5", "--dataset", "mnist_sample", "--lr", lr,
                         "--optimizer", optimizer, "--epochs", "2", "--batch-size", "64",
                         "--train-size", "512", "--workdir", str(workdir)])
  assert "became nan" in line or "became non-finite" in line or "training diverged" in line
  assert "no checkpoint had been saved yet" in line and "Try a lower --lr" in line
  assert not list((workdir / "checkpoints").glob("[0-9]*"))


def _save_nan_checkpoint(workdir: pathlib.Path) -> pathlib.Path:
  """Epoch 3 with a NaN weight, as a version without the finiteness check saved it."""
  ckpts = Checkpoints(workdir)
  model, state, meta, method = load_workdir(workdir)
  state = state.replace(params=jax.tree.map(lambda x: x, state.params))
  state.params["fc2"]["kernel"] = state.params["fc2"]["kernel"].at[0, 0].set(jnp.nan)
  meta = {k: v for k, v in meta.items() if k != "epoch"}
  tx = method.optimizer(state.params, optax.adam(1e-3))
  state = state.replace(opt_state=tx.init(state.params))
  ckpts.save(3, state, {**meta, "record": {**meta["record"], "epoch": 3}},
             {"test_accuracy": 0.1})
  ckpts.close()
  return workdir / "checkpoints" / "3"


def test_nonfinite_checkpoint_is_refused_by_readers(run, tmp_path, capsys):
  path = _save_nan_checkpoint(run)
  expected = (f"checkpoint {path} holds non-finite values (NaN or infinity), first at "
              "params/fc2/kernel")
  assert expected in _error(capsys, ["eval", "--workdir", str(run)])
  assert expected in _error(capsys, ["compress", "--from", str(run), "--workdir",
                                     str(tmp_path / "q"), "--method", "quantize"])
  assert expected in _error(capsys, ["summary", "--workdir", str(run)])
  assert main(["eval", "--workdir", str(run), "--checkpoint", "2"]) == 0


def _data_files(step: pathlib.Path, item: str = "model") -> list[pathlib.Path]:
  files = [p for p in (step / item).rglob("*") if p.is_file() and p.parent.name == "d"]
  return sorted(files, key=lambda p: -p.stat().st_size)


def test_flipped_bytes_fail_the_checksum(run, capsys):
  step = run / "checkpoints" / "2"
  data = _data_files(step)[0]
  raw = bytearray(data.read_bytes())
  for i in range(len(raw) // 3, len(raw) // 3 + 64):
    raw[i] ^= 0x5A
  data.write_bytes(bytes(raw))
  line = _error(capsys, ["eval", "--workdir", str(run)])
  assert (f"checkpoint {step} is damaged: model/params/fc1/kernel does not match its "
          "checksum") in line


def test_checkpoint_without_checksums_still_loads(run):
  meta_file = run / "checkpoints" / "2" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  assert len(meta.pop("checksums")) >= 6  # params, opt_state... of both items
  meta_file.write_text(json.dumps(meta))
  _, state, meta, _ = load_workdir(run)
  assert meta["epoch"] == 2 and "checksums" not in meta


# 6. SRC is never written; broken steps are skipped ---------------------------------

@pytest.mark.parametrize("dst, where", [
    ("checkpoints/99", "inside --from"), (".", "--from {src} itself"), ("link", "itself")])
def test_destination_inside_source_is_refused(run, tmp_path, capsys, dst, where):
  (tmp_path / "link").symlink_to(run)
  target = tmp_path / "link" if dst == "link" else run / dst
  before = _snapshot(run)
  line = _error(capsys, ["compress", "--from", str(run), "--workdir", str(target),
                         "--method", "prune"])
  assert "--workdir must differ from --from and lie outside it" in line
  assert where.format(src=run) in line and "the source run is never written" in line
  assert _snapshot(run) == before


def _truncate(step: pathlib.Path) -> None:
  data = _data_files(step)[0]
  os.truncate(data, data.stat().st_size // 2)


# orbax's pending reads of a truncated file report when collected (the CLI drops
# those reports; pytest replaces the hook around each test and warns)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage, reason", [
    (lambda step: shutil.rmtree(step / "meta"), "meta/ missing"),
    (lambda step: shutil.rmtree(step / "model"), "model/ missing"),
    (_truncate, "its data cannot be read (OUT_OF_RANGE"),
])
def test_broken_latest_step_falls_back_with_a_warning(run, capsys, damage, reason):
  step = run / "checkpoints" / "2"
  damage(step)
  capsys.readouterr()
  assert main(["eval", "--workdir", str(run), "--json"]) == 0
  err = capsys.readouterr().err
  assert f"warning: checkpoint {step} is broken ({reason}" in err and "using epoch 1" in err
  assert "Traceback" not in err
  assert load_workdir(run)[2]["epoch"] == 1


# orbax's pending reads of a truncated file report when collected (the CLI drops
# those reports; pytest replaces the hook around each test and warns)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_train_resumes_from_the_last_complete_step(run, capsys):
  step = run / "checkpoints" / "2"
  _truncate(step)
  capsys.readouterr()
  assert main(["train", *RUN, "--epochs", "2", "--workdir", str(run)]) == 0
  err = capsys.readouterr().err
  moved = run / "broken-checkpoints" / "2"
  assert f"checkpoint {step} is broken (its data cannot be read" in err
  assert f"moved it to {moved}; resuming from epoch 1" in err
  assert moved.is_dir() and Checkpoints(run).steps() == [1, 2]
  assert load_workdir(run)[2]["epoch"] == 2
  assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]


def test_empty_step_in_source_and_no_complete_step(run, capsys):
  (run / "checkpoints" / "99").mkdir()  # what an old compress --workdir SRC/checkpoints/99 left
  capsys.readouterr()
  assert main(["eval", "--workdir", str(run)]) == 0
  assert f"checkpoint {run / 'checkpoints' / '99'} is broken (meta/ missing)" in \
      capsys.readouterr().err
  for step in ("1", "2"):
    shutil.rmtree(run / "checkpoints" / step / "meta")
  line = _error(capsys, ["eval", "--workdir", str(run)])
  assert (f"checkpoint {run / 'checkpoints'} is broken: no complete checkpoint in it (epoch 99: "
          "meta/ missing; epoch 2: meta/ missing; epoch 1: meta/ missing)") in line
  line = _error(capsys, ["train", *RUN, "--epochs", "2", "--workdir", str(run)])
  assert "no complete checkpoint to resume from" in line and "--overwrite" in line


# 8. Retention across restarts ------------------------------------------------------

def _tiny_state(value: float) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.full(3, value)},
                    batch_stats={}, opt_state={}, rng=jax.random.PRNGKey(0), cstate={})


def _save(ckpts: Checkpoints, epoch: int, accuracy: float) -> None:
  meta = {"model": "m", "model_config": {}, "dataset": "d", "input_shape": [1],
          "compression": [], "record": {"epoch": epoch, "test_accuracy": accuracy}}
  ckpts.save(epoch, _tiny_state(epoch), meta, {"test_accuracy": accuracy})


def test_retention_holds_across_restarts(tmp_path):
  accuracy = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7, 5: 0.3, 6: 0.4, 7: 0.2, 8: 0.95, 9: 0.1}
  ckpts = Checkpoints(tmp_path, keep=2)
  for epoch in (1, 2, 3):
    _save(ckpts, epoch, accuracy[epoch])
  assert ckpts.steps() == [2, 3]
  ckpts.close()  # killed; a new process resumes
  ckpts = Checkpoints(tmp_path, keep=2)
  for epoch in (4, 5, 6):
    _save(ckpts, epoch, accuracy[epoch])
  assert ckpts.steps() == [2, 5, 6]  # latest 2 and the best (2, from the first process)
  ckpts.close()
  ckpts = Checkpoints(tmp_path, keep=2)
  for epoch in (7, 8, 9):
    _save(ckpts, epoch, accuracy[epoch])
  assert ckpts.steps() == [8, 9]  # 8 is both the best and one of the latest
  ckpts.close()
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [8, 9]


# 10. One-line errors ----------------------------------------------------------------

def test_workdir_that_is_a_file(tmp_path, capsys):
  file = tmp_path / "file"
  file.write_text("not a workdir")
  line = _error(capsys, ["train", *RUN, "--epochs", "1", "--workdir", str(file)])
  assert line == f"jcompress train: error: --workdir {file} is a file, not a directory"
  line = _error(capsys, ["train", *RUN, "--epochs", "1", "--workdir", str(file / "sub")])
  assert f"--workdir {file / 'sub'} cannot be created" in line
  assert file.read_text() == "not a workdir"


@pytest.mark.parametrize("name", ["w[1]", "w*", "w?"])
def test_workdir_with_a_glob_character_is_refused_before_anything_is_written(tmp_path, capsys,
                                                                            name):
  """orbax saved under such a path and could not read its own checkpoints back."""
  line = _error(capsys, ["train", *RUN, "--epochs", "1", "--workdir", str(tmp_path / name)])
  assert line.startswith(f"jcompress train: error: --workdir {tmp_path / name}: its path holds")
  assert not (tmp_path / name).exists()


def test_disk_full_during_a_save_keeps_the_earlier_checkpoints(run, capsys, monkeypatch):
  async def full(*args, **kwargs):  # orbax's item handlers save asynchronously
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", full)
  line = _error(capsys, ["train", *RUN, "--epochs", "3", "--workdir", str(run)])
  assert (f"could not save checkpoint {run / 'checkpoints' / '3'}: disk full: [Errno 28] No "
          "space left on device; the earlier checkpoints (epochs 1, 2) are intact") in line
  monkeypatch.undo()
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]
  assert load_workdir(run)[2]["epoch"] == 2
  assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
  assert not (run / workdir_lock.LOCK_NAME).exists()


def test_checkpoint_errors_are_value_errors():
  # the CLI prints ValueErrors as one line with exit 2
  assert issubclass(CheckpointError, ValueError)
  assert issubclass(workdir_lock.WorkdirLockedError, ValueError)
