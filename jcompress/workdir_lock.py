"""One process per workdir: the lock file ``WORKDIR/.lock``.

``jcompress train`` and ``compress`` hold it while they run (``eval``, ``summary``
and ``export`` only read, and take none), so a second run on the same workdir stops
at once, naming the holder, instead of interleaving ``metrics.jsonl`` or taking
over the other's checkpoints.

The lock is created whole and exclusively: its content (JSON: ``pid``, ``host``,
``started``, ``command``) is written to a fresh temporary file that is then
hard-linked to ``.lock``, which fails if any entry of that name exists (where hard
links are not supported it is created with ``O_CREAT | O_EXCL`` instead). A lock
left by a process that died (``kill -9``, a power cut) is stale when it names this
host and a pid that no longer runs: it is taken over with a warning. A lock from
another host cannot be checked and is never taken over; the message says which
file to delete if that process is gone. The lock is removed when the run ends,
also on an error. Within one process the lock is re-entrant for the thread that
holds it (``compress`` takes it before ``train_and_evaluate`` takes it again).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import secrets
import socket
import sys
import threading
from collections.abc import Iterator

LOCK_NAME = ".lock"

_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
          | getattr(os, "O_CLOEXEC", 0))
_held: dict[str, tuple[int, int]] = {}  # realpath of the lock -> (thread id, depth)
_held_guard = threading.Lock()


class WorkdirLockedError(ValueError):
  """Another process runs on the workdir (the message names it)."""


def make_workdir(workdir: str | os.PathLike) -> list[pathlib.Path]:
  """Creates ``workdir`` (and missing parents); returns the folders it created,
  deepest first.

  Raises:
    ValueError: ``workdir`` or one of its parents is a file, it cannot be created
      (permissions), or its path holds a glob character (``[ ] * ?``: orbax
      writes checkpoints there that it cannot read back); the message names it.
  """
  workdir = pathlib.Path(workdir)
  glob = sorted(set("[]*?") & set(str(workdir.absolute())))
  if glob:
    raise ValueError(f"--workdir {workdir}: its path holds {' '.join(glob)}, under which orbax "
                     "writes checkpoints it cannot read back; choose a name without them")
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"--workdir {workdir} is a file, not a directory")
  created = []
  for folder in [workdir, *workdir.parents]:
    if folder.exists() or folder.is_symlink():
      break
    created.append(folder)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--workdir {workdir} cannot be created: "
                     f"{e.strerror or e} ({e.filename or workdir})") from e
  return created


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  except OSError:
    return True
  return True


def _read(path: pathlib.Path) -> dict | None:
  """The holder recorded in lock ``path``; None if it is gone; ``{}`` if unreadable."""
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
  except FileNotFoundError:
    return None
  except OSError:
    return {}
  try:
    with os.fdopen(fd, "rb") as f:
      holder = json.loads(f.read(4096).decode("utf-8"))
  except (OSError, ValueError):
    return {}
  if (not isinstance(holder, dict) or not isinstance(holder.get("pid"), int)
      or isinstance(holder.get("pid"), bool) or holder["pid"] < 1
      or not isinstance(holder.get("host"), str)):
    return {}
  return holder


def _describe(holder: dict) -> str:
  text = f"pid {holder['pid']} on {holder['host']}"
  if isinstance(holder.get("started"), str):
    text += f", since {holder['started']}"
  if isinstance(holder.get("command"), str) and holder["command"]:
    text += f": {holder['command'][:120]}"
  return text


def _create(path: pathlib.Path, content: bytes) -> bool:
  """Creates ``path`` holding ``content`` if no entry of that name exists."""
  tmp = path.with_name(f"{LOCK_NAME}.{secrets.token_hex(8)}.tmp")
  fd = os.open(tmp, _FLAGS, 0o644)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(content)
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(tmp, path)
      return True
    except FileExistsError:
      return False
    except OSError:  # no hard links on this file system: exclusive create instead
      try:
        fd = os.open(path, _FLAGS, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
      return True
  finally:
    tmp.unlink(missing_ok=True)


def _take_over(path: pathlib.Path, stale: dict) -> bool:
  """Removes the stale lock ``path`` if it still holds ``stale``: renamed first, then
  checked, so a fresh lock another process just made is put back, not deleted."""
  aside = path.with_name(f"{LOCK_NAME}.{secrets.token_hex(8)}.stale")
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return True  # someone else removed it
  if _read(aside) == stale:
    aside.unlink(missing_ok=True)
    return True
  try:
    os.link(aside, path)  # not the lock we judged stale: put it back
  except OSError:
    pass
  aside.unlink(missing_ok=True)
  return False


def _acquire(workdir: pathlib.Path, path: pathlib.Path, warn) -> dict:
  me = {"pid": os.getpid(), "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["jcompress", *sys.argv[1:]])[:300]}
  content = json.dumps(me).encode()
  for _ in range(5):
    if _create(path, content):
      return me
    holder = _read(path)
    if holder is None:
      continue  # released meanwhile
    if not holder:
      raise WorkdirLockedError(
          f"--workdir {workdir} is locked by {path}, which is not a readable jcompress "
          f"lock; if no other jcompress run uses this workdir, delete {path}")
    stale = holder["host"] == me["host"] and (
        not _alive(holder["pid"]) or holder["pid"] == me["pid"])  # our pid: a past life
    if not stale:
      raise WorkdirLockedError(
          f"--workdir {workdir} is in use by another jcompress run ({_describe(holder)}): "
          "one run per workdir; wait for it to end or use another --workdir"
          + ("" if holder["host"] == me["host"] else
             f" (if that process is gone, delete {path})"))
    if _take_over(path, holder):
      warn(f"took over the stale lock {path} of a run that no longer runs "
           f"({_describe(holder)})")
  raise WorkdirLockedError(f"--workdir {workdir}: could not take the lock {path} (other "
                           "runs keep taking it); one run per workdir")


def _release(path: pathlib.Path, me: dict) -> None:
  if _read(path) == me:
    path.unlink(missing_ok=True)


def _stderr_warning(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, *, warn=_stderr_warning) -> Iterator[pathlib.Path]:
  """Creates ``workdir`` if needed and holds its lock for the ``with`` block.

  On leaving the block the lock is removed; a workdir this call created is removed
  again when the block raised and left it empty.

  Raises:
    WorkdirLockedError: another live process holds the lock (a ValueError).
    ValueError: ``workdir`` is a file or cannot be created.
  """
  workdir = pathlib.Path(workdir)
  created = make_workdir(workdir)
  path = workdir / LOCK_NAME
  key = os.path.realpath(path)
  me_thread = threading.get_ident()
  with _held_guard:
    owner = _held.get(key)
    if owner is not None and owner[0] == me_thread:
      _held[key] = (me_thread, owner[1] + 1)
      reentrant = True
    else:
      reentrant = False
  if reentrant:
    try:
      yield path
    finally:
      with _held_guard:
        _held[key] = (me_thread, _held[key][1] - 1)
    return
  if owner is not None:
    raise WorkdirLockedError(f"--workdir {workdir} is in use by another thread of this "
                             "process: one run per workdir")
  me = _acquire(workdir, path, warn)
  with _held_guard:
    _held[key] = (me_thread, 1)
  failed = True
  try:
    yield path
    failed = False
  finally:
    with _held_guard:
      _held.pop(key, None)
    _release(path, me)
    if failed:
      for folder in created:
        try:
          folder.rmdir()  # only if empty: nothing written is ever removed
        except OSError:
          break
