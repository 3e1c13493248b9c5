"""jcompress compress: methods from the registry applied to a trained checkpoint."""

import json

import numpy as np
import pytest

from jcompress.cli import main
from jcompress.train.loop import load_workdir
from jcompress.transforms.select import flatten


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("src")
  assert main(["train", "--model", "lenet300", "--dataset", "mnist_sample", "--epochs", "1",
               "--batch-size", "64", "--optimizer", "adam", "--lr", "1e-3",
               "--train-size", "512", "--workdir", str(workdir)]) == 0
  return workdir


def _forward_kernels(workdir):
  _, state, meta, method = load_workdir(workdir)
  return flatten(method.apply(state.params, state.cstate)), meta


def _eval_json(workdir, capsys):
  capsys.readouterr()
  assert main(["eval", "--workdir", str(workdir), "--json"]) == 0
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_oneshot_quantize(trained, tmp_path, capsys):
  dst = tmp_path / "q4"
  assert main(["compress", "--from", str(trained), "--workdir", str(dst), "--method",
               "quantize", "--bits", "4", "--granularity", "channel"]) == 0
  kernels, meta = _forward_kernels(dst)
  assert meta["compression"][0]["method"] == "quantize"
  assert meta["compression"][0]["options"]["bits"] == 4
  for path in ("fc1/kernel", "fc2/kernel", "fc3/kernel"):
    per_channel = [len(np.unique(c)) for c in np.asarray(kernels[path]).T]
    assert max(per_channel) <= 15  # symmetric 4-bit: codes -7..7
  base, result = _eval_json(trained, capsys), _eval_json(dst, capsys)
  assert result["accuracy"] > base["accuracy"] - 0.05


def test_ttq_with_keep_ends_fine_tunes_and_chains(trained, tmp_path, capsys):
  dst = tmp_path / "ttq"
  assert main(["compress", "--from", str(trained), "--workdir", str(dst), "--method", "ttq",
               "--keep-ends", "--epochs", "1", "--train-size", "256", "--batch-size", "64"]) == 0
  kernels, meta = _forward_kernels(dst)
  assert meta["compression"][0]["paths"] == ["fc2/kernel"]
  assert len(np.unique(kernels["fc2/kernel"])) == 3
  assert len(np.unique(kernels["fc1/kernel"])) > 1000
  assert _eval_json(dst, capsys)["accuracy"] > 0.5
  chained = tmp_path / "ttq+q8"
  assert main(["compress", "--from", str(dst), "--workdir", str(chained), "--method",
               "quantize", "--select", "fc1|fc3"]) == 0
  kernels, meta = _forward_kernels(chained)
  assert [p["method"] for p in meta["compression"]] == ["ttq", "quantize"]
  assert len(np.unique(kernels["fc2/kernel"])) == 3
  assert len(np.unique(kernels["fc1/kernel"])) <= 255


@pytest.mark.parametrize("extra, message", [
    (["--method", "quantize", "--select", "conv"], "--select 'conv' selects no tensor"),
    (["--method", "quantize", "--threshold", "0.1"], "--threshold is not an option of --method quantize"),
    (["--method", "quantize", "--bits", "1"], "--bits"),
    (["--method", "ttq", "--threshold", "1.5"], "--threshold"),
])
def test_bad_compress_options(trained, tmp_path, capsys, extra, message):
  before = sorted(p.name for p in (trained / "checkpoints").iterdir())
  assert main(["compress", "--from", str(trained), "--workdir", str(tmp_path / "out")] + extra) == 2
  err = capsys.readouterr().err
  assert message in err
  assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == before


def test_compress_into_source_is_refused(trained, capsys):
  assert main(["compress", "--from", str(trained), "--workdir", str(trained), "--method",
               "quantize"]) == 2
  assert "--workdir must differ from --from" in capsys.readouterr().err


@pytest.mark.parametrize("method, extra, bits", [
    ("quantize", ["--bits", "4"], 4), ("ttq", ["--packing", "trit5"], 1.6)])
def test_export_is_packed_and_predicts_identically(trained, tmp_path, capsys, method, extra, bits):
  dst = tmp_path / method
  assert main(["compress", "--from", str(trained), "--workdir", str(dst), "--method", method]
              + extra) == 0
  out = tmp_path / "model.jcx"
  capsys.readouterr()
  assert main(["export", "--workdir", str(dst), "--out", str(out)]) == 0
  sizes = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert sizes["file_bytes"] == out.stat().st_size
  kernels = 784 * 300 + 300 * 100 + 100 * 10
  biases = 300 + 100 + 10
  packed = sizes["param_bytes"] - 4 * biases
  # At most the codes + scales + padding; entropy coding (export's default) may shrink them.
  assert packed <= kernels * bits / 8 + 3 * 1300
  from_dir, from_file = _eval_json(dst, capsys), None
  assert main(["eval", "--exported", str(out), "--json"]) == 0
  from_file = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert from_file["accuracy"] == from_dir["accuracy"]
  assert from_file["loss"] == pytest.approx(from_dir["loss"], rel=1e-6)
  # The file records the bits the plan counts (not float32): the same bytes and score
  # as the workdir, and its own params' payload as exported_bytes.
  assert from_file["bytes"] == from_dir["bytes"] < kernels + biases  # not 4 bytes a weight
  assert from_file["score"] == pytest.approx(from_dir["score"], rel=1e-9)
  assert from_file["exported_bytes"] == sizes["param_bytes"] == from_dir["exported_bytes"]


def test_truncated_export_is_an_error(trained, tmp_path, capsys):
  out = tmp_path / "base.jcx"
  assert main(["export", "--workdir", str(trained), "--out", str(out)]) == 0
  out.write_bytes(out.read_bytes()[:-100])
  assert main(["eval", "--exported", str(out)]) == 2
  assert "truncated" in capsys.readouterr().err


def test_prune_retrain_keeps_exact_zeros_and_exports_sparse(trained, tmp_path, capsys):
  dst = tmp_path / "pruned"
  assert main(["compress", "--from", str(trained), "--workdir", str(dst), "--method", "prune",
               "--sparsity", "fc1=0.92,fc2=0.91,fc3=0.74", "--epochs", "1",
               "--train-size", "256", "--batch-size", "64"]) == 0
  _, state, _, method = load_workdir(dst)
  kernels = flatten(method.apply(state.params, state.cstate))
  latent = flatten(state.params)
  for path, s in (("fc1/kernel", 0.92), ("fc2/kernel", 0.91), ("fc3/kernel", 0.74)):
    zeros = np.asarray(kernels[path]) == 0
    assert zeros.sum() == round(s * zeros.size)
    assert np.all(np.asarray(latent[path])[zeros] == 0)  # the trained weights, not only the mask
  capsys.readouterr()
  assert main(["summary", "--workdir", str(dst), "--format", "json"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  nonzero = round(0.08 * 784 * 300) + round(0.09 * 300 * 100) + round(0.26 * 1000)
  assert out["nonzero_macs"] == nonzero
  assert out["sparsity"] == pytest.approx(1 - nonzero / 266_200)
  assert out["exported_bytes"] < 0.2 * out["bytes"]
  assert main(["export", "--workdir", str(dst), "--out", str(tmp_path / "p.jcx")]) == 0
  capsys.readouterr()
  assert main(["eval", "--exported", str(tmp_path / "p.jcx"), "--json"]) == 0
  from_file = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert from_file["accuracy"] == _eval_json(dst, capsys)["accuracy"]


def test_tucker_factorizes_and_exports_factors(trained, tmp_path, capsys):
  dst = tmp_path / "tucker"
  assert main(["compress", "--from", str(trained), "--workdir", str(dst), "--method", "tucker",
               "--select", "fc1", "--ranks", "fc1=150:150"]) == 0
  _, state, meta, _ = load_workdir(dst)
  flat = flatten(state.params)
  assert "fc1/kernel" not in flat and flat["fc1/kernel_core"].shape == (150, 150)
  base = _eval_json(trained, capsys)
  result = _eval_json(dst, capsys)
  assert result["accuracy"] > base["accuracy"] - 0.1
  expected = 4 * (150 * 150 + 784 * 150 + 300 * 150)
  assert result["exported_bytes"] == base["exported_bytes"] - 4 * 784 * 300 + expected
  assert main(["export", "--workdir", str(dst), "--out", str(tmp_path / "t.jcx")]) == 0
  capsys.readouterr()
  assert main(["eval", "--exported", str(tmp_path / "t.jcx"), "--json"]) == 0
  from_file = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert from_file["accuracy"] == result["accuracy"]
  # The rebuilt kernel counts the bytes of its factors, as the workdir does.
  assert from_file["bytes"] == pytest.approx(result["bytes"])
  assert from_file["exported_bytes"] == result["exported_bytes"]


def test_tucker_defaults_budget_half_the_macs_at_aligned_ranks_and_time_it(trained, tmp_path,
                                                                           capsys):
  """Without rank options compress spends half the selected layers' MACs on ranks
  rounded to multiples of 8 (--energy 0.9 at exact ranks made LeNet-5 slower), saves
  those choices in the plan, and says how much faster the network measured."""
  dst = tmp_path / "tucker-defaults"
  capsys.readouterr()
  assert main(["compress", "--from", str(trained), "--workdir", str(dst), "--method", "tucker",
               "--select", "fc1|fc2"]) == 0
  out = capsys.readouterr().out
  assert "measured speed-up" in out or "warning: the compressed network runs slower" in out
  _, state, meta, _ = load_workdir(dst)
  options = meta["compression"][0]["options"]
  assert (options["budget_macs"], options["rank_multiple"], options["energy"]) == (0.5, 8, 0.9)
  flat = flatten(state.params)
  macs = 0
  for layer, (c_in, c_out) in (("fc1", (784, 300)), ("fc2", (300, 100))):
    r_in, r_out = flat[f"{layer}/kernel_core"].shape
    assert r_in % 8 == 0 and r_out % 8 == 0
    macs += c_in * r_in + r_in * r_out + r_out * c_out
  assert macs <= 0.5 * (784 * 300 + 300 * 100)
  capsys.readouterr()
  assert main(["compress", "--from", str(trained), "--workdir", str(tmp_path / "e"), "--method",
               "tucker", "--select", "fc1", "--energy", "0.9"]) == 0  # --energy: no budget
  assert load_workdir(tmp_path / "e")[2]["compression"][0]["options"]["budget_macs"] == 0.0


@pytest.mark.parametrize("method, extra, bits", [
    ("quantize", ["--bits", "4"], 4), ("ttq", [], 2)])
def test_pruned_then_quantized_exports_kept_codes_only(trained, tmp_path, capsys, method,
                                                       extra, bits):
  pruned, dst = tmp_path / "p", tmp_path / "pq"
  assert main(["compress", "--from", str(trained), "--workdir", str(pruned), "--method",
               "prune", "--sparsity", "0.9"]) == 0
  assert main(["compress", "--from", str(pruned), "--workdir", str(dst), "--method", method]
              + extra) == 0
  kernels, _ = _forward_kernels(dst)
  for path in ("fc1/kernel", "fc2/kernel", "fc3/kernel"):
    assert np.mean(np.asarray(kernels[path]) == 0) >= 0.9
  out = tmp_path / "pq.jcx"
  capsys.readouterr()
  assert main(["export", "--workdir", str(dst), "--out", str(out)]) == 0
  sizes = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  dense_codes = (784 * 300 + 300 * 100 + 100 * 10) * bits / 8
  assert sizes["param_bytes"] < 0.5 * dense_codes  # positions + 10% of the codes
  from_dir = _eval_json(dst, capsys)
  assert main(["eval", "--exported", str(out), "--json"]) == 0
  from_file = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert from_file["accuracy"] == from_dir["accuracy"]
  assert from_file["loss"] == pytest.approx(from_dir["loss"], rel=1e-6)


def test_keep_ends_follows_creation_order_after_restore(tmp_path, capsys):
  """Restored params come back in alphabetical order, where lcn's fc layers come
  before local1, its first layer."""
  src = tmp_path / "lcn"
  assert main(["train", "--model", "lcn", "--dataset", "mnist_sample", "--epochs", "1",
               "--train-size", "128", "--workdir", str(src)]) == 0
  dst = tmp_path / "q"
  assert main(["compress", "--from", str(src), "--workdir", str(dst), "--method", "quantize",
               "--keep-ends"]) == 0
  _, meta = _forward_kernels(dst)
  paths = meta["compression"][0]["paths"]
  assert "local1/kernel" not in paths and "fc4/kernel" not in paths and "fc1/kernel" in paths


def test_gradual_masks_are_held_by_a_later_run(trained, tmp_path):
  """QAT from a gradually pruned run (8-step ramp): the pruning schedule must not
  run again on the new run's 4 steps (it used to re-count the masks from its first
  stages, reviving weights, and the run ended mid-ramp)."""
  pruned, dst = tmp_path / "p", tmp_path / "pq"
  assert main(["compress", "--from", str(trained), "--workdir", str(pruned), "--method", "prune",
               "--sparsity", "0.9", "--prune-schedule", "gradual", "--ramp-steps", "8",
               "--interval", "2", "--epochs", "2", "--batch-size", "64", "--train-size", "512"]) == 0
  assert main(["compress", "--from", str(pruned), "--workdir", str(dst), "--method", "qat",
               "--bits", "4", "--epochs", "1", "--batch-size", "64", "--train-size", "256"]) == 0
  masks = [flatten(load_workdir(w)[1].cstate["0"]["masks"]) for w in (pruned, dst)]
  for path, mask in masks[0].items():
    assert np.mean(~np.asarray(mask)) == pytest.approx(0.9, abs=0.01), path
    np.testing.assert_array_equal(masks[1][path], mask)
