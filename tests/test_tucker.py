import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import models
from jcompress.transforms import base, tucker
from jcompress.transforms import select as sel


def _rand(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _init(model, x):
  """Random params without ``model.init``'s eager initializers (slow on a busy CPU)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  leaves, treedef = jax.tree.flatten(shapes)
  return jax.tree.unflatten(treedef, [0.1 * _rand(s.shape, i) for i, s in enumerate(leaves)])


def _model(name):
  if name == "lenet5":
    model = models.create("lenet5", num_classes=10, input_shape=(28, 28, 1))
    x = _rand((1, 28, 28, 1), 1)
  else:
    model = models.create("c3d", num_classes=2, input_shape=(8, 32, 32, 1))
    x = _rand((1, 8, 32, 32, 1), 1)
  return model, _init(model, x), x


def _full_rank(params, paths):
  """Factors at full rank (the method itself skips them: they cost more MACs)."""
  flat = sel.flatten(params)
  for path in paths:
    kernel = flat.pop(path)
    factors = tucker.tucker2(kernel, *kernel.shape[-2:])
    flat.update({path + s: f for s, f in zip(("_core", "_u_in", "_u_out"), factors)})
  return sel.unflatten(flat)


def test_hosvd_is_exact_at_full_rank():
  x = _rand((4, 5, 6))
  for iters in (0, 2):
    core, factors = tucker.hosvd(x, (4, 5, 6), hooi_iters=iters)
    np.testing.assert_allclose(tucker.reconstruct(core, factors), x, atol=1e-4)
  core, factors = tucker.hosvd(x, (None, 5, 6))
  assert factors[0] is None and core.shape == (4, 5, 6)
  np.testing.assert_allclose(tucker.reconstruct(core, factors), x, atol=1e-4)


def test_error_decreases_with_rank_and_hooi_does_not_hurt():
  x = _rand((4, 5, 6))
  errors = []
  for r in range(1, 5):
    core, factors = tucker.hosvd(x, (r, r, r))
    errors.append(float(jnp.linalg.norm(tucker.reconstruct(core, factors) - x)))
  refined = tucker.reconstruct(*tucker.hosvd(x, (2, 2, 2), hooi_iters=2))
  assert float(jnp.linalg.norm(refined - x)) <= errors[1] + 1e-4
  assert all(a > b for a, b in zip(errors, errors[1:]))


def test_energy_selects_the_right_counts():
  u = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 4)))[0]
  v = np.linalg.qr(np.random.default_rng(1).normal(size=(5, 4)))[0]
  s = np.array([4.0, 2.0, 1.0, 1.0])  # squared shares: 16/22, 20/22, 21/22, 1
  kernel = jnp.asarray(u @ np.diag(s) @ v.T, jnp.float32)
  for energy, rank in ((0.7, 1), (0.9, 2), (0.95, 3), (1.0, 4)):
    assert tucker.choose_ranks("fc/kernel", kernel, None, energy) == (rank, rank)
  assert tucker.energy_rank([1.0, 0.0, 0.0], 1.0) == 1


@pytest.mark.parametrize("name", ["lenet5", "c3d"])
def test_full_ranks_reproduce_the_logits(name):
  model, params, x = _model(name)
  paths = [p for p in sel.select(params) if np.shape(sel.flatten(params)[p])[-2] > 1]
  method = base.build("tucker", paths)
  trainable = _full_rank(params, paths)
  assert jax.tree.structure(method.apply(trainable, {})) == jax.tree.structure(params)

  @jax.jit
  def run(params, trainable, x):
    rebuilt = method.apply(trainable, {})
    with tucker.factorized_execution(trainable, {}):
      factored = model.apply({"params": rebuilt}, x)
    return model.apply({"params": params}, x), model.apply({"params": rebuilt}, x), factored

  expected, rebuilt, factored = run(params, trainable, x)
  np.testing.assert_allclose(rebuilt, expected, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(factored, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,ranks", [("lenet5", "conv2=6:10,fc1=40:30"),
                                        ("c3d", "conv2=8:8,fc1=16:16")])
def test_factorized_execution_equals_the_reconstructed_forward(name, ranks):
  model, params, x = _model(name)
  method = base.build("tucker", sel.select(params), ranks=ranks, energy=0.5)
  trainable, cstate = method.init(params)
  conv2 = ranks.split(",")[0].split("=")[1]
  assert sel.flatten(cstate)["conv2/kernel/ranks"].tolist() == [int(r) for r in conv2.split(":")]
  layers = tucker.factorized_layers(trainable)
  assert {"conv2", "fc1"} <= set(layers)

  @functools.partial(jax.jit, static_argnums=2)
  def forward(trainable, x, factored: bool):
    params = method.apply(trainable, cstate)
    if not factored:
      return model.apply({"params": params}, x)
    with tucker.factorized_execution(trainable, cstate):
      return model.apply({"params": params}, x)

  np.testing.assert_allclose(forward(trainable, x, True), forward(trainable, x, False),
                             atol=1e-4, rtol=1e-4)
  errors = tucker.reconstruction_errors(params, trainable)
  assert set(errors) == set(layers) and all(0 < e < 1 for e in errors.values())


def test_factorized_conv_keeps_strides_padding_and_bias():
  model = nn.Conv(12, (3, 3), strides=(2, 2), padding="SAME", name="conv")
  x = _rand((2, 9, 9, 8), 2)
  params = _init(model, x)
  method = base.build("tucker", ["kernel"], ranks="0.5")
  trainable, cstate = method.init(params)

  @jax.jit
  def run(trainable, x):
    rebuilt = method.apply(trainable, cstate)
    with tucker.factorized_execution(trainable, cstate):
      return model.apply({"params": rebuilt}, x), model.apply({"params": rebuilt}, x)

  factored, reference = run(trainable, x)
  assert factored.shape == (2, 5, 5, 12)
  np.testing.assert_allclose(factored, reference, atol=1e-4, rtol=1e-4)
  macs = tucker.layer_macs(model, params, trainable, x)
  assert macs[""] == (2 * 25 * 9 * 8 * 12, 2 * 81 * 8 * 4 + 2 * 25 * (9 * 4 * 6 + 6 * 12))


def test_costlier_and_single_channel_layers_are_skipped(caplog):
  _, params, _ = _model("lenet5")
  method = base.build("tucker", sel.select(params), energy=1.0)
  with caplog.at_level(logging.WARNING, logger="jcompress.transforms.tucker"):
    trainable, cstate = method.init(params)
  assert tucker.factorized_layers(trainable) == {} and cstate == {}
  assert jax.tree.structure(trainable) == jax.tree.structure(params)
  text = caplog.text
  assert "conv1/kernel" in text and "one input channel" in text
  assert "fc2/kernel" in text and "not fewer than the original" in text


def test_unknown_leaves_pass_through():
  params = {"fc1": {"kernel": _rand((16, 16)), "bias": jnp.zeros(16), "kernel_wp": jnp.ones(())},
            "other": jnp.arange(3.0)}
  method = base.build("tucker", ["fc1/kernel"], ranks="fc1=2:3")
  trainable, cstate = method.init(params)
  assert sorted(trainable["fc1"]) == ["bias", "kernel_core", "kernel_u_in", "kernel_u_out",
                                      "kernel_wp"]
  assert trainable["fc1"]["kernel_core"].shape == (2, 3)
  out = method.apply(trainable, cstate)
  assert sorted(out["fc1"]) == ["bias", "kernel", "kernel_wp"] and "other" in out


@pytest.mark.parametrize("options,match", [
    ({"energy": 0.0}, "--energy"), ({"energy": 1.5}, "--energy"),
    ({"ranks": "fc9=2:2"}, "--ranks"), ({"ranks": "1.5"}, "--ranks"),
    ({"ranks": "fc1=2"}, "--ranks"), ({"ranks": "fc1=0:2"}, "--ranks"),
    ({"hooi_iters": -1}, "--hooi-iters")])
def test_bad_options_raise(options, match):
  with pytest.raises(ValueError, match=match):
    base.build("tucker", ["fc1/kernel"], **options)


def test_ranks_larger_than_the_mode_raise():
  method = base.build("tucker", ["fc1/kernel"], ranks="fc1=9:2")
  with pytest.raises(ValueError, match="--ranks fc1=9:2 exceeds"):
    method.init({"fc1": {"kernel": _rand((8, 8))}})
  with pytest.raises(ValueError, match="not in the params: fc2/kernel"):
    base.build("tucker", ["fc2/kernel"]).init({"fc1": {"kernel": _rand((8, 8))}})
