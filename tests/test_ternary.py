import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcompress.train.optim import make_optimizer
from jcompress.transforms import base, registry, quantize, ternary
from jcompress.transforms import select as sel


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"fc1": {"kernel": rng.normal(size=(6, 5)).astype(np.float32),
                  "bias": np.zeros(5, np.float32)},
          "fc2": {"kernel": rng.normal(size=(5, 3)).astype(np.float32),
                  "bias": np.zeros(3, np.float32)}}


def test_ternary_values_and_threshold():
  w = jnp.array([[0.9, 0.02, -0.5], [0.3, -0.04, -1.0]])  # delta = 0.05 * 1.0
  out = ternary.ternarize(w, 1.5, 0.25, threshold=0.05)
  np.testing.assert_array_equal(out, [[1.5, 0.0, -0.25], [1.5, 0.0, -0.25]])
  np.testing.assert_array_equal(ternary.ternary_codes(w, 0.05), [[1, 0, -1], [1, 0, -1]])


def test_custom_gradients_follow_the_formula_and_finite_differences():
  w = jnp.asarray(_params()["fc1"]["kernel"])
  c = jnp.asarray(np.random.default_rng(1).normal(size=w.shape), jnp.float32)
  w_p, w_n, t = 1.3, 0.7, 0.3

  def loss(w, w_p, w_n):
    return jnp.sum(c * ternary.ternarize(w, w_p, w_n, threshold=t))

  g_w, g_wp, g_wn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(w, w_p, w_n)
  delta = t * np.abs(w).max()
  pos, neg = np.asarray(w) > delta, np.asarray(w) < -delta
  assert pos.any() and neg.any() and (~pos & ~neg).any()
  np.testing.assert_allclose(g_w, np.where(pos, w_p * c, np.where(neg, w_n * c, c)), rtol=1e-6)
  np.testing.assert_allclose(g_wp, np.asarray(c)[pos].sum(), rtol=1e-5)
  # True derivative: the negative set holds -w_n, so dL/dw_n = -sum(g) there.
  np.testing.assert_allclose(g_wn, -np.asarray(c)[neg].sum(), rtol=1e-5)
  eps = 1e-2  # the loss is linear in the scales: central differences are exact
  for grad, f in ((g_wp, lambda d: loss(w, w_p + d, w_n)), (g_wn, lambda d: loss(w, w_p, w_n + d))):
    np.testing.assert_allclose((f(eps) - f(-eps)) / (2 * eps), grad, rtol=1e-3)


def test_method_structure_values_and_jit():
  params = _params()
  m = registry.build("ttq", ["fc1/kernel"], threshold=0.1, scale_init="one")
  trainable, cstate = m.init(params)
  assert list(sel.flatten(trainable)) == ["fc1/kernel", "fc1/kernel_wp", "fc1/kernel_wn",
                                          "fc1/bias", "fc2/kernel", "fc2/bias"]
  assert trainable["fc1"]["kernel_wp"].shape == () and float(trainable["fc1"]["kernel_wn"]) == 1.0
  trainable["fc1"]["kernel_wp"], trainable["fc1"]["kernel_wn"] = jnp.float32(0.8), jnp.float32(0.6)
  out = m.apply(trainable, cstate)
  assert jax.tree.structure(out) == jax.tree.structure(params)
  assert set(np.unique(out["fc1"]["kernel"]).tolist()) == {np.float32(-0.6), 0.0, np.float32(0.8)}
  np.testing.assert_array_equal(out["fc2"]["kernel"], params["fc2"]["kernel"])
  jax.tree.map(np.testing.assert_array_equal, jax.jit(m.apply)(trainable, cstate), out)
  assert m.bits(trainable, cstate) == {"fc1/kernel": 2.0}
  assert registry.build("ttq", ["fc1/kernel"], packing="trit5").bits(trainable, cstate) == {
      "fc1/kernel": 1.6}


def test_scale_init_mean_is_the_default():
  w = np.array([[0.9, 0.02, -0.5], [0.3, -0.04, -1.0]], np.float32)
  trainable, _ = registry.build("ttq", ["k"]).init({"k": w})
  assert float(trainable["k_wp"]) == pytest.approx(0.6)
  assert float(trainable["k_wn"]) == pytest.approx(0.75)
  trainable, _ = registry.build("ttq", ["k"], scale_init="one").init({"k": w})
  assert float(trainable["k_wp"]) == float(trainable["k_wn"]) == 1.0
  with pytest.raises(ValueError, match="k has no weight below -delta.*--scale-init"):
    registry.build("ttq", ["k"], scale_init="mean").init({"k": np.abs(w)})


def _leaf_updates(m, trainable, base_tx):
  tx = m.optimizer(trainable, base_tx)
  grads = jax.tree.map(jnp.ones_like, trainable)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  return {p: float(np.asarray(u).reshape(-1)[0]) for p, u in sel.flatten(updates).items()}


def test_optimizer_groups_hold_exactly_the_selected_leaves():
  m = registry.build("ttq", ["fc1/kernel", "fc2/kernel"], latent_optimizer="sgd", latent_lr=0.1,
                 scale_lr=0.01)
  trainable, _ = m.init(_params())
  # Plain SGD steps: base -1.0 * g, latent -0.1 * g, Adam's first step -lr * sign(g).
  updates = _leaf_updates(m, trainable, optax.sgd(1.0))
  groups = {u: sorted(p for p in updates if updates[p] == pytest.approx(u, rel=1e-4))
            for u in (-1.0, -0.1, -0.01)}
  assert groups == {-1.0: ["fc1/bias", "fc2/bias"], -0.1: ["fc1/kernel", "fc2/kernel"],
                    -0.01: ["fc1/kernel_wn", "fc1/kernel_wp", "fc2/kernel_wn", "fc2/kernel_wp"]}
  m = registry.build("ttq", ["fc1/kernel"], latent_lr=None, scale_lr=None)
  trainable, _ = m.init(_params())
  assert set(_leaf_updates(m, trainable, optax.sgd(1.0)).values()) == {-1.0}


def test_fixed_scales_are_one_shared_untrained_scale():
  params = _params()
  m = registry.build("ttq", ["fc1/kernel"], scales="fixed")
  trainable, cstate = m.init(params)
  w = params["fc1"]["kernel"]
  beyond = np.abs(w) > 0.05 * np.abs(w).max()
  assert float(trainable["fc1"]["kernel_wp"]) == float(trainable["fc1"]["kernel_wn"]) == \
      pytest.approx(np.abs(w[beyond]).mean(), rel=1e-6)
  kernel = np.abs(np.asarray(m.apply(trainable, cstate)["fc1"]["kernel"]))
  assert {float(v) for v in kernel.flat} == {0.0, float(trainable["fc1"]["kernel_wp"])}
  updates = _leaf_updates(m, trainable, optax.sgd(1.0))
  assert updates["fc1/kernel_wp"] == updates["fc1/kernel_wn"] == 0.0
  assert updates["fc1/kernel"] != 0.0


def test_optimizer_wraps_the_project_optimizer():
  m = registry.build("ttq", ["fc1/kernel"])
  trainable, _ = m.init(_params())
  base_tx = make_optimizer("sgd", optax.constant_schedule(0.1), weight_decay=1e-4)
  updates = _leaf_updates(m, trainable, base_tx)
  assert updates["fc1/kernel_wp"] == pytest.approx(-1e-4, rel=1e-4)  # Adam, --scale-lr 1e-4
  assert updates["fc1/kernel"] == pytest.approx(-1e-4, rel=1e-4)  # Adam, --latent-lr 1e-4
  assert updates["fc1/bias"] == pytest.approx(-0.1, rel=1e-4)  # the base SGD


@pytest.mark.parametrize("options, message", [
    (dict(threshold=0.0), r"--threshold must be in \(0, 1\), got 0.0"),
    (dict(threshold=1.0), r"--threshold must be in \(0, 1\), got 1.0"),
    (dict(threshold=-0.1), r"--threshold must be in \(0, 1\)"),
    (dict(scale_init="median"), "--scale-init must be one of one, mean"),
    (dict(latent_lr=-1.0), "--latent-lr must be in \\(0, inf\\)"),
    (dict(scale_optimizer="rmsprop"), "--scale-optimizer must be one of adam, sgd"),
    (dict(packing="3bit"), "--packing must be one of 2bit, trit5"),
    (dict(scales="tied"), "--scales must be one of learned, fixed"),
])
def test_bad_options_name_the_option(options, message):
  with pytest.raises(ValueError, match=message):
    registry.build("ttq", ["fc1/kernel"], **options)


def test_bad_paths():
  with pytest.raises(ValueError, match="fc9/kernel"):
    registry.build("ttq", ["fc9/kernel"]).init(_params())
  params = _params()
  params["fc1"]["kernel_wp"] = np.zeros(())
  with pytest.raises(ValueError, match="already has parameters named fc1/kernel_wp"):
    registry.build("ttq", ["fc1/kernel"]).init(params)


def test_stats_counts_and_totals():
  m = registry.build("ttq", ["a", "b"], threshold=0.5, scale_init="one")
  trainable, cstate = m.init({"a": np.array([1.0, 0.2, -0.6, -1.0], np.float32),
                              "b": np.array([[0.0, 2.0]], np.float32)})
  rows, total = ternary.ternary_stats(trainable, cstate)
  assert [(r["path"], r["positive"], r["zero"], r["negative"]) for r in rows] == [
      ("a", 1, 1, 2), ("b", 1, 1, 0)]
  assert rows[0]["delta"] == pytest.approx(0.5) and rows[1]["sparsity"] == 0.5
  assert rows[0]["w_p"] == rows[0]["w_n"] == 1.0
  assert total == {"path": "total", "size": 6, "positive": 2, "zero": 2, "negative": 2,
                   "sparsity": pytest.approx(1 / 3)}


@pytest.mark.parametrize("packing, codes_bytes", [("2bit", 8), ("trit5", 6)])
def test_export_import_bit_identical(packing, codes_bytes):
  m = registry.build("ttq", ["fc1/kernel", "fc2/kernel"], scale_init="mean", packing=packing)
  trainable, cstate = m.init(_params())
  exported = ternary.export_arrays(trainable, cstate, packing=packing)
  payload, meta = exported["fc1/kernel"]
  assert meta["layout"] == {"trits": [0, codes_bytes], "scales": [codes_bytes, 8]}
  assert len(payload) == codes_bytes + 8  # 30 weights, then w_p and w_n as float32
  applied = sel.flatten(jax.jit(m.apply)(trainable, cstate))
  for path, kernel in ternary.import_arrays(exported).items():
    assert np.asarray(kernel).tobytes() == np.asarray(applied[path]).tobytes()


def test_training_steps_reduce_the_loss():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="fc2")(nn.relu(nn.Dense(16, name="fc1")(x)))

  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 8)).astype(np.float32)
  y = np.argmax(x[:, :3] + 0.5 * x[:, 3:6], axis=1)
  params = {"fc1": {"kernel": (rng.normal(size=(8, 16)) / 3).astype(np.float32),
                    "bias": np.zeros(16, np.float32)},
            "fc2": {"kernel": (rng.normal(size=(16, 3)) / 4).astype(np.float32),
                    "bias": np.zeros(3, np.float32)}}
  m = registry.build("ttq", ["fc1/kernel", "fc2/kernel"], latent_lr=0.02, scale_lr=0.02)
  trainable, cstate = m.init(params)
  start = float(trainable["fc1"]["kernel_wp"])
  tx = m.optimizer(trainable, optax.adam(0.02))

  def loss(trainable):
    logits = Net().apply({"params": m.apply(trainable, cstate)}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(trainable, opt_state):
    value, grads = jax.value_and_grad(loss)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, value

  opt_state = tx.init(trainable)
  losses = []
  for _ in range(40):
    trainable, opt_state, value = step(trainable, opt_state)
    losses.append(float(value))
  assert losses[-1] < 0.7 * losses[0]
  assert float(trainable["fc1"]["kernel_wp"]) != start  # the scales learned too


def test_stacks_with_quantize():
  m = base.stack([registry.build("ttq", ["fc1/kernel"]), quantize.quantize_method(["fc2/kernel"])])
  params = _params()
  trainable, cstate = m.init(params)
  out = jax.jit(m.apply)(trainable, cstate)
  assert jax.tree.structure(out) == jax.tree.structure(params)
  assert len(np.unique(out["fc1"]["kernel"])) == 3 and len(np.unique(out["fc2"]["kernel"])) > 3
  updates = _leaf_updates(m, trainable, optax.sgd(1.0))
  assert updates["fc2/kernel"] == 0.0 and updates["fc2/bias"] == -1.0
  assert updates["fc1/kernel_wp"] == pytest.approx(-1e-4, rel=1e-4)
  assert m.bits(trainable, cstate) == {"fc1/kernel": 2.0, "fc2/kernel": 8.0}
