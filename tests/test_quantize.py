import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcompress import models
from jcompress.transforms import base, registry, quantize as qz
from jcompress.transforms import select as sel

# Integer vs weight-only execution: only the activations' per-tensor 8-bit rounding
# differs, so the logits agree to within this fraction of their largest magnitude
# (measured: 0.5-0.7% on random-init lenet300/lenet5, per tensor and per channel).
INT8_LOGIT_TOLERANCE = 0.02


def _w(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _init(model, x, seed=0):
  # Shapes from eval_shape, values from numpy: jitting Flax's initialisers costs
  # tens of seconds of compilation on a busy CPU.
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  return jax.tree.map(lambda s: (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])))
                      .astype(np.float32), shapes)


def _params():
  return {"conv1": {"kernel": _w((3, 3, 2, 4), 1), "bias": jnp.zeros(4)},
          "fc1": {"kernel": _w((6, 5), 2), "bias": jnp.ones(5)}}


@pytest.mark.parametrize("bits", [2, 8, 16])
@pytest.mark.parametrize("scheme", qz.SCHEMES)
@pytest.mark.parametrize("granularity", qz.GRANULARITIES)
def test_error_within_half_step_and_codes_in_range(bits, scheme, granularity):
  w = _w((7, 5), bits)
  q = qz.quantize_tensor(w, bits, scheme, granularity)
  qmin, qmax = qz.code_range(bits, scheme)
  codes = np.asarray(q.codes)
  assert codes.dtype == np.dtype(("int" if scheme == "symmetric" else "uint")
                                 + ("8" if bits <= 8 else "16"))
  assert qmin <= codes.min() and codes.max() <= qmax
  assert q.scale.shape == q.zero_point.shape == ((5,) if granularity == "channel" else ())
  error = np.abs(np.asarray(qz.dequantize_tensor(q)) - np.asarray(w))
  assert (error <= np.asarray(q.scale) / 2 * (1 + 1e-5) + 1e-7).all()


def test_per_channel_scales_follow_the_last_axis():
  kernel = _w((3, 3, 2, 4)) * np.array([1.0, 10.0, 1.0, 1.0], np.float32)
  q = qz.quantize_tensor(kernel, 8, "symmetric", "channel")
  assert q.scale.shape == (4,)
  np.testing.assert_allclose(q.scale, np.abs(kernel).max(axis=(0, 1, 2)) / 127, rtol=1e-6)
  assert np.abs(np.asarray(q.codes)).max(axis=(0, 1, 2)).tolist() == [127] * 4


def test_asymmetric_all_positive_and_all_negative():
  w = np.random.default_rng(0).uniform(1.0, 2.0, size=50).astype(np.float32)
  q = qz.quantize_tensor(w, 4, "asymmetric")
  assert int(q.zero_point) == 0 and int(np.asarray(q.codes).max()) == 15
  assert np.abs(qz.dequantize_tensor(q) - w).max() <= q.scale / 2 * (1 + 1e-5)
  q = qz.quantize_tensor(-w, 4, "asymmetric")
  assert int(q.zero_point) == 15
  assert np.abs(qz.dequantize_tensor(q) + w).max() <= q.scale / 2 * (1 + 1e-5)


def test_zero_tensor_is_exact():
  for scheme in qz.SCHEMES:
    q = qz.quantize_tensor(jnp.zeros((3, 2)), 8, scheme, "channel")
    assert np.asarray(q.scale).tolist() == [1.0, 1.0]
    assert (np.asarray(qz.dequantize_tensor(q)) == 0).all()


def test_quantize_pytree_and_dequantize():
  params = _params()
  quantized, dequantize = qz.quantize(params, ["fc1/kernel"], bits=4)
  assert isinstance(quantized["fc1"]["kernel"], qz.QTensor)
  assert quantized["conv1"]["kernel"] is params["conv1"]["kernel"]
  out = dequantize(quantized)
  assert jax.tree.structure(out) == jax.tree.structure(params)
  step = float(quantized["fc1"]["kernel"].scale)
  assert np.abs(out["fc1"]["kernel"] - params["fc1"]["kernel"]).max() <= step / 2 * (1 + 1e-5)


def test_straight_through_gradient_identity_inside_zero_outside():
  w = jnp.array([-0.9, -0.3, 0.0, 0.2, 0.74, 0.76, 2.0])
  scale, bits = 0.1, 4  # codes in [-7, 7]: |w| <= 0.75 is inside the clip range
  c = jnp.arange(1.0, 8.0)
  g = jax.jit(jax.grad(lambda w: jnp.sum(c * qz.fake_quant(w, scale, 0, bits=bits))))(w)
  inside = np.array([False, True, True, True, True, False, False])
  np.testing.assert_array_equal(g, np.where(inside, c, 0.0))
  np.testing.assert_allclose(qz.fake_quant(w, scale, 0, bits=bits),
                             [-0.7, -0.3, 0.0, 0.2, 0.7, 0.7, 0.7], atol=1e-6)
  g = jax.jit(jax.grad(lambda w: jnp.sum(qz.fake_quant(w, 0.1, 3, bits=3, scheme="asymmetric"))))(
      jnp.array([-0.4, -0.2, 0.4, 0.5]))  # codes w/0.1 + 3 in [0, 7]
  np.testing.assert_array_equal(g, [0.0, 1.0, 1.0, 0.0])


def test_quantize_method_freezes_codes():
  m = registry.build("quantize", ["conv1/kernel", "fc1/kernel"], bits=4, granularity="channel")
  params = _params()
  trainable, cstate = m.init(params)
  assert trainable is params
  assert cstate["fc1"]["kernel"]["codes"].dtype == jnp.int8
  tx = m.optimizer(trainable, optax.sgd(1.0))
  grads = jax.tree.map(jnp.ones_like, trainable)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  moved = {p for p, u in sel.flatten(updates).items() if np.any(u != 0)}
  assert moved == {"conv1/bias", "fc1/bias"}  # the quantized kernels are frozen
  out = m.apply(trainable, cstate)
  assert jax.tree.structure(out) == jax.tree.structure(params)
  assert all(a.shape == b.shape and a.dtype == b.dtype
             for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(params)))
  jitted = jax.jit(m.apply)(trainable, cstate)
  jax.tree.map(np.testing.assert_array_equal, jitted, out)
  assert m.update(trainable, cstate, 1) == (trainable, cstate)
  assert m.bits(trainable, cstate) == {"conv1/kernel": 4.0, "fc1/kernel": 4.0}


def test_qat_method_fake_quant_and_requantize():
  m = registry.build("qat", ["fc1/kernel"], bits=3, scheme="asymmetric")
  params = _params()
  trainable, cstate = m.init(params)
  assert trainable["fc1"]["kernel"] is params["fc1"]["kernel"]
  out = m.apply(trainable, cstate)
  expected = qz.dequantize_tensor(qz.qtensors(cstate)["fc1/kernel"])
  np.testing.assert_array_equal(out["fc1"]["kernel"], expected)
  np.testing.assert_array_equal(jax.jit(m.apply)(trainable, cstate)["fc1"]["kernel"], expected)
  grads = jax.grad(lambda t: jnp.sum(m.apply(t, cstate)["fc1"]["kernel"] * 3.0))(trainable)
  np.testing.assert_array_equal(grads["fc1"]["kernel"], np.full((6, 5), 3.0))
  moved = jax.tree.map(lambda x: x * 2.0, trainable)
  _, new = jax.jit(m.update)(moved, cstate, jnp.int32(1))
  assert float(new["fc1"]["kernel"]["scale"]) == pytest.approx(
      2 * float(cstate["fc1"]["kernel"]["scale"]), rel=1e-6)


@pytest.mark.parametrize("method", ["quantize", "qat"])
@pytest.mark.parametrize("options", [dict(bits=3), dict(bits=8, granularity="channel"),
                                     dict(bits=12, scheme="asymmetric", granularity="channel")])
def test_export_import_bit_identical(method, options):
  m = registry.build(method, ["conv1/kernel", "fc1/kernel"], **options)
  trainable, cstate = m.init(_params())
  exported = qz.export_arrays(trainable, cstate)
  bits = options["bits"]
  codes_bytes = exported["fc1/kernel"][1]["layout"]["codes"][1]
  assert codes_bytes == -(-30 * bits // 8)
  rebuilt = qz.import_arrays(exported)
  applied = sel.flatten(jax.jit(m.apply)(trainable, cstate))
  for path, kernel in rebuilt.items():
    assert np.asarray(kernel).tobytes() == np.asarray(applied[path]).tobytes()


@pytest.mark.parametrize("bits", [0, 1, 33])
def test_bad_bits_name_the_option(bits):
  with pytest.raises(ValueError, match=f"--bits must be in \\[2, 16\\], got {bits}"):
    registry.build("quantize", ["fc1/kernel"], bits=bits)


def test_bad_options_and_paths():
  with pytest.raises(ValueError, match="--scheme must be one of symmetric, asymmetric"):
    registry.build("qat", ["fc1/kernel"], scheme="affine")
  with pytest.raises(ValueError, match="--granularity must be one of tensor, channel"):
    registry.build("qat", ["fc1/kernel"], granularity="row")
  with pytest.raises(ValueError, match="fc9/kernel"):
    registry.build("quantize", ["fc9/kernel"]).init(_params())
  assert {"quantize", "qat"} <= set(registry.METHODS)


def _logits(name, input_shape, method_options):
  model = models.create(name, num_classes=10, input_shape=input_shape)
  x = np.random.default_rng(1).uniform(size=(2, *input_shape)).astype(np.float32)
  params = _init(model, x)
  m = registry.build("quantize", sel.select(params), **method_options)
  trainable, cstate = m.init(params)

  @jax.jit
  def weight_only(trainable, cstate, x):
    return model.apply({"params": m.apply(trainable, cstate)}, x)

  @jax.jit
  def integer(trainable, cstate, x):
    with qz.int8_execution(cstate):
      return model.apply({"params": m.apply(trainable, cstate)}, x)

  return np.asarray(weight_only(trainable, cstate, x)), np.asarray(integer(trainable, cstate, x))


@pytest.mark.parametrize("name, input_shape, granularity", [
    ("lenet300", (28, 28, 1), "tensor"), ("lenet5", (28, 28, 1), "channel")])
def test_int8_execution_matches_weight_only(name, input_shape, granularity):
  reference, integer = _logits(name, input_shape, dict(bits=8, granularity=granularity))
  assert not np.array_equal(reference, integer)  # the integer path did run
  assert np.abs(integer - reference).max() <= INT8_LOGIT_TOLERANCE * np.abs(reference).max()


def test_int8_conv_honours_conv_options():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3), strides=2, padding="SAME", name="a")(x)
      x = nn.Conv(4, (3, 3), padding=((1, 0), (0, 2)), kernel_dilation=2,
                  feature_group_count=2, name="b")(x)
      return nn.Dense(3, name="c")(x)

  x = np.random.default_rng(0).uniform(size=(2, 9, 9, 2)).astype(np.float32)
  params = _init(Net(), x)
  m = registry.build("quantize", ["a/kernel", "b/kernel"], granularity="channel")
  trainable, cstate = m.init(params)
  deq = jax.jit(m.apply)(trainable, cstate)
  reference = jax.jit(Net().apply)({"params": deq}, x)
  with qz.int8_execution(cstate):
    integer = jax.jit(Net().apply)({"params": deq}, x)
  assert integer.shape == reference.shape
  assert np.abs(integer - reference).max() <= INT8_LOGIT_TOLERANCE * np.abs(reference).max()


def test_int8_execution_needs_int8_codes():
  for options in (dict(scheme="asymmetric"), dict(bits=9)):
    _, cstate = registry.build("quantize", ["fc1/kernel"], **options).init(_params())
    with pytest.raises(ValueError, match="fc1/kernel: integer execution needs int8 codes"):
      with qz.int8_execution(cstate):
        pass
