"""``--config FILE`` of ``jcompress train`` and ``compress``: options from a file.

The file is JSON (``.json``), YAML (``.yaml``, ``.yml``) or Python (``.py``, the
ml_collections style of flax's examples and big_vision: it defines ``get_config()``
returning an ``ml_collections.ConfigDict`` or a dict; a nested dict ``ttq:
{threshold: 0.1}`` stands for ``ttq.threshold``). Its keys are the command's
options by their dest names (``lr``, ``batch_size``, ``model``, ``dataset``, a
method option ``bits`` or ``ttq.threshold``, ``from`` for compress's ``--from``;
dashes may stand for underscores). They become the parser's defaults
(``set_defaults``) before the command line is parsed, so flags given on it
override the file; ``--config.KEY=VALUE`` (or ``--config.KEY VALUE``) overrides
one key of it (VALUE read as YAML: ``0.1``, ``true``, ``[1, 2]``, ``sgd``) and
is overridden by a flag. A ``config.json`` that ``train`` or ``compress`` wrote
into its workdir is read too: its ``train_config`` (and a compress run's
``compress_config``) hold the run's options, so ``train --config
WORKDIR/config.json --workdir OTHER`` (``compress`` likewise) runs it again.
Unknown keys and values of the wrong type are errors naming the key.

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

# Keys of a train run's ``train_config`` that are not options of ``train``, and of a
# compress run's that are not options of ``compress``.
_RUN_KEYS = {"model_config", "compression"}
_COMPRESS_RUN_KEYS = {"model", "dataset", "model_config", "compression", "init_from"}
_ALIASES = {"from": "source"}  # compress's --from
_NESTED = {"model_arg", "model_config"}  # dict values, not nested options
_PREFIX = "--config."
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


def split_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
  """``argv`` without its ``--config.KEY=VALUE`` / ``--config.KEY VALUE`` pairs,
  and those as ``{KEY: VALUE read as YAML}``.

  >>> split_overrides(["--lr", "1", "--config.lr=0.1", "--config.augment", "true"])
  (['--lr', '1'], {'lr': 0.1, 'augment': True})
  """
  rest, overrides, i = [], {}, 0
  argv = list(argv)
  while i < len(argv):
    arg = argv[i]
    if not arg.startswith(_PREFIX):
      rest.append(arg)
      i += 1
      continue
    key, sep, text = arg[len(_PREFIX):].partition("=")
    if not sep:
      if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
        raise ValueError(f"{arg} needs a value: {arg}=VALUE")
      text, i = argv[i + 1], i + 1
    if not key:
      raise ValueError(f"{arg}: expected --config.KEY=VALUE")
    overrides[key.replace("-", "_")] = _yaml_value(text)
    i += 1
  return rest, overrides


def _yaml_value(text: str) -> Any:
  import yaml  # pylint: disable=import-outside-toplevel
  try:
    value = yaml.safe_load(text)
  except yaml.YAMLError:
    return text
  return text if isinstance(value, dict) else value


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
  """Nested dicts as dotted keys (``{"ttq": {"threshold": 1}}`` -> ``ttq.threshold``)."""
  out = {}
  for key, value in values.items():
    if isinstance(value, dict) and key not in _NESTED:
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _python_config(path: str) -> Any:
  """``get_config()`` of the Python file ``path`` (a ConfigDict made a dict)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("jcompress_user_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
      raise ValueError("defines no get_config() returning the options")
    values = module.get_config()
  except (OSError, ValueError):
    raise
  except ImportError as e:
    hint = (" (pip install 'jcompress[config]')" if e.name == "ml_collections" else "")
    raise ValueError(f"{e}{hint}") from None
  except Exception as e:  # pylint: disable=broad-except  (the file's own error, in one line)
    raise ValueError(f"{type(e).__name__}: {' '.join(str(e).split())}") from None
  return values.to_dict() if hasattr(values, "to_dict") else values


def _replay(path: str, values: dict, command: str | None) -> dict[str, Any]:
  """The options of a run's ``config.json`` record for ``command``."""
  run, replay = dict(values["train_config"]), values.get("compress_config")
  if isinstance(replay, dict):
    if command == "train":
      raise ValueError(f"--config {path}: the record of a compress run: replay it with "
                       "jcompress compress --config")
    return ({k: v for k, v in run.items() if k not in _COMPRESS_RUN_KEYS}
            | {k: v for k, v in replay.items() if k != "options"} | replay.get("options", {}))
  if command == "compress":
    raise ValueError(f"--config {path}: the record of a train run: replay it with "
                     "jcompress train --config")
  if run.get("compression"):
    raise ValueError(f"--config {path}: the record of a train --teacher run cannot be "
                     "replayed yet; give its options as flags")
  run["model_arg"] = [[k, v] for k, v in (run.get("model_config") or {}).items()]
  return {k: v for k, v in run.items() if k not in _RUN_KEYS}


def read(path: str, command: str | None = None) -> dict[str, Any]:
  """The options in ``path`` (JSON, YAML or Python) for ``command``; a train run's
  ``config.json`` gives its ``train_config``, with ``model_config`` as
  ``model_arg`` pairs; a compress run's adds its ``compress_config``.

  Raises:
    ValueError: an unreadable file, not an object, or a run's record this cannot replay.
  """
  file = pathlib.Path(path)
  try:
    if file.suffix.lower() == ".py":
      values = _python_config(path)
    elif file.suffix.lower() in (".yaml", ".yml"):
      text = file.read_text()
      import yaml  # pylint: disable=import-outside-toplevel
      values = yaml.safe_load(text)
    elif file.suffix.lower() == ".json":
      values = json.loads(file.read_text())
    else:
      raise ValueError("expected a .json, .yaml, .yml or .py file")
  except OSError as e:
    raise ValueError(f"--config {path}: {e.strerror or e}") from None
  except ValueError as e:  # json.JSONDecodeError too
    raise ValueError(f"--config {path}: {e}") from None
  except Exception as e:  # yaml.YAMLError
    raise ValueError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
  if not isinstance(values, dict):
    raise ValueError(f"--config {path}: expected an object of options, got "
                     f"{type(values).__name__}")
  if isinstance(values.get("train_config"), dict):  # a run's config.json
    values = _replay(path, values, command)
  return {str(k).replace("-", "_"): v for k, v in _flatten(values).items()}


def _convert(action: argparse.Action, where: str, value: Any) -> Any:
  """``value`` as the command line would give it, checked by the option's type and
  choices; ``where`` names it in errors."""
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


def apply(parser: argparse.ArgumentParser, values: dict[str, Any], path: str | None,
          overrides: dict[str, Any] | None = None) -> None:
  """Makes ``values`` (from :func:`read`), then ``overrides`` (``--config.KEY``,
  from :func:`split_overrides`) ``parser``'s defaults; an option they give is no
  longer required on the command line.

  Raises:
    ValueError: an unknown key (the message lists the valid ones) or a bad value.
  """
  actions = {a.dest: a for a in parser._actions if a.dest not in _NOT_FROM_FILE
             and a.option_strings}
  defaults = {}
  given = [(f"--config {path}: {key}", key, value) for key, value in values.items()]
  given += [(f"--config.{key}", key, value) for key, value in (overrides or {}).items()]
  for where, name, value in given:
    key = _ALIASES.get(name, name)
    # method options' dests keep their dashes (opt.begin-step, prune.begin-step)
    dest = next((d for d in (key, f"opt.{key}", key.replace("_", "-"),
                             f"opt.{key.replace('_', '-')}") if d in actions), None)
    if dest is None:
      valid = sorted({"from" if k == "source" else k.removeprefix("opt.") for k in actions})
      raise ValueError(f"{where.removesuffix(': ' + name)}: unknown option "
                       f"{name!r}; valid: {', '.join(valid)}")
    defaults[dest] = _convert(actions[dest], where, value)
    if defaults[dest] is not None:
      actions[dest].required = False
  parser.set_defaults(**defaults)
