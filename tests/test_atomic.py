"""Tests for jcompress.atomic: atomic replacement that never writes through a symlink."""

import os
import stat

import pytest

from jcompress import atomic


def _listing(folder):
  return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def victim(tmp_path):
  """A file outside the output folder that a planted symlink points to."""
  path = tmp_path / "victim"
  path.write_bytes(b"precious")
  return path


@pytest.fixture
def out_dir(tmp_path):
  path = tmp_path / "out"
  path.mkdir()
  return path


def test_write_creates_and_replaces(out_dir):
  target = out_dir / "m.jcm"
  atomic.write_bytes(target, b"first")
  assert target.read_bytes() == b"first"
  atomic.write_bytes(target, b"second")
  atomic.write_text(out_dir / "config.json", "{\"lr\": 0.1, \"name\": \"\u00e9\"}\n")
  assert target.read_bytes() == b"second"
  assert (out_dir / "config.json").read_bytes() == "{\"lr\": 0.1, \"name\": \"\u00e9\"}\n".encode()
  assert _listing(out_dir) == ["config.json", "m.jcm"]  # no temporary left behind


def test_permissions_follow_the_umask(out_dir):
  old = os.umask(0o022)
  try:
    atomic.write_bytes(out_dir / "a", b"x")
  finally:
    os.umask(old)
  assert stat.S_IMODE((out_dir / "a").stat().st_mode) == 0o644  # not mkstemp's 0o600


def test_symlink_at_tmp_name_is_never_followed(out_dir, victim):
  target = out_dir / "m.jcm"
  target.write_bytes(b"old export")
  for name in ("m.jcm.tmp", ".m.jcm.tmp", "m.jcm.tmp.0"):
    (out_dir / name).symlink_to(victim)
  atomic.write_bytes(target, b"new export")
  assert victim.read_bytes() == b"precious"
  assert target.read_bytes() == b"new export" and not target.is_symlink()
  assert (out_dir / "m.jcm.tmp").is_symlink()  # left alone, not written through
  assert _listing(out_dir) == [".m.jcm.tmp", "m.jcm", "m.jcm.tmp", "m.jcm.tmp.0"]


def test_symlink_at_the_random_name_is_refused_not_followed(out_dir, victim, monkeypatch):
  # An attacker who guessed the random name: O_EXCL refuses it and a fresh one is drawn.
  names = iter(["0123456789abcdef", "fedcba9876543210"])
  monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(names))
  (out_dir / ".config.json.0123456789abcdef.tmp").symlink_to(victim)
  atomic.write_text(out_dir / "config.json", "{}")
  assert victim.read_bytes() == b"precious"
  assert (out_dir / "config.json").read_text() == "{}"
  assert _listing(out_dir) == [".config.json.0123456789abcdef.tmp", "config.json"]


def test_symlink_at_the_target_is_replaced_not_followed(out_dir, victim):
  target = out_dir / "metrics.jsonl"
  target.symlink_to(victim)
  atomic.write_text(target, "{\"epoch\": 1}\n")
  assert victim.read_bytes() == b"precious"
  assert not target.is_symlink() and target.read_text() == "{\"epoch\": 1}\n"


class _Boom(Exception):
  pass


def test_failure_mid_write_keeps_old_target_and_no_temp(out_dir):
  target = out_dir / "m.jcm"
  target.write_bytes(b"old")
  with pytest.raises(_Boom):
    with atomic.atomic_open(target, "wb") as f:
      f.write(b"x" * 100_000)
      raise _Boom()
  with pytest.raises(KeyboardInterrupt):
    with atomic.atomic_open(target, "w") as f:
      f.write("partial")
      raise KeyboardInterrupt
  assert target.read_bytes() == b"old"
  assert _listing(out_dir) == ["m.jcm"]


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_failure_in_fsync_or_rename_keeps_old_target(out_dir, monkeypatch, step):
  target = out_dir / "m.jcm"
  target.write_bytes(b"old")

  def fail(*args):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(atomic.os, step, fail)
  with pytest.raises(OSError, match="No space left on device"):
    atomic.write_bytes(target, b"new")
  monkeypatch.undo()
  assert target.read_bytes() == b"old"
  assert _listing(out_dir) == ["m.jcm"]


def test_target_is_a_directory(out_dir):
  (out_dir / "exp").mkdir()
  with pytest.raises(ValueError) as err:
    atomic.write_bytes(out_dir / "exp", b"x")
  assert str(err.value) == f"{out_dir / 'exp'} is a directory"
  assert _listing(out_dir) == ["exp"] and _listing(out_dir / "exp") == []


def test_parent_missing_or_a_file(out_dir):
  with pytest.raises(FileNotFoundError) as err:
    atomic.write_bytes(out_dir / "missing" / "a", b"x")
  assert str(err.value) == (f"cannot write {out_dir / 'missing' / 'a'}: directory "
                            f"{out_dir / 'missing'} does not exist")
  (out_dir / "file").write_bytes(b"")
  with pytest.raises(ValueError) as err:
    atomic.write_bytes(out_dir / "file" / "a", b"x")
  assert str(err.value) == (f"cannot write {out_dir / 'file' / 'a'}: {out_dir / 'file'} "
                            "is not a directory")


def test_bad_mode(out_dir):
  with pytest.raises(ValueError, match=r"mode must be one of \('w', 'wt', 'wb'\), got 'ab'"):
    with atomic.atomic_open(out_dir / "a", "ab"):
      pass
  assert _listing(out_dir) == []
