"""N:M pruning's compact export (packing's ``nm`` form) and ``--execution nm``."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import entropy, execution, export, models, nm, sparse
from jcompress.cli import main
from jcompress.transforms import base, packing, prune, registry
from jcompress.transforms import select as sel

RNG = np.random.default_rng(0)


def _normal(*shape):
  return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def _f32(v):
  return np.asarray(v, "<f4").tobytes()


def test_coding_picks_the_smaller_position_stream():
  assert packing.nm_coding(2, 4, 10) == ("combination", 3, 10)  # 6 patterns: 3 bits a group
  assert packing.nm_coding(1, 4, 10) == ("index", 2, 10)  # a tie: 2 bits either way
  assert packing.nm_coding(2, 8, 10) == ("combination", 5, 10)  # 28 < 2 * 3 bits
  assert packing.nm_coding(32, 64, 10) == ("index", 6, 320)  # C(64, 32) > 2^16
  keep = np.zeros((8, 3), bool)
  keep[[0, 1, 5, 6], :] = True  # 2 of every 4 inputs (4 of 8 too, at 7 bits per 8)
  assert packing.nm_pattern(keep) == (2, 4)
  assert packing.nm_pattern(keep.reshape(-1)) is None  # no input axis
  keep[0, 0] = False
  assert packing.nm_pattern(keep) is None


@pytest.mark.parametrize("shape", [(64, 24), (3, 3, 16, 8)])
@pytest.mark.parametrize("structure, n", [("2:4", 2), ("1:4", 1)])
def test_round_trip_is_exact_and_smaller_than_unstructured(shape, structure, n):
  method = registry.build("prune", ["net/kernel"], structure=structure)
  trainable, cstate = method.init({"net": {"kernel": _normal(*shape)}})
  payload, meta = prune.export_arrays(trainable, cstate)["net/kernel"]
  groups = int(np.prod(shape)) // 4
  coding, bits, count = packing.nm_coding(n, 4, groups)
  assert (meta["format"], meta["n"], meta["m"], meta["position_coding"]) == (
      "nm", n, 4, coding)
  assert meta["layout"]["positions"][1] == packing.packed_size(count, bits)
  assert meta["layout"]["values"][1] == 4 * n * groups  # the kept floats, no fillers
  forward = np.asarray(method.apply(trainable, cstate)["net"]["kernel"])
  back = prune.import_arrays({"net/kernel": (payload, meta)})["net/kernel"]
  assert back.dtype == np.float32 and back.tobytes() == forward.tobytes()
  # The same tensor stored as unstructured sparsity (a flat mask: no input axis).
  mask = np.asarray(cstate["masks"]["net"]["kernel"])
  sections, _ = packing.pack_sparse(forward, mask.reshape(-1), 32, _f32)
  assert len(payload) < sum(map(len, sections.values()))


@pytest.mark.parametrize("second, options", [("quantize", {"bits": 4}), ("share", {"bits": 3}),
                                             ("binary", {})])
def test_codes_of_a_later_method_are_stored_n_of_m_and_entropy_coded(second, options):
  paths = ["fc/kernel", "conv/kernel"]
  params = {"fc": {"kernel": _normal(96, 40)}, "conv": {"kernel": _normal(1, 1, 32, 12)}}
  methods = [registry.build("prune", paths, structure="2:4"),
             registry.build(second, paths, **options)]
  trainable, cstate = base.stack(methods).init(params)
  forward = sel.flatten(base.stack(methods).apply(trainable, cstate))
  for path, (name, payload, meta) in export.encode(methods, trainable, cstate).items():
    assert name == second and meta["format"] == "nm" and "positions" in meta["symbols"]
    small, coded = entropy.compress(payload, meta, "ans")
    assert entropy.split_bytes(coded, len(small))["positions"] > 0
    raw, raw_meta = entropy.expand(small, coded, limit=10 ** 6)
    back = registry.METHODS[name].decode({path: (raw, raw_meta)})[path]
    assert np.asarray(back).tobytes() == np.asarray(forward[path]).tobytes()


def test_corrupt_positions_are_refused():
  # 16:32 places take 5 bits each (C(32, 16) > 2^16), more than a bitmask: crafted here.
  meta = {"format": "nm", "n": 16, "m": 32, "position_coding": "index", "position_bits": 5,
          "entries": 32, "kept": 32, "shape": [32, 2]}
  parts = {"positions": packing.pack_codes(np.tile(np.arange(16), 2), 5), "values": _f32(
      np.arange(1.0, 33.0))}
  out = packing.unpack_sparse(parts, meta, 64, np.float32, lambda b, k: np.frombuffer(b, "<f4"))
  assert out.reshape(32, 2)[:16].T.reshape(-1).tolist() == list(range(1, 33))
  parts["positions"] = packing.pack_codes(np.zeros(32, int), 5)
  with pytest.raises(ValueError, match="not increasing places in groups of 32"):
    packing.unpack_sparse(parts, meta, 64, np.float32, lambda b, k: np.frombuffer(b, "<f4"))
  method = registry.build("prune", ["w"], structure="1:4")
  payload, meta = prune.export_arrays(*method.init({"w": _normal(16, 2)}))["w"]
  with pytest.raises(ValueError, match="N:M meta"):
    prune.import_arrays({"w": (payload, {**meta, "m": 5})})
  two = registry.build("prune", ["w"], structure="2:8")
  payload, meta = prune.export_arrays(*two.init({"w": _normal(16, 2)}))["w"]
  assert meta["position_coding"] == "combination"
  parts = packing.split(payload, meta["layout"])
  big, layout = packing.concat({"positions": packing.pack_codes(np.full(4, 31), 5),
                                "values": parts["values"]})
  with pytest.raises(ValueError, match="position code is 31, above 27"):
    prune.import_arrays({"w": (big, {**meta, "layout": layout})})


@pytest.mark.parametrize("form, rows", [("auto", 1), ("auto", 9), ("gather", 9),
                                        ("expand", 1)])
@pytest.mark.parametrize("shape, structure", [((64, 24), "2:4"), ((1, 1, 32, 6), "1:4")])
def test_matmul_equals_the_dense_masked_product(form, rows, shape, structure):
  method = registry.build("prune", ["w"], structure=structure)
  w = method.apply(*method.init({"w": _normal(*shape)}))["w"]
  n, m = map(int, structure.split(":"))
  mat = nm.from_dense(w, n, m, form)
  assert mat.nonzero == w.size * n // m
  x = _normal(rows, shape[-2])
  np.testing.assert_allclose(jax.jit(nm.matmul)(x, mat), x @ w.reshape(shape[-2:]), rtol=1e-5,
                             atol=1e-5)


def test_from_dense_refuses_what_is_not_n_of_m():
  with pytest.raises(ValueError, match="more than 1 nonzeros in a group of 4"):
    nm.from_dense(jnp.ones((8, 2)), 1, 4)
  with pytest.raises(ValueError, match="not a dense or 1x1 conv kernel"):
    nm.from_dense(jnp.ones((3, 3, 8, 2)), 2, 4)
  with pytest.raises(ValueError, match="unknown form"):
    nm.from_dense(jnp.zeros((8, 2)), 2, 4, "csr")


def test_lenet300_nm_logits_equal_dense_masked_and_unstructured_is_refused():
  model = models.create("lenet300", num_classes=10, input_shape=(28, 28, 1))
  x = _normal(3, 28, 28, 1)
  params = jax.tree.map(lambda s: _normal(*s.shape) / np.sqrt(s.shape[0]),
                        jax.eval_shape(model.init, jax.random.key(0), x)["params"])
  method = registry.build("prune", ["fc1/kernel", "fc2/kernel", "fc3/kernel"], structure="2:4")
  trainable, cstate = base.stack([method]).init(params)
  run = execution.get("nm", [method], trainable, cstate)
  forward = base.stack([method]).apply(trainable, cstate)

  @jax.jit
  def logits(trainable, cstate):
    with run(trainable, cstate):
      return model.apply({"params": forward}, x)

  expected = jax.jit(model.apply)({"params": forward}, x)
  np.testing.assert_allclose(logits(trainable, cstate), expected, rtol=1e-5, atol=1e-5)
  assert execution.skips_zeros(run)
  loose = registry.build("prune", ["fc1/kernel"], sparsity="0.5")
  trainable, cstate = base.stack([loose]).init(params)
  with pytest.raises(ValueError, match="--execution nm runs kernels pruned with --structure"):
    execution.get("nm", [loose], trainable, cstate)


def test_sparse_execution_takes_the_n_of_m_product():
  w = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  with sparse.sparse_execution({"kernel": nm.from_dense(w, 1, 2)}, nm.matmul):
    y = nn.Dense(2, use_bias=False).apply({"params": {"kernel": w}}, jnp.ones((1, 2)))
  assert y.tolist() == [[1.0, 2.0]]


def _json(capsys):
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_eval_exported_and_nm_execution_equal_the_workdir(tmp_path, capsys):
  src, dst, out = tmp_path / "src", tmp_path / "nm", tmp_path / "nm.jcx"
  # test_execution's training run: the compilation cache has its steps in a full run.
  assert main(["train", "--model", "lenet300", "--dataset", "mnist_sample", "--epochs", "1",
               "--batch-size", "64", "--train-size", "256", "--optimizer", "adam",
               "--lr", "1e-3", "--workdir", str(src)]) == 0
  assert main(["compress", "--from", str(src), "--workdir", str(dst), "--method", "prune",
               "--structure", "2:4", "--epochs", "0"]) == 0
  capsys.readouterr()
  assert main(["eval", "--workdir", str(dst), "--execution", "nm", "--json"]) == 0
  workdir = _json(capsys)
  assert main(["export", "--workdir", str(dst), "--out", str(out)]) == 0
  sizes = _json(capsys)
  assert main(["eval", "--exported", str(out), "--json"]) == 0
  from_file = _json(capsys)  # float execution of the decoded kernels
  assert from_file["accuracy"] == workdir["accuracy"]
  assert from_file["loss"] == pytest.approx(workdir["loss"], rel=1e-5)
  assert from_file["exported_bytes"] == workdir["exported_bytes"] == sizes["param_bytes"]
  kernels = 784 * 300 + 300 * 100 + 100 * 10
  # Half the kernels' floats, under 3 bits per group of 4 of positions, float32 biases.
  assert 0 < sizes["positions_bytes"] <= kernels // 4 * 3 // 8 + 3
  assert sizes["param_bytes"] <= 2 * kernels + kernels * 3 // 32 + 4 * 410 + 3
