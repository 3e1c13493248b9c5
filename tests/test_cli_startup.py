"""Start-up: the parser needs neither JAX nor Flax once its cache is written, the
cached parser is the live one, JAX's persistent compilation cache is on for every
command, off with ``--no-compile-cache`` or ``$JCOMPRESS_COMPILE_CACHE=0``, and
``summary --model`` counts what a fresh initialisation has without compiling it."""

import argparse
import json
import os
import subprocess
import sys

import pytest

import optax

from jcompress import caches, cli, cli_spec, models
from jcompress.measure import costs
from jcompress.train.step import init_state, stand_in_state
from jcompress.transforms import base, registry

HEAVY = ("jax", "flax", "optax", "orbax.checkpoint", "tensorflow_datasets", "numpy")
_CHECK = ("import sys\n"
          "from jcompress import cli\n"
          "{}\n"
          "print(sorted(m for m in {!r} if m in sys.modules))\n")


def _python(code: str, env: dict, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                        env={**os.environ, **env}, timeout=300)


def _heavy(code: str, env: dict) -> list[str]:
  proc = _python(_CHECK.format(code, HEAVY), env)
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout.strip().splitlines()[-1].replace("'", '"'))


def test_parser_imports_no_jax_once_cached(tmp_path):
  env = {"JCOMPRESS_CACHE_DIR": str(tmp_path)}
  assert _heavy("", env) == []  # importing the command line never imports JAX
  assert "jax" in _heavy("cli.parser()", env)  # the first parser reads the registries...
  assert list(tmp_path.glob("cli-*.json"))
  assert _heavy("cli.parser()", env) == []  # ...and caches what it needs for the next
  help_ = ("import contextlib, io\n"
           "for argv in (['--help'], ['train', '--help'], ['compress', '--help']):\n"
           "  with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
           "    cli.main(argv)")
  assert _heavy(help_, env) == []


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
  sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
  return {"": parser.format_help()} | {name: p.format_help() for name, p in sub.choices.items()}


def test_cached_parser_is_the_live_one():
  spec = cli_spec.live()
  assert _helps(cli.parser(json.loads(json.dumps(spec)))) == _helps(cli.parser(spec))
  assert cli_spec.ENTRY_POINT_GROUP == registry.ENTRY_POINT_GROUP
  assert cli_spec.PLUGINS_ENV == registry.PLUGINS_ENV


def test_cache_follows_the_sources(tmp_path, monkeypatch):
  """A fingerprint that changed (a source file edited) recomputes and rewrites it."""
  monkeypatch.setenv("JCOMPRESS_CACHE_DIR", str(tmp_path))
  monkeypatch.setattr(cli_spec, "_jax_loaded", lambda: False)  # as a fresh process
  monkeypatch.setattr(cli_spec, "_plugins", lambda given: given)
  calls = []
  monkeypatch.setattr(cli_spec, "live", lambda: calls.append(1) or {"models": len(calls)})
  monkeypatch.setattr(cli_spec, "fingerprint", lambda: "a")
  assert cli_spec.load() == cli_spec.load() == {"models": 1}
  monkeypatch.setattr(cli_spec, "fingerprint", lambda: "b")
  assert cli_spec.load() == {"models": 2} and len(calls) == 2
  assert cli_spec.load(plugins=True) == {"models": 3}  # plugins: always live
  (next(tmp_path.glob("cli-*.json"))).write_text("{not json")
  assert cli_spec.load() == {"models": 4}


@pytest.mark.parametrize("env, disabled, expected", [
    ({}, False, "ROOT/xla"),
    ({"JCOMPRESS_COMPILE_CACHE": "1"}, False, "ROOT/xla"),
    ({}, True, None),
    ({"JCOMPRESS_COMPILE_CACHE": "0"}, False, None),
    ({"JCOMPRESS_COMPILE_CACHE": "off"}, False, None),
    ({"JCOMPRESS_COMPILE_CACHE": "/somewhere/xla"}, False, "/somewhere/xla"),
    ({"JCOMPRESS_COMPILE_CACHE": "/somewhere/xla"}, True, None),
])
def test_compile_cache_folder(env, disabled, expected):
  env = {"JCOMPRESS_CACHE_DIR": "ROOT", **env}
  got = caches.compile_cache_dir(disabled, env)
  assert (None if got is None else got.as_posix()) == expected


def test_cache_root():
  assert caches.root({"XDG_CACHE_HOME": "/x"}).as_posix() == "/x/jcompress"
  assert caches.root({"XDG_CACHE_HOME": "/x", "JCOMPRESS_CACHE_DIR": "/j"}).as_posix() == "/j"
  assert caches.root({}).parts[-2:] == (".cache", "jcompress")


_STATE = ("import sys, jax\n"
          "from jcompress.cli import main\n"
          "rc = main(sys.argv[1:])\n"
          "print(rc, jax.config.jax_enable_compilation_cache,\n"
          "      jax.config.jax_compilation_cache_dir)\n")


@pytest.mark.parametrize("flag, env, on", [
    ([], {}, True), (["--no-compile-cache"], {}, False),
    ([], {"JCOMPRESS_COMPILE_CACHE": "0"}, False)])
def test_every_command_turns_the_compile_cache_on_or_off(tmp_path, flag, env, on):
  env = {"JCOMPRESS_CACHE_DIR": str(tmp_path), "JCOMPRESS_COMPILE_CACHE": "1", **env}
  argv = ["export", "--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "m"), *flag]
  proc = _python(_STATE, env, *argv)  # fails (no such run), after the cache is set up
  rc, enabled, folder = proc.stdout.split()
  assert rc == "2", proc.stderr
  assert enabled == str(on)
  if on:
    assert folder == str(tmp_path / "xla")


def test_compiled_programs_are_kept_and_reused(tmp_path):
  code = ("import jax, jax.numpy as jnp\n"
          "from jcompress import caches\n"
          "print(caches.enable_compile_cache())\n"
          "print(jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).sum())\n")
  folder = tmp_path / "xla"
  for _ in range(2):
    proc = _python(code, {"JCOMPRESS_COMPILE_CACHE": str(folder)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == str(folder)
  assert any(folder.iterdir())
  off = _python(code, {"JCOMPRESS_COMPILE_CACHE": "0",
                       "JCOMPRESS_CACHE_DIR": str(tmp_path / "other")})
  assert off.returncode == 0 and off.stdout.splitlines()[0] == "None"
  assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("name, shape", [("lenet5", (28, 28, 1)), ("dsc-small", (32, 32, 3)),
                                         ("fcn-small", (28, 28, 1))])
def test_summary_counts_what_a_fresh_initialisation_has(name, shape):
  """Every count (nonzeros of zero biases and unit batch-norm scales included) of the
  traced stand-in equals that of a compiled initialisation."""
  model = models.create(name, num_classes=10, input_shape=shape)
  fast = costs(model, stand_in_state(model, shape), base.IDENTITY, shape)
  slow = costs(model, init_state(model, optax.identity(), shape, 0), base.IDENTITY, shape)
  assert fast[0].to_dict() | fast[1] == slow[0].to_dict() | slow[1]
