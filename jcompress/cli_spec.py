"""What ``jcompress``'s parser needs from the modules that import JAX, as plain data.

The parser lists the models, datasets, optimizers, schedules, executions and every
compression method's options, and shows the training defaults of ``train`` and
``compress``. The modules that declare them import JAX and Flax, which takes
seconds; ``--help`` should not. :func:`load` gives them without that import when
it can: a process that has not imported JAX and loads no plugin reads them from
``cli-<install>.json`` in :func:`jcompress.caches.root`, written by the first
command that computed them (:func:`live`) and valid while every source file of
jcompress keeps its size and modification time (as Python's own ``.pyc`` files).
With a plugin (``--plugin``, ``$JCOMPRESS_PLUGINS`` or an installed package's
``jcompress.methods`` entry point) or in a process that has imported JAX, the
registries are read live, so methods and models registered at run time are there.

>>> spec = live()
>>> "lenet300" in spec["models"], spec["executions"][0], "bits" in options(spec)
(True, 'float', True)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sys
from typing import Any, NamedTuple

from jcompress import caches

ENTRY_POINT_GROUP = "jcompress.methods"  # = transforms.registry's (a test checks)
PLUGINS_ENV = "JCOMPRESS_PLUGINS"
_PACKAGE = pathlib.Path(__file__).resolve().parent


class Opt(NamedTuple):
  """A method option as the parser sees it (``transforms.Option`` without its
  parser: ``type`` is the type's name, values are checked by the method)."""
  name: str
  type: str
  default: Any
  help: str
  choices: tuple | None
  hidden: bool
  range: str | None


def live() -> dict[str, Any]:
  """Everything the parser needs, read from the registries (imports JAX)."""
  # pylint: disable=import-outside-toplevel
  from jcompress import data, execution, models, transforms
  from jcompress.train import optim
  from jcompress.train.loop import FINE_TUNE_DEFAULTS, TrainConfig

  def defaults(config: TrainConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if isinstance(getattr(config, f.name), (bool, int, float, str, tuple, type(None)))}

  def option(o) -> dict[str, Any]:
    return {"name": o.name, "type": f"{o.type.__module__}.{o.type.__qualname__}",
            "default": o.default, "help": o.help,
            "choices": None if o.choices is None else list(o.choices),
            "hidden": o.hidden, "range": o.range}

  return {
      "models": models.names(), "datasets": data.names(),
      "optimizers": list(optim.OPTIMIZERS), "schedules": list(optim.SCHEDULES),
      "train": defaults(TrainConfig(model="", dataset="")),
      "compress": defaults(TrainConfig(model="", dataset="", **FINE_TUNE_DEFAULTS)),
      "methods": {name: [option(o) for o in transforms.METHODS[name].options]
                  for name in sorted(transforms.METHODS)},
      "executions": execution.names(), "executions_help": execution.describe()}


def _jax_loaded() -> bool:
  return "jax" in sys.modules


def _plugins(argv_plugins: bool) -> bool:
  if argv_plugins or os.environ.get(PLUGINS_ENV, "").strip():
    return True
  import importlib.metadata  # pylint: disable=import-outside-toplevel  (~50 ms)
  return bool(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _cache_file() -> pathlib.Path:
  install = hashlib.sha1(f"{_PACKAGE}|{sys.version}".encode()).hexdigest()[:12]
  return caches.root() / f"cli-{install}.json"


def fingerprint() -> str:
  """The size and modification time of every source file of jcompress, hashed."""
  h = hashlib.sha1()
  for path in sorted(_PACKAGE.rglob("*.py")):
    st = path.stat()
    h.update(f"{path.relative_to(_PACKAGE)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
  return h.hexdigest()


def load(plugins: bool = False) -> dict[str, Any]:
  """What the parser needs (:func:`live`), from the cache when that is safe.

  Args:
    plugins: the command line names ``--plugin`` modules (already imported).
  """
  if _jax_loaded() or _plugins(plugins):
    return live()
  try:
    path, key = _cache_file(), fingerprint()
  except (OSError, RuntimeError):  # sources not in a folder, no home folder
    return live()
  try:
    cached = json.loads(path.read_text())
    if cached["key"] == key:
      return cached["spec"]
  except (OSError, ValueError, KeyError, TypeError):
    pass
  spec = live()
  try:  # best effort: an unwritable cache folder only costs the next command time
    text = json.dumps({"key": key, "spec": spec})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: a concurrent command reads the old file or this one
  except (OSError, TypeError, ValueError):
    pass
  return spec


def defaults(spec: dict[str, Any], command: str) -> Any:
  """``train``'s or ``compress``'s defaults as attributes (``d.epochs``), tuples kept."""
  import types  # pylint: disable=import-outside-toplevel
  return types.SimpleNamespace(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in spec[command].items()})


def method_options(spec: dict[str, Any], method: str) -> list[Opt]:
  """The options of ``method``, in declaration order."""
  return [Opt(**{**o, "choices": None if o["choices"] is None else tuple(o["choices"])})
          for o in spec["methods"][method]]


def options(spec: dict[str, Any]) -> dict[str, list[tuple[str, Opt]]]:
  """``{option name: [(method, Opt), ...]}`` of every command-line method option
  (hidden ones left out), in name order (``transforms.cli_options``)."""
  out: dict[str, list[tuple[str, Opt]]] = {}
  for name in spec["methods"]:
    for option in method_options(spec, name):
      if not option.hidden:
        out.setdefault(option.name, []).append((name, option))
  return dict(sorted(out.items()))
