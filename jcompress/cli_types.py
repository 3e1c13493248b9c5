"""Argument types of the ``jcompress`` command line (:mod:`jcompress.cli`): each
parses one option's text or raises ``argparse.ArgumentTypeError``, so a bad value is
one line naming the option. No JAX here: the parser stays fast to build."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from typing import Sequence


def finite(text: str) -> float:
  """A float option's type: a finite number (nan and inf are refused when parsed)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
  return value


SEED_MAX = 2 ** 63 - 1  # JAX's PRNGKey takes an int64, numpy's generators a non-negative int


def seed(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
  if not 0 <= value <= SEED_MAX:
    raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63 - 1], got {text}")
  return value


def floats(text: str) -> tuple[float, ...]:
  try:
    values = tuple(float(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
  if not all(math.isfinite(v) for v in values):
    raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
  return values


def ints(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def positive_ints(text: str) -> tuple[int, ...]:
  """Comma-separated integers >= 1, each once (``bench --threads``, ``--batch-sizes``)."""
  values = ints(text)
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
  return tuple(dict.fromkeys(values))


def choice_list(choices: Sequence[str]):
  """argparse type: comma-separated values of ``choices``, each once."""
  def parse(text: str) -> tuple[str, ...]:
    values = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not values or any(v not in choices for v in values):
      raise argparse.ArgumentTypeError(f"expected a comma-separated list of "
                                       f"{', '.join(choices)}, got {text!r}")
    return values
  return parse


def model_arg(text: str) -> tuple[str, object]:
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
  try:
    return key, json.loads(value, parse_constant=_not_finite, parse_float=_json_float)
  except json.JSONDecodeError:
    return key, value


def _not_finite(text: str):
  raise argparse.ArgumentTypeError(f"expected finite numbers, got {text}")


def _json_float(text: str) -> float:
  value = float(text)
  if not math.isfinite(value):
    _not_finite(text)
  return value


# A tfds dataset's name (data.tfds_generic checks the rest when it reads it).
_TFDS_NAME = re.compile(r"[a-z][a-z0-9_]*(/[A-Za-z0-9_.\-]+)?(:[0-9]+\.[0-9]+\.[0-9]+)?")


def dataset(names: Sequence[str]):
  """``--dataset``'s type: a known name, ``npz:PATH`` / ``folder:PATH`` (the user's
  own data), whose PATH is made absolute so that the run's record works anywhere,
  or any other tfds name, recorded as ``tfds:NAME``."""
  def parse(text: str) -> str:
    kind, sep, path = text.partition(":")
    if sep and kind in ("npz", "folder") and path:
      return f"{kind}:{os.path.abspath(os.path.expanduser(path))}"
    if text in names:
      return text
    if sep and kind == "tfds" and _TFDS_NAME.fullmatch(path.split(";")[0]):
      return text
    if _TFDS_NAME.fullmatch(text):
      return f"tfds:{text}"
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from "
                                     f"{', '.join(names)}, npz:PATH, folder:PATH, or any "
                                     "tfds image-classification dataset by name)")
  return parse
