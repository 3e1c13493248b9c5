"""Open registration: methods from an outside package (tests/plugins, not jcompress)
through --plugin, $JCOMPRESS_PLUGINS and entry points; workdirs that remember them;
option declarations checked once, qualified when two methods share a name."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from jcompress import cli, export
from jcompress.train.loop import TrainConfig, train_and_evaluate
from jcompress.transforms import base, registry

PLUGINS = pathlib.Path(__file__).parent / "plugins"
INSTALLED = PLUGINS / "installed"  # a dist-info announcing the jcompress.methods entry points


def _run(args, *paths, env=None, code="from jcompress.cli import main; import sys\n"):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, paths)), **(env or {}))
  return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                        text=True, env=env, timeout=600)


MAIN = ("from jcompress.cli import main; import sys, json\n"
        "calls = json.loads(sys.argv[1])\n"
        "for argv in calls:\n"
        "  rc = main(argv)\n"
        "  if rc: sys.exit(rc)\n")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("plugins") / "base"
  train_and_evaluate(TrainConfig(model="lenet300", dataset="mnist_sample", epochs=1,
                                 batch_size=64, lr=1e-3, optimizer="adam"), workdir,
                     log=lambda *_: None)
  return workdir


@pytest.mark.parametrize("method,options", [("pow2", ["--max-shift", "5"]),
                                            ("shrink", ["--strength", "1e-3"])])
def test_outside_method_runs_through_every_command(base_run, tmp_path, method, options):
  out, exported = tmp_path / method, tmp_path / f"{method}.jcm"
  compress = ["compress", "--plugin", "jcx_plugins." + method, "--from", str(base_run),
              "--workdir", str(out), "--method", method, "--select", "fc1", "--epochs", "1",
              "--batch-size", "64", *options]
  proc = _run([json.dumps([compress])], PLUGINS, code=MAIN)
  assert proc.returncode == 0, proc.stderr
  config = json.loads((out / "config.json").read_text())
  assert config["compression"][0]["module"] == f"jcx_plugins.{method}"
  # Plain commands, no --plugin: the workdir names the module.
  calls = [["eval", "--workdir", str(out), "--json"],
           ["summary", "--workdir", str(out), "--format", "json"],
           ["export", "--workdir", str(out), "--out", str(exported)],
           ["eval", "--exported", str(exported), "--json"]]
  proc = _run([json.dumps(calls)], PLUGINS, code=MAIN)
  assert proc.returncode == 0, proc.stderr
  lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  from_workdir, summary, sizes, from_file = lines
  assert from_file["accuracy"] == pytest.approx(from_workdir["accuracy"], abs=1e-6)
  header, _ = export.read_header(exported)
  fc1 = next(t for t in header["tensors"] if t["path"] == "fc1/kernel")
  if method == "pow2":  # its codec: one byte per weight, not four
    assert fc1["encoding"] == "pow2" and fc1["length"] < 784 * 300 + 16
    assert summary["exported_bytes"] < 0.5 * 266610 * 4
  else:  # no codec: float32, and eval/summary/export still work
    assert fc1["encoding"] == "float32"
    assert summary["exported_bytes"] == 266610 * 4
  # Without the package on the path, the error names the module to install.
  proc = _run(["eval", "--workdir", str(out)], code="from jcompress.cli import main; import "
              "sys; sys.exit(main(sys.argv[1:]))")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert f"jcx_plugins.{method}" in proc.stderr and "install" in proc.stderr


def test_entry_points_and_env_register_outside_methods():
  code = "import jcompress.transforms as t; print(sorted(t.METHODS))"
  listed = _run([], PLUGINS, INSTALLED, code=code)
  assert listed.returncode == 0, listed.stderr
  assert {"pow2", "shrink", "binary", "distill"} <= set(eval(listed.stdout))  # noqa: S307
  plain = _run([], PLUGINS, code=code)
  assert "pow2" not in plain.stdout
  env = _run([], PLUGINS, env={"JCOMPRESS_PLUGINS": "jcx_plugins.pow2"}, code=code)
  assert "pow2" in env.stdout and "shrink" not in env.stdout
  bad = _run(["train", "--help"], env={"JCOMPRESS_PLUGINS": "no_such_plugin"},
             code="from jcompress.cli import main; import sys; sys.exit(main(sys.argv[1:]))")
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert "no_such_plugin" in bad.stderr


def test_shared_option_names_are_qualified(base_run, tmp_path):
  code = ("from jcompress.cli import main; import sys; sys.exit(main(sys.argv[1:]))")
  help_text = _run(["compress", "--plugin", "jcx_plugins.shrink", "--help"], PLUGINS, code=code)
  assert help_text.returncode == 0, help_text.stderr
  assert "--ttq.threshold" in help_text.stdout and "--shrink.threshold" in help_text.stdout
  args = ["compress", "--plugin", "jcx_plugins.shrink", "--from", str(base_run), "--workdir",
          str(tmp_path / "x"), "--method", "ttq", "--method", "shrink", "--select", "fc2"]
  ambiguous = _run(args + ["--threshold", "0.1"], PLUGINS, code=code)
  assert ambiguous.returncode == 2 and "Traceback" not in ambiguous.stderr
  assert "--ttq.threshold" in ambiguous.stderr and "ambiguous" in ambiguous.stderr
  ok = _run(args + ["--ttq.threshold", "0.1", "--shrink.threshold", "0.01"], PLUGINS, code=code)
  assert ok.returncode == 0, ok.stderr
  plan = json.loads((tmp_path / "x" / "config.json").read_text())["compression"]
  assert [s["options"]["threshold"] for s in plan] == [0.1, 0.01]


def test_options_are_checked_in_build_from_python():
  with pytest.raises(ValueError, match=r"ttq: --threshold must be in \(0, 1\), got 1.5"):
    registry.build("ttq", ["w"], threshold=1.5)
  with pytest.raises(ValueError, match="ttq: --packing must be one of 2bit, trit5"):
    registry.build("ttq", ["w"], packing="3bit")
  with pytest.raises(ValueError, match="prune: --interval must be int"):
    registry.build("prune", ["w"], interval=2.5)
  with pytest.raises(ValueError, match="takes no option bits"):
    registry.build("ttq", ["w"], bits=4)
  assert registry.build("ttq", ["w"], threshold="0.1").paths == ("w",)  # CLI text parses


@pytest.mark.parametrize("options,match", [
    ((base.Option("Bad_Name", int, 1, ""),), "lower-case words"),
    ((base.Option("k", int, 20, "", range="[0, 10]"),), "default must be in"),
    ((base.Option("k", str, "x", "", ("a", "b")),), "default must be one of"),
    ((base.Option("k", int, 1, "", range="0..1"),), "not an interval"),
    ((base.Option("k", int, 1, ""), base.Option("k", int, 1, "")), "declares an option twice"),
])
def test_bad_declarations_fail_at_registration(options, match):
  with pytest.raises(ValueError, match=match):
    registry.register("jcx_bad", *options)(lambda paths: None)
  assert "jcx_bad" not in registry.METHODS


def test_a_name_taken_by_another_module_is_an_error():
  with pytest.raises(ValueError, match="registered by both jcompress.transforms.ttq|"
                     "registered by both jcompress.transforms.ternary"):
    registry.register("ttq")(lambda paths: None)


def test_unknown_method_and_missing_plugin_are_one_line_errors(capsys):
  assert cli.main(["compress", "--from", "a", "--workdir", "b", "--method", "nope"]) == 2
  err = capsys.readouterr().err
  assert "unknown --method 'nope'; valid: act_quant, binary, distill" in err
  assert cli.main(["eval", "--plugin", "no_such_module", "--workdir", "x"]) == 2
  assert "--plugin no_such_module: no module named" in capsys.readouterr().err
