import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import models
from jcompress.transforms import base, registry, ranks, tucker
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
  method = registry.build("tucker", paths)
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
  method = registry.build("tucker", sel.select(params), ranks=ranks, energy=0.5)
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
  method = registry.build("tucker", ["kernel"], ranks="0.5")
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
  method = registry.build("tucker", sel.select(params), energy=1.0)
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
  method = registry.build("tucker", ["fc1/kernel"], ranks="fc1=2:3")
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
    ({"hooi_iters": -1}, "--hooi-iters"), ({"rank_multiple": 0}, "--rank-multiple")])
def test_bad_options_raise(options, match):
  with pytest.raises(ValueError, match=match):
    registry.build("tucker", ["fc1/kernel"], **options)


def test_ranks_larger_than_the_mode_raise():
  method = registry.build("tucker", ["fc1/kernel"], ranks="fc1=9:2")
  with pytest.raises(ValueError, match="--ranks fc1=9:2 exceeds"):
    method.init({"fc1": {"kernel": _rand((8, 8))}})
  with pytest.raises(ValueError, match="not in the params: fc2/kernel"):
    registry.build("tucker", ["fc2/kernel"]).init({"fc1": {"kernel": _rand((8, 8))}})


def _low_rank(rows, cols, rank, noise, seed=0):
  """``U diag(s) V^T`` with singular values well above the noise's, plus noise."""
  rng = np.random.default_rng(seed)
  u = np.linalg.qr(rng.normal(size=(rows, rank)))[0]
  v = np.linalg.qr(rng.normal(size=(cols, rank)))[0]
  s = np.linspace(3.0, 1.5, rank) * noise * (np.sqrt(rows) + np.sqrt(cols))
  return u @ np.diag(s) @ v.T + noise * rng.normal(size=(rows, cols))


@pytest.mark.parametrize("rows,cols,rank,noise", [(40, 60, 5, 0.1), (64, 64, 8, 0.5),
                                                  (50, 20, 4, 0.2)])
def test_evbmf_recovers_the_rank_and_noise_of_low_rank_plus_noise(rows, cols, rank, noise):
  y = _low_rank(rows, cols, rank, noise)
  found = ranks.evbmf(y)
  assert found.rank == rank
  assert found.noise_variance == pytest.approx(noise ** 2, rel=0.15)
  assert ranks.evbmf(y.T).rank == rank
  assert ranks.vbmf(y).rank >= rank  # a fixed prior shrinks less than the empirical one
  assert ranks.evbmf(np.zeros((4, 6))).rank == 0


def test_vbmf_and_evbmf_rank_the_channel_modes():
  rng = np.random.default_rng(3)
  core = rng.normal(size=(3, 3, 4, 5))
  u_in, u_out = rng.normal(size=(16, 4)), rng.normal(size=(24, 5))
  kernel = np.einsum("...ab,ia,ob->...io", core, u_in, u_out)
  kernel = kernel + 0.01 * kernel.std() * rng.normal(size=kernel.shape)
  assert tucker.choose_ranks("conv/kernel", kernel, "evbmf", 0.9) == (4, 5)
  method = registry.build("tucker", ["conv/kernel"], ranks="evbmf")
  _, cstate = method.init({"conv": {"kernel": jnp.asarray(kernel, jnp.float32)}})
  assert sel.flatten(cstate)["conv/kernel/ranks"].tolist() == [4, 5]
  dense = _low_rank(48, 64, 6, 0.05)
  assert tucker.choose_ranks("fc/kernel", dense, "evbmf", 0.9) == (6, 6)
  assert tucker.parse_ranks(" VBMF ") == "vbmf"


def _cost(kernels, chosen, positions):
  """(MACs, weights) of ``kernels`` at ``chosen`` ranks; a factorization that is
  not cheaper in MACs is left out, as the method does."""
  total = np.zeros(2, np.int64)
  for path, kernel in kernels.items():
    where, r = positions[tucker.layer_name(path)], chosen.get(path)
    keep = r is not None and ranks.cheaper(kernel.shape, r, where)
    total += ranks.layer_cost(kernel.shape, r if keep else None, where)
  return total


def test_budgets_hold_and_unreachable_ones_name_the_option():
  model, params, x = _model("lenet5")
  positions = tucker.layer_positions(model, {"params": params}, x.shape[1:])
  assert positions["conv2"] == [144, 64] and positions["fc1"] == [1, 1]
  flat = sel.flatten(params)
  kernels = {p: flat[p] for p in ("conv2/kernel", "fc1/kernel", "fc2/kernel")}
  original = _cost(kernels, {}, positions)
  used = []
  for budget in ({"budget_macs": 0.4}, {"budget_params": 0.1},
                 {"budget_macs": 0.5, "budget_params": 0.3}):
    chosen = ranks.budget_ranks(kernels, {}, positions=positions, **budget)
    macs, weights = _cost(kernels, chosen, positions)
    assert macs <= budget.get("budget_macs", 1) * original[0]
    assert weights <= budget.get("budget_params", 1) * original[1]
    used.append(weights)
  assert used[1] < used[0]  # the tighter weight budget keeps fewer weights
  fixed = ranks.budget_ranks(kernels, {"fc1/kernel": (5, 5)}, budget_params=0.1)
  assert "fc1/kernel" not in fixed and set(fixed) == {"conv2/kernel", "fc2/kernel"}
  method = registry.build("tucker", list(kernels), positions=positions, budget_macs=0.001)
  with pytest.raises(ValueError, match="--budget-macs 0.001 is unreachable"):
    method.init(params)
  with pytest.raises(ValueError, match="--budget-macs needs the input and output positions"):
    registry.build("tucker", list(kernels), budget_macs=0.5).init(params)


def test_rank_multiple_rounds_chosen_ranks_up_but_not_given_pairs():
  model, params, x = _model("lenet5")
  positions = tucker.layer_positions(model, {"params": params}, x.shape[1:])
  flat = sel.flatten(params)
  kernels = {p: flat[p] for p in ("conv2/kernel", "fc1/kernel", "fc2/kernel")}
  original = _cost(kernels, {}, positions)
  chosen = ranks.budget_ranks(kernels, {}, positions=positions, budget_macs=0.3, multiple=8)
  for path, pair in chosen.items():  # each a multiple of 8 or its whole mode
    assert all(r % 8 == 0 or r == c for r, c in zip(pair, kernels[path].shape[-2:])), pair
  assert _cost(kernels, chosen, positions)[0] <= 0.3 * original[0]
  assert tucker.choose_ranks("fc2/kernel", flat["fc2/kernel"], 0.01, 0.9, 8) == (8, 8)
  assert tucker.choose_ranks("fc2/kernel", flat["fc2/kernel"], 0.9, 0.9, 8) == (456, 10)
  assert tucker.choose_ranks("fc2/kernel", flat["fc2/kernel"], {"fc2": (3, 2)}, 0.9, 8) == (3, 2)
  method = registry.build("tucker", ["conv2/kernel"], energy=0.5, rank_multiple=8)
  cstate = method.init(params)[1]
  assert [r % 8 for r in sel.flatten(cstate)["conv2/kernel/ranks"].tolist()] == [0, 0]
  with pytest.raises(ValueError, match="at the lowest ranks --rank-multiple 16 allows"):
    ranks.budget_ranks(kernels, {}, positions=positions, budget_macs=0.2, multiple=16)


def test_the_method_factorizes_within_the_budget():
  params = {"fc1": {"kernel": _rand((32, 24))}, "fc2": {"kernel": _rand((24, 16), 1)}}
  method = registry.build("tucker", ["fc1/kernel", "fc2/kernel"], budget_params=0.5)
  trainable, cstate = method.init(params)
  weights = sum(np.size(v) for v in jax.tree.leaves(trainable))
  assert weights <= 0.5 * (32 * 24 + 24 * 16) and set(cstate) <= {"fc1", "fc2"}
  np.testing.assert_array_equal(
      [sel.flatten(cstate)[f"{k}/kernel/ranks"].tolist() for k in sorted(cstate)],
      [list(v[0].shape) for _, v in sorted(tucker.factorized_layers(trainable).items())])


@pytest.mark.parametrize("options,match", [
    ({"budget_macs": 1.5}, "--budget-macs"), ({"budget_params": -0.1}, "--budget-params"),
    ({"budget_params": 0.5, "ranks": "evbmf"}, "--budget-params chooses the ranks"),
    ({"ranks": "vbmf2"}, "--ranks")])
def test_bad_rank_selection_options_raise(options, match):
  with pytest.raises(ValueError, match=match):
    registry.build("tucker", ["fc1/kernel"], **options)


def test_a_plan_saved_before_an_option_existed_equals_its_defaults():
  old = [{"method": "tucker", "options": {"energy": 0.7}, "paths": ["fc1/kernel"]}]
  new = [{"method": "tucker", "options": {"energy": 0.7, "rank_multiple": None},
          "paths": ["fc1/kernel"]}]
  assert old != new and registry.with_defaults(old) == registry.with_defaults(new)
  new[0]["options"]["rank_multiple"] = 8
  assert registry.with_defaults(old) != registry.with_defaults(new)
