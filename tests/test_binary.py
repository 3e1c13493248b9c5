"""Binary weights with a learned scale: values, gradients, codec, composition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import export
from jcompress.transforms import base, binary, registry


def _params():
  rng = np.random.default_rng(0)
  return {"fc": {"kernel": jnp.asarray(rng.normal(size=(40, 6)), jnp.float32),
                 "bias": jnp.zeros(6)}}


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_values_are_two_per_scale(granularity):
  m = registry.build("binary", ["fc/kernel"], granularity=granularity)
  trainable, cstate = m.init(_params())
  w = np.asarray(_params()["fc"]["kernel"])
  axes = (0,) if granularity == "channel" else None
  np.testing.assert_allclose(trainable["fc"]["kernel_scale"], np.abs(w).mean(axis=axes),
                             rtol=1e-6)
  out = np.asarray(m.apply(trainable, cstate)["fc"]["kernel"])
  np.testing.assert_allclose(np.abs(out), np.broadcast_to(np.abs(w).mean(axis=axes), w.shape),
                             rtol=1e-6)
  assert np.all(np.sign(out) == np.where(w >= 0, 1, -1))
  assert set(m.apply(trainable, cstate)) == {"fc"}  # the scale leaves are not model params


def test_gradients_are_the_clipped_straight_through_estimator():
  w = jnp.array([[0.5, -2.0], [0.0, -0.3]])
  alpha = jnp.array([0.7, 1.5])  # per channel
  g = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  g_w, g_alpha = jax.grad(lambda w, a: jnp.sum(g * binary.binarize(w, a, 1.0)),
                          argnums=(0, 1))(w, alpha)
  # |w| <= clip passes alpha * g; -2.0 is beyond the clip: no gradient.
  np.testing.assert_allclose(g_w, [[0.7 * 1.0, 0.0], [0.7 * 3.0, 1.5 * 4.0]])
  # dL/dalpha = sum over the channel of g * sign(w), sign(0) = +1.
  np.testing.assert_allclose(g_alpha, [1.0 + 3.0, -2.0 - 4.0])
  jitted = jax.jit(lambda w: binary.binarize(w, 2.0, 1.0))
  np.testing.assert_array_equal(jitted(w), binary.binarize(w, 2.0, 1.0))


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_codec_is_one_bit_per_weight_and_exact(granularity):
  m = registry.build("binary", ["fc/kernel"], granularity=granularity)
  trainable, cstate = m.init(_params())
  payload, meta = m.encode(trainable, cstate, {})["fc/kernel"]
  scales = 4 * (6 if granularity == "channel" else 1)
  assert len(payload) == 40 * 6 // 8 + scales
  assert base.bits_of(m, trainable, cstate)["fc/kernel"] == pytest.approx(
      8 * len(payload) / 240)
  decoded = binary.decode({"fc/kernel": (payload, meta)})["fc/kernel"]
  np.testing.assert_array_equal(decoded, m.apply(trainable, cstate)["fc"]["kernel"])


def test_after_pruning_zeros_stay_and_the_codec_stores_only_kept_signs(tmp_path):
  methods = [registry.build("prune", ["fc/kernel"], sparsity="0.9"),
             registry.build("binary", ["fc/kernel"])]
  m = base.stack(methods)
  trainable, cstate = m.init(_params())
  out = np.asarray(m.apply(trainable, cstate)["fc"]["kernel"])
  mask = np.asarray(cstate["0"]["masks"]["fc"]["kernel"])
  assert np.all(out[~mask] == 0) and np.all(out[mask] != 0)
  sizes = export.save_params(tmp_path / "b.jcm", methods, trainable, cstate)
  _, variables = export.load(tmp_path / "b.jcm")
  np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], out)
  assert sizes["param_bytes"] < 4 * (240 + 6)  # smaller than float32


def test_options_are_checked():
  with pytest.raises(ValueError, match="binary: --granularity must be one of tensor, channel"):
    registry.build("binary", ["fc/kernel"], granularity="row")
  with pytest.raises(ValueError, match=r"binary: --clip must be in \(0, inf\)"):
    registry.build("binary", ["fc/kernel"], clip=0.0)
  with pytest.raises(ValueError, match="fc/kernel_scale"):
    m = registry.build("binary", ["fc/kernel"])
    m.init(m.init(_params())[0])


def test_lightly_pruned_signs_export_densely_with_their_zeros(tmp_path):
  """At 10% pruned the dense form (every sign a 2-bit code, 0 where pruned) is the
  smallest: it keeps the zeros, so the codec's output is stored (it once stored the
  pruned entries' signs, failed export's decode check and fell back to float32)."""
  methods = [registry.build("prune", ["fc/kernel"], sparsity="0.1"),
             registry.build("binary", ["fc/kernel"])]
  m = base.stack(methods)
  trainable, cstate = m.init(_params())
  sizes = export.save_params(tmp_path / "b.jcm", methods, trainable, cstate, coder="none")
  header, variables = export.load(tmp_path / "b.jcm")
  kernel = next(e for e in header["tensors"] if e["path"] == "fc/kernel")
  assert kernel["encoding"] == "binary" and kernel["meta"]["format"] == "dense"
  np.testing.assert_array_equal(variables["params"]["fc"]["kernel"],
                                np.asarray(m.apply(trainable, cstate)["fc"]["kernel"]))
  assert sizes["param_bytes"] < 4 * np.size(_params()["fc"]["kernel"]) / 8
