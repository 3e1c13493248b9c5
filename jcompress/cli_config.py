"""``--config FILE`` of ``jcompress train`` and ``compress``: options from a file.

The file is JSON (``.json``) or YAML (``.yaml``, ``.yml``): one object whose keys
are the command's options by their dest names (``lr``, ``batch_size``, ``model``,
``dataset``, a method option ``bits`` or ``ttq.threshold``; dashes may stand for
underscores). They become the parser's defaults (``set_defaults``) before the
command line is parsed, so flags given on it override the file. A ``config.json``
that ``train`` wrote into its workdir is read too: its ``train_config`` holds the
run's options, so ``train --config WORKDIR/config.json --workdir OTHER`` runs it
again. Unknown keys and values of the wrong type are errors naming the key.

>>> import argparse
>>> p = argparse.ArgumentParser()
>>> _ = p.add_argument("--lr", type=float, default=0.1)
>>> _ = p.add_argument("--model", required=True)
>>> apply(p, {"lr": 0.5, "model": "lenet5"}, "c.json")
>>> p.parse_args(["--lr", "0.2"])
Namespace(lr=0.2, model='lenet5')
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Sequence
from typing import Any

# Keys of a train run's ``train_config`` that are not options of ``train``.
_RUN_KEYS = {"model_config", "compression"}
# Never read from a file: where a run goes, and plugins (imported before parsing).
_NOT_FROM_FILE = {"help", "config", "workdir", "overwrite", "plugin"}


def config_path(argv: Sequence[str]) -> str | None:
  """The ``--config FILE`` (or ``--config=FILE``) of ``argv``, the last one given."""
  path = None
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    elif arg.startswith("--config="):
      path = arg.split("=", 1)[1]
  return path


def read(path: str) -> dict[str, Any]:
  """The options in ``path`` (JSON or YAML); a train run's ``config.json`` gives its
  ``train_config``, with ``model_config`` as ``model_arg`` pairs.

  Raises:
    ValueError: an unreadable file, not an object, or a run's record this cannot replay.
  """
  file = pathlib.Path(path)
  try:
    text = file.read_text()
    if file.suffix.lower() in (".yaml", ".yml"):
      import yaml  # pylint: disable=import-outside-toplevel
      values = yaml.safe_load(text)
    elif file.suffix.lower() == ".json":
      values = json.loads(text)
    else:
      raise ValueError("expected a .json, .yaml or .yml file")
  except OSError as e:
    raise ValueError(f"--config {path}: {e.strerror or e}") from None
  except ValueError as e:  # json.JSONDecodeError too
    raise ValueError(f"--config {path}: {e}") from None
  except Exception as e:  # yaml.YAMLError
    raise ValueError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
  if not isinstance(values, dict):
    raise ValueError(f"--config {path}: expected an object of options, got "
                     f"{type(values).__name__}")
  if isinstance(values.get("train_config"), dict):  # a train run's config.json
    run = dict(values["train_config"])
    if run.get("compression"):
      raise ValueError(f"--config {path}: the record of a run with a compression plan "
                       "(compress or train --teacher) cannot be replayed yet; give its "
                       "options as flags")
    run["model_arg"] = [[k, v] for k, v in (run.get("model_config") or {}).items()]
    values = {k: v for k, v in run.items() if k not in _RUN_KEYS}
  return {str(k).replace("-", "_"): v for k, v in values.items()}


def _convert(action: argparse.Action, key: str, value: Any, path: str) -> Any:
  """``value`` as the command line would give it, checked by the option's type and
  choices."""
  where = f"--config {path}: {key}"
  if value is None:
    return None
  if "." in action.dest:  # method options: strings, checked by the method
    return value if isinstance(value, str) else json.dumps(value)
  if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                         argparse.BooleanOptionalAction)):
    if not isinstance(value, bool):
      raise ValueError(f"{where}: expected true or false, got {value!r}")
    return value
  if isinstance(action, argparse._AppendAction):
    items = value if isinstance(value, list) else [value]
    if action.dest == "model_arg":  # pairs, or an object
      items = list(value.items()) if isinstance(value, dict) else items
      if not all(isinstance(i, (list, tuple)) and len(i) == 2 for i in items):
        raise ValueError(f"{where}: expected an object or [key, value] pairs")
      return [tuple(i) for i in items]
    return [_one(action, where, item) for item in items]
  if isinstance(value, list) and action.type is not None:  # --decay-epochs 1,2
    return _one(action, where, ",".join(map(str, value)))
  return _one(action, where, value)


def _one(action: argparse.Action, where: str, value: Any) -> Any:
  if isinstance(value, (dict, list)) or isinstance(value, bool):
    raise ValueError(f"{where}: expected a single value, got {value!r}")
  if action.type is not None:
    try:
      value = action.type(str(value))
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
      raise ValueError(f"{where}: {e}") from None
  if action.choices is not None and value not in action.choices:
    raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
  return value


def apply(parser: argparse.ArgumentParser, values: dict[str, Any], path: str) -> None:
  """Makes ``values`` (from :func:`read`) ``parser``'s defaults; an option the file
  gives is no longer required on the command line.

  Raises:
    ValueError: an unknown key (the message lists the valid ones) or a bad value.
  """
  actions = {a.dest: a for a in parser._actions if a.dest not in _NOT_FROM_FILE
             and a.option_strings}
  defaults = {}
  for key, value in values.items():
    dest = key if key in actions else f"opt.{key}"
    if dest not in actions:
      raise ValueError(f"--config {path}: unknown option {key!r}; valid: "
                       f"{', '.join(sorted(k.removeprefix('opt.') for k in actions))}")
    defaults[dest] = _convert(actions[dest], key, value, path)
    if defaults[dest] is not None:
      actions[dest].required = False
  parser.set_defaults(**defaults)
