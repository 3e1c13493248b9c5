"""Trained weight sharing: k-means, Han's centroid gradient, zeros kept, codec, CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import export
from jcompress.cli import main
from jcompress.transforms import base, registry, share


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"fc": {"kernel": jnp.asarray(rng.normal(size=(40, 6)), jnp.float32),
                 "bias": jnp.zeros(6)}}


@pytest.mark.parametrize("init", share.INITS)
def test_kmeans_reaches_a_fixed_point_of_lloyd(init):
  values = np.random.default_rng(1).normal(size=500)
  centroids, index = share.kmeans_1d(values, 8, init, iters=100)
  assert centroids.shape == (8,) and np.all(np.diff(centroids) >= 0)
  # Each weight is at its nearest centroid and each used centroid is its members' mean.
  nearest = np.abs(values[:, None] - centroids[None, :]).argmin(axis=1)
  np.testing.assert_array_equal(centroids[nearest], centroids[index])
  for j in np.unique(index):
    assert centroids[j] == pytest.approx(values[index == j].mean(), rel=1e-5)


def test_linear_initialisation_spans_the_weights():
  values = np.array([-3.0, -1.0, 0.5, 2.0, 5.0])
  np.testing.assert_allclose(share.initial_centroids(values, 3, "linear", None), [-3, 1, 5])
  rng = np.random.default_rng(0)
  assert set(share.initial_centroids(values, 3, "random", rng)) <= set(values)


def test_values_are_the_codebook_and_centroids_get_their_members_summed_gradient():
  m = registry.build("share", ["fc/kernel"], bits=3)
  trainable, cstate = m.init(_params())
  out = np.asarray(m.apply(trainable, cstate)["fc"]["kernel"])
  codebook = np.asarray(trainable["fc"]["kernel_codebook"])
  assert codebook.shape == (8,) and set(np.unique(out)) <= set(codebook)
  assert "kernel" not in trainable["fc"] and set(m.apply(trainable, cstate)) == {"fc"}
  g = jax.random.normal(jax.random.key(0), out.shape)
  grads = jax.grad(lambda t: jnp.sum(g * m.apply(t, cstate)["fc"]["kernel"]))(trainable)
  index = np.asarray(cstate["index"]["fc"]["kernel"])
  expected = np.bincount(index.reshape(-1), np.asarray(g).reshape(-1), minlength=8)
  np.testing.assert_allclose(grads["fc"]["kernel_codebook"], expected, rtol=1e-5, atol=1e-6)
  assert base.bits_of(m, trainable, cstate)["fc/kernel"] == 3


def test_after_pruning_zeros_stay_zero_and_get_no_centroid(tmp_path):
  methods = [registry.build("prune", ["fc/kernel"], sparsity="0.9"),
             registry.build("share", ["fc/kernel"], bits=2)]
  m = base.stack(methods)
  trainable, cstate = m.init(_params())
  out = np.asarray(m.apply(trainable, cstate)["fc"]["kernel"])
  keep = np.asarray(cstate["0"]["masks"]["fc"]["kernel"])
  assert np.all(out[~keep] == 0) and np.all(out[keep] != 0)
  assert len(np.unique(out[keep])) <= 3  # code 0 is the zero: 3 shared nonzero values
  # The zero code gets no gradient: a step cannot revive the pruned weights.
  grads = jax.grad(lambda t: jnp.sum(m.apply(t, cstate)["fc"]["kernel"] ** 2 + 1.0))(trainable)
  assert grads["fc"]["kernel_codebook"][0] == 0
  sizes = export.save_params(tmp_path / "s.jcm", methods, trainable, cstate)
  _, variables = export.load(tmp_path / "s.jcm")
  np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], out)
  assert sizes["param_bytes"] < 4 * 24 + 4 * 6 + 4 * 4  # 24 kept at 2 bits + positions


@pytest.mark.parametrize("sparsity", [None, "0.5", "0.97"])
def test_codec_is_bits_per_weight_and_exact(sparsity):
  params = _params(2)
  if sparsity:
    m0 = registry.build("prune", ["fc/kernel"], sparsity=sparsity)
    params = m0.apply(*m0.init(params))
  m = registry.build("share", ["fc/kernel"], bits=4)
  trainable, cstate = m.init(params)
  payload, meta = m.encode(trainable, cstate, {})["fc/kernel"]
  if sparsity is None:
    assert len(payload) == 240 * 4 // 8 + 16 * 4
  decoded = share.decode({"fc/kernel": (payload, meta)})["fc/kernel"]
  np.testing.assert_array_equal(decoded, m.apply(trainable, cstate)["fc"]["kernel"])


def test_bad_exported_tensors_are_refused():
  m = registry.build("share", ["fc/kernel"], bits=4)
  payload, meta = m.encode(*m.init(_params()), {})["fc/kernel"]
  with pytest.raises(ValueError, match="codebook of 16 values for 5-bit codes"):
    share.decode({"fc/kernel": (payload, {**meta, "bits": 5})})
  with pytest.raises(ValueError, match="bits 40"):
    share.decode({"fc/kernel": (payload, {**meta, "bits": 40})})
  with pytest.raises(ValueError, match="cannot hold 2400 codes"):
    share.decode({"fc/kernel": (payload, {**meta, "shape": [400, 6]})})


def test_options_are_checked():
  with pytest.raises(ValueError, match=r"share: --bits must be in \[1, 16\], got 0"):
    registry.build("share", ["fc/kernel"], bits=0)
  with pytest.raises(ValueError, match="share: --centroid-init must be one of linear, density"):
    registry.build("share", ["fc/kernel"], centroid_init="kmeans++")


def test_cli_end_to_end_on_the_sample(tmp_path, capsys):
  base_run, shared = tmp_path / "base", tmp_path / "shared"
  assert main(["train", "--model", "lenet300", "--dataset", "mnist_sample", "--epochs", "1",
               "--batch-size", "64", "--lr", "1e-3", "--optimizer", "adam",
               "--workdir", str(base_run)]) == 0
  assert main(["compress", "--from", str(base_run), "--workdir", str(shared), "--method",
               "share", "--bits", "4", "--epochs", "1", "--batch-size", "64", "--lr", "1e-4",
               "--optimizer", "adam"]) == 0
  capsys.readouterr()
  assert main(["eval", "--workdir", str(shared), "--json"]) == 0
  from_workdir = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  out = tmp_path / "s.jcm"
  assert main(["export", "--workdir", str(shared), "--out", str(out)]) == 0
  capsys.readouterr()
  assert main(["eval", "--exported", str(out), "--json"]) == 0
  from_file = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert from_file["accuracy"] == from_workdir["accuracy"]
  # 4-bit codes for fc1, fc2 and fc3 (the default selection), float32 biases.
  assert out.stat().st_size < 0.2 * 4 * 266_610
