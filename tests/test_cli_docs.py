"""The command reference agrees with the commands: every option a command's parser
defines (``jcompress.cli.parser()``) is in its docs/cli.md table and every option
a table lists exists; an option README.md or docs/cli.md names anywhere exists; a
``--OPTION a|b|c`` list there gives exactly the option's choices; README's methods
table lists the built-in methods."""

import argparse
import re

import pytest

from conftest import REPO
from jcompress import cli
from jcompress.transforms import registry

DOCS = (REPO / "docs" / "cli.md").read_text()
# README up to "Where things live", whose --smoke is the experiment scripts' option.
README = (REPO / "README.md").read_text().split("## Where things live")[0]
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*(?:\.[a-z][a-z0-9-]*)?")
CHOICES = re.compile(r"(--[a-z][a-z0-9-]*)[ =]([\w.-]+(?:\\?\|[\w.-]+)+)")


def _commands() -> dict[str, argparse.ArgumentParser]:
  sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
  return dict(sub.choices)


COMMANDS = _commands()


def _plugin_only() -> set[str]:
  """Options that only methods outside jcompress (an installed plugin) define."""
  return {f"--{name}" for name, owners in registry.cli_options().items()
          if all(registry.METHODS[m].module not in registry.BUILTIN for m, _ in owners)}


def _defined(command: str) -> set[str]:
  """The command's long options but ``--help`` and the ``--METHOD.NAME`` forms
  (docs/cli.md documents those by their rule)."""
  return {o for a in COMMANDS[command]._actions for o in a.option_strings
          if o.startswith("--") and o != "--help" and "." not in o} - _plugin_only()


def _section(command: str) -> str:
  match = re.search(rf"^## `jcompress {command}`\n(.*?)(?=^## |\Z)", DOCS, re.M | re.S)
  assert match, f"docs/cli.md has no section for jcompress {command}"
  return match.group(1)


def _documented(command: str) -> set[str]:
  """The options in the first cells of the option tables of the command's section."""
  cells = re.findall(r"^\| ([^|]*`--[^|]*) \|", _section(command), re.M)
  return {o for cell in cells for o in OPTION.findall(cell)}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_is_documented_and_every_documented_option_exists(command):
  defined, documented = _defined(command), _documented(command)
  assert not defined - documented, (
      f"jcompress {command} options missing from docs/cli.md's table: "
      f"{sorted(defined - documented)}")
  assert not documented - defined, (
      f"docs/cli.md documents options jcompress {command} does not have: "
      f"{sorted(documented - defined)}")


@pytest.mark.parametrize("name, text", [("README.md", README), ("docs/cli.md", DOCS)])
def test_options_named_anywhere_exist(name, text):
  every = {o for command in COMMANDS for a in COMMANDS[command]._actions
           for o in a.option_strings}
  unknown = sorted(set(OPTION.findall(text)) - every)
  assert not unknown, f"{name} names options no command has: {unknown}"


def _choice_lists():
  """``(where, command, option, listed choices)`` of each ``--OPTION a|b|c``: in
  docs/cli.md's sections and README's commands table."""
  out = []
  for command in COMMANDS:
    for option, values in CHOICES.findall(_section(command)):
      out.append((f"docs/cli.md, jcompress {command}", command, option, values))
  for command, row in re.findall(r"^\| \[`(\w+)`\]\(docs/cli\.md[^)]*\) \|(.*)$", README, re.M):
    for option, values in CHOICES.findall(row):
      out.append((f"README.md, {command}", command, option, values))
  return out


def test_choice_lists_give_every_choice():
  lists = _choice_lists()
  assert {(c, o) for _, c, o, _ in lists} >= {("eval", "--execution"), ("bench", "--execution"),
                                              ("summary", "--format")}
  for where, command, option, values in lists:
    action = next(a for a in COMMANDS[command]._actions if option in a.option_strings)
    if action.choices is None:  # a free value shown by example: latest|best|EPOCH
      continue
    listed = values.replace("\\|", "|").split("|")
    assert sorted(listed) == sorted(map(str, action.choices)), (
        f"{where}: {option} {'|'.join(listed)}, but it accepts {'|'.join(action.choices)}")


def test_readme_lists_the_builtin_methods():
  table = README.split("## Compression methods")[1].split("\n\n")[0]
  listed = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
  builtin = {name for name, spec in registry.METHODS.items() if spec.module in registry.BUILTIN}
  assert listed == builtin, (f"README's methods table lists {sorted(listed)}, the built-in "
                             f"methods are {sorted(builtin)}")


def test_help_says_the_batch_is_global():
  text = " ".join(COMMANDS["train"].format_help().split())
  assert "global training batch size, split over all devices" in text
