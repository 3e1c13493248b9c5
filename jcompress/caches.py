"""Where jcompress keeps its caches, and JAX's persistent compilation cache.

Every cache lives under one folder, :func:`root`: ``$JCOMPRESS_CACHE_DIR``, else
``$XDG_CACHE_HOME/jcompress``, else ``~/.cache/jcompress``. It holds the decoded
datasets (:func:`jcompress.data.load`), what the command line's parser needs
(:mod:`jcompress.cli_spec`) and, in ``xla/``, the programs XLA compiled.

The compilation cache is on for every ``jcompress`` command: a second ``eval``,
``compress`` or ``bench`` of the same model loads its compiled programs instead
of compiling them again. ``--no-compile-cache`` or ``$JCOMPRESS_COMPILE_CACHE=0``
turns it off; ``$JCOMPRESS_COMPILE_CACHE=DIR`` puts it in ``DIR``. A folder that
JAX's own ``$JAX_COMPILATION_CACHE_DIR`` names is kept when jcompress is not told
one. The cache is only ever read by the same JAX and XLA version that wrote it
(its keys hold the versions, the program and the compiler options).

>>> compile_cache_dir(env={"JCOMPRESS_COMPILE_CACHE": "off"}) is None
True
>>> str(compile_cache_dir(env={"JCOMPRESS_CACHE_DIR": "/tmp/jc"}))
'/tmp/jc/xla'
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping

ROOT_ENV = "JCOMPRESS_CACHE_DIR"
COMPILE_CACHE_ENV = "JCOMPRESS_COMPILE_CACHE"
_OFF = ("0", "false", "no", "off")
_ON = ("", "1", "true", "yes", "on")
# Cache every compilation: on CPU most programs compile in well under JAX's default
# threshold of 1 s, yet a command compiles dozens of them.
MIN_COMPILE_SECONDS = 0.0


def root(env: Mapping[str, str] | None = None) -> pathlib.Path:
  """The folder of jcompress's caches (module docstring); not created here."""
  env = os.environ if env is None else env
  if env.get(ROOT_ENV):
    return pathlib.Path(env[ROOT_ENV]).expanduser()
  if env.get("XDG_CACHE_HOME"):
    return pathlib.Path(env["XDG_CACHE_HOME"]).expanduser() / "jcompress"
  return pathlib.Path.home() / ".cache" / "jcompress"


def compile_cache_dir(disabled: bool = False, env: Mapping[str, str] | None = None
                      ) -> pathlib.Path | None:
  """The compilation cache's folder, or None when it is off (``disabled``: the
  ``--no-compile-cache`` flag; ``$JCOMPRESS_COMPILE_CACHE``: off, on or a folder)."""
  env = os.environ if env is None else env
  value = env.get(COMPILE_CACHE_ENV, "").strip()
  if disabled or value.lower() in _OFF:
    return None
  if value.lower() in _ON:
    return root(env) / "xla"
  return pathlib.Path(value).expanduser()


def enable_compile_cache(disabled: bool = False) -> pathlib.Path | None:
  """Turns JAX's persistent compilation cache on (or off) for this process.

  Call it before the first compilation: JAX opens the cache once. Returns the
  folder used, or None when the cache is off.
  """
  import jax  # pylint: disable=import-outside-toplevel  (the parser never needs JAX)

  path = compile_cache_dir(disabled)
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  told = os.environ.get(COMPILE_CACHE_ENV, "").strip().lower() not in _ON
  if not told and jax.config.jax_compilation_cache_dir:  # $JAX_COMPILATION_CACHE_DIR
    path = pathlib.Path(jax.config.jax_compilation_cache_dir)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
