"""Atomic file writes that never write through a planted symlink.

Every file jcompress replaces (exports, ``config.json``, ``metrics.jsonl``, the
decoded-data cache) goes through :func:`atomic_open` (or :func:`write_bytes` /
:func:`write_text`):

1. a fresh temporary name ``.<name>.<16 random hex digits>.tmp`` is created in the
   target's own directory with ``O_CREAT | O_EXCL | O_NOFOLLOW``: ``O_EXCL`` fails
   on any existing entry, a symlink included, so nothing planted at a temporary
   name (``<out>.tmp`` or a guessed random one) is ever opened or followed;
2. the content is written, flushed and ``fsync``-ed;
3. ``os.replace`` renames it onto the target. A rename replaces the directory
   entry: a symlink at the target's own name is replaced by the new file, and the
   file it pointed to is left as it was. The directory is then ``fsync``-ed (where
   the platform allows) so the rename survives a crash.

On any error (or ``KeyboardInterrupt``) before the rename the temporary file is
removed and the target is untouched: a reader sees the old file or the whole new
one, never a part. A process killed with ``kill -9`` mid-write can leave a
``.<name>.*.tmp`` file behind, never a damaged target.

New files get the permissions ``open()`` gives (``0o666`` less the umask), not the
private ``0o600`` of :func:`tempfile.mkstemp`.

>>> import pathlib, tempfile
>>> target = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
>>> write_text(target, "hello")
>>> target.read_text()
'hello'
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
from collections.abc import Iterator
from typing import IO, Any

_MODES = ("w", "wt", "wb")
# O_NOFOLLOW is redundant with O_EXCL (which already refuses any existing name) but
# costs nothing; O_CLOEXEC keeps the descriptor out of child processes.
_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
          | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
_ATTEMPTS = 16  # fresh names tried when one exists already (2^-64 odds each)


def _temporary(path: pathlib.Path) -> tuple[pathlib.Path, int]:
  """Creates and opens a fresh temporary file beside ``path``; never follows a link."""
  for _ in range(_ATTEMPTS):
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
      return tmp, os.open(tmp, _FLAGS, 0o666)
    except FileExistsError:
      continue
  raise FileExistsError(f"could not create a fresh temporary file beside {path} in "
                        f"{_ATTEMPTS} attempts")


def _fsync_directory(directory: pathlib.Path) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  except OSError:  # not allowed on this platform (Windows) or not readable
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *,
                encoding: str | None = "utf-8", newline: str | None = None
                ) -> Iterator[IO[Any]]:
  """Opens a temporary file that replaces ``path`` when the ``with`` block succeeds.

  Args:
    path: the file to write (created or replaced).
    mode: ``"wb"`` (bytes) or ``"w"`` / ``"wt"`` (text).
    encoding: the text encoding (text mode only).
    newline: as for :func:`open` (text mode only).

  Yields:
    The open temporary file. It is flushed, ``fsync``-ed, closed and renamed onto
    ``path`` when the block exits normally; removed, with ``path`` untouched, when
    the block or any of those steps raises.

  Raises:
    ValueError: ``path`` is a directory, its parent is not a directory, or
      ``mode`` is not a write mode listed above.
    FileNotFoundError: ``path``'s directory does not exist.
    OSError: creating, writing or renaming failed (disk full, permissions).
  """
  if mode not in _MODES:
    raise ValueError(f"atomic_open: mode must be one of {_MODES}, got {mode!r}")
  path = pathlib.Path(path)
  if path.is_dir():
    raise ValueError(f"{path} is a directory")
  parent = path.parent
  if not parent.exists():
    raise FileNotFoundError(f"cannot write {path}: directory {parent} does not exist")
  if not parent.is_dir():
    raise ValueError(f"cannot write {path}: {parent} is not a directory")
  tmp, fd = _temporary(path)
  try:
    text = "b" not in mode
    f = os.fdopen(fd, mode, **({"encoding": encoding, "newline": newline} if text else {}))
  except BaseException:
    os.close(fd)
    tmp.unlink(missing_ok=True)
    raise
  try:
    with f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  _fsync_directory(parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Atomically replaces ``path`` with ``data``; see :func:`atomic_open`."""
  with atomic_open(path, "wb") as f:
    f.write(data)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
  """Atomically replaces ``path`` with ``text``; see :func:`atomic_open`."""
  with atomic_open(path, "w", encoding=encoding) as f:
    f.write(text)
