import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcompress.transforms import base, registry, prune
from jcompress.transforms import select as sel


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"conv1": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32),
                    "bias": jnp.asarray(rng.standard_normal(4), jnp.float32)},
          "fc1": {"kernel": jnp.asarray(rng.standard_normal((7, 5)), jnp.float32),
                  "bias": jnp.zeros(5)},
          "fc10": {"kernel": jnp.asarray(3 * rng.standard_normal((5, 3)), jnp.float32)}}


PATHS = ["conv1/kernel", "fc1/kernel", "fc10/kernel"]


def _nonzero(tree):
  return {p: int(np.count_nonzero(v)) for p, v in sel.flatten(tree).items()}


def test_parse_sparsity_rules_match_leading_components():
  assert prune.parse_sparsity("0.5", PATHS) == dict.fromkeys(PATHS, 0.5)
  assert prune.parse_sparsity("fc1=0.9,conv.*=0.3,0.1", PATHS) == {
      "conv1/kernel": 0.3, "fc1/kernel": 0.9, "fc10/kernel": 0.1}
  assert prune.parse_sparsity("fc1/kernel=0.2,fc.*=0.4,0.6", PATHS) == {
      "conv1/kernel": 0.6, "fc1/kernel": 0.2, "fc10/kernel": 0.4}


@pytest.mark.parametrize("spec, message", [
    ("-0.1", r"--sparsity: must be in \[0, 1\), got '-0.1'"),
    ("1", r"--sparsity: must be in \[0, 1\), got '1'"),
    ("nan", r"--sparsity: must be in \[0, 1\)"),
    ("lots", "--sparsity: 'lots' is not a number"),
    ("fc1=high,0.5", "--sparsity rule 'fc1=high': 'high' is not a number"),
    ("conv9=0.5,0.1", "--sparsity rule 'conv9=0.5' matches none of the selected paths: "
                      "conv1/kernel, fc1/kernel, fc10/kernel"),
    ("fc1=0.5", "--sparsity 'fc1=0.5' gives no sparsity for 'conv1/kernel'"),
    ("0.1,0.2", "two default values"),
])
def test_bad_sparsity(spec, message):
  with pytest.raises(ValueError, match=message):
    registry.build("prune", PATHS, sparsity=spec)


@pytest.mark.parametrize("options, message", [
    ({"scope": "net"}, "--scope must be one of layer, global, got 'net'"),
    ({"structure": "l3"}, "--structure.*expected none, l1, l2 or N:M"),
    ({"prune_schedule": "cubic"}, "--prune-schedule must be one of oneshot, iterative, gradual"),
    ({"scope": "global", "sparsity": "fc1=0.5,0.2"}, "--scope global takes one --sparsity value"),
    ({"scope": "global", "structure": "l1"}, "--structure l1 prunes channels per layer"),
    ({"prune_schedule": "gradual", "ramp_steps": 250},
     r"--ramp-steps \(250\) must be a multiple of --interval \(100\)"),
    ({"prune_schedule": "gradual", "initial_sparsity": 0.95},
     "--initial-sparsity 0.95 exceeds the --sparsity 0.9 of 'conv1/kernel'"),
    ({"interval": 0}, "--interval must be in \\[1, inf\\), got 0"),
    ({"bogus": 1}, "--method prune takes no option bogus"),
])
def test_bad_options(options, message):
  with pytest.raises(ValueError, match=message):
    registry.build("prune", PATHS, **options)


def test_unknown_path_and_mismatched_masks_name_the_path():
  with pytest.raises(ValueError, match="'fc2/kernel' is not a parameter path"):
    registry.build("prune", ["fc2/kernel"]).init(_params())
  method = registry.build("prune", PATHS)
  trainable, cstate = method.init(_params())
  cstate["masks"]["fc1"]["kernel"] = jnp.ones((5, 7), bool)
  for fn in (method.apply, lambda t, c: method.update(t, c, 1), prune.sparsity_report):
    with pytest.raises(ValueError, match=r"mask for 'fc1/kernel' has shape \(5, 7\), the "
                                         r"parameter \(7, 5\)"):
      fn(trainable, cstate)


@pytest.mark.parametrize("sparsity", [0.0, 0.34, 0.5, 0.92])
def test_exact_sparsity_per_layer(sparsity):
  params = _params()
  trainable, cstate = registry.build("prune", PATHS, sparsity=str(sparsity)).init(params)
  for path, w in sel.flatten(params).items():
    kept = sel.flatten(trainable)[path]
    if path not in PATHS:
      assert kept is w
      continue
    assert _nonzero(cstate["masks"])[path] == w.size - round(sparsity * w.size)
    assert np.count_nonzero(kept) == w.size - round(sparsity * w.size)
    assert kept.dtype == w.dtype and kept.shape == w.shape
    pruned, live = np.abs(w)[np.asarray(kept) == 0], np.abs(w)[np.asarray(kept) != 0]
    assert pruned.size == 0 or live.size == 0 or pruned.max() <= live.min()
    np.testing.assert_array_equal(kept[kept != 0], w[kept != 0])


def test_per_layer_rules_and_ties_broken_by_index():
  params = {"a": {"kernel": jnp.ones((4, 5))}, "b": {"kernel": jnp.ones((10, 2))}}
  _, cstate = registry.build("prune", ["a/kernel", "b/kernel"], sparsity="a=0.34,b=0.5").init(params)
  masks = sel.flatten(cstate["masks"])
  assert masks["a/kernel"].ravel().tolist() == [False] * 7 + [True] * 13  # round(6.8)
  assert masks["b/kernel"].ravel().tolist() == [False] * 10 + [True] * 10


def test_global_scope_one_threshold():
  params = _params()
  trainable, cstate = registry.build("prune", PATHS, sparsity="0.6", scope="global").init(params)
  total = sum(params[k]["kernel"].size for k in ("conv1", "fc1", "fc10"))
  report = prune.sparsity_report(trainable, cstate)
  assert report["global"]["nonzero"] == total - round(0.6 * total)
  assert report["layers"]["fc10/kernel"]["sparsity"] < 0.6  # 3x larger weights
  weights = np.concatenate([np.abs(sel.flatten(params)[p]).ravel() for p in PATHS])
  kept = np.concatenate([np.asarray(sel.flatten(cstate["masks"])[p]).ravel() for p in PATHS])
  assert weights[~kept].max() <= weights[kept].min()


@pytest.mark.parametrize("structure, norm", [
    ("l1", lambda w: np.abs(w).sum(tuple(range(w.ndim - 1)))),
    ("l2", lambda w: np.sqrt((w ** 2).sum(tuple(range(w.ndim - 1)))))])
def test_structured_removes_whole_channels(structure, norm):
  params = _params()
  trainable, cstate = registry.build("prune", ["conv1/kernel", "fc1/kernel"], sparsity="0.5",
                                 structure=structure).init(params)
  for layer, n_pruned in (("conv1", 2), ("fc1", 2)):  # round(0.5 * 4), round(0.5 * 5)
    w, kept = np.asarray(params[layer]["kernel"]), np.asarray(trainable[layer]["kernel"])
    dead = np.argsort(norm(w), kind="stable")[:n_pruned]
    live = np.setdiff1d(np.arange(w.shape[-1]), dead)
    assert not kept[..., dead].any()
    np.testing.assert_array_equal(kept[..., live], w[..., live])
    assert not np.asarray(trainable[layer]["bias"])[dead].any()
    np.testing.assert_array_equal(trainable[layer]["bias"][live], params[layer]["bias"][live])
  assert set(sel.flatten(cstate["masks"])) == {"conv1/kernel", "conv1/bias", "fc1/kernel",
                                               "fc1/bias"}


def test_schedule_matches_zhu_gupta_formula():
  s_f, s_i, t0, dt, n = 0.9, 0.1, 20, 10, 5
  points = prune.schedule("gradual", s_f, initial=s_i, begin_step=t0, interval=dt, ramp_steps=n * dt)
  assert [t for t, _ in points] == [20, 30, 40, 50, 60, 70]
  for t, s in points:
    assert s == pytest.approx(s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3, abs=1e-12)
  assert points[-1][1] == s_f
  assert prune.schedule("iterative", 0.8, begin_step=5, interval=3, iterations=4) == [
      (5, 0.2), (8, 0.4), (11, 0.6000000000000001), (14, 0.8)]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gradual_masks_follow_schedule_and_freeze(scope):
  t0, dt, n = 3, 2, 4
  method = registry.build("prune", ["fc1/kernel", "fc10/kernel"], sparsity="0.8", scope=scope,
                      prune_schedule="gradual", begin_step=t0, interval=dt, ramp_steps=n * dt,
                      initial_sparsity=0.2)
  trainable, cstate = method.init(_params())
  assert prune.sparsity_report(trainable, cstate)["global"]["sparsity"] == 0
  update = jax.jit(method.update)
  expected = dict(prune.schedule("gradual", 0.8, initial=0.2, begin_step=t0, interval=dt,
                                 ramp_steps=n * dt))
  size, current, previous = 35 + 15, 0, cstate["masks"]
  for step in range(1, 16):
    trainable, cstate = update(trainable, cstate, jnp.int32(step))
    current = expected.get(step, current)
    report = prune.sparsity_report(trainable, cstate)
    if scope == "layer":
      for path, info in report["layers"].items():
        assert info["size"] - info["nonzero"] == round(current * info["size"]), (step, path)
    else:
      assert size - report["global"]["nonzero"] == round(current * size), step
    revived = jax.tree.map(lambda new, old: bool((new & ~old).any()), cstate["masks"], previous)
    assert not any(jax.tree.leaves(revived))
    previous = cstate["masks"]
  assert current == 0.8



def test_held_schedule_does_not_restart():
  """A gradual step done by a source run (compress --from) keeps its final masks in
  the next run, whose step counter starts at 0 again: no recount, no revival."""
  method = registry.build("prune", ["fc1/kernel"], sparsity="0.8", prune_schedule="gradual",
                      interval=2, ramp_steps=4)
  trainable, cstate = method.init(_params())
  for step in range(1, 6):
    trainable, cstate = method.update(trainable, cstate, jnp.int32(step))
  final = np.asarray(cstate["masks"]["fc1"]["kernel"])
  assert final.sum() == 35 - round(0.8 * 35)
  later = base.stack([method, registry.build("quantize", ["fc1/kernel"], bits=4)], held=1)
  t, c = trainable, {"0": cstate, "1": later.init(trainable)[1]["1"]}
  for step in range(1, 6):  # the new run's steps 2 and 4 were mask updates of the first
    t, c = later.update(t, c, jnp.int32(step))
  np.testing.assert_array_equal(c["0"]["masks"]["fc1"]["kernel"], final)
  # The unheld method at those steps would recount (fewer pruned at step 2), but a
  # pruned weight still stays pruned.
  _, c = method.update(trainable, cstate, jnp.int32(2))
  np.testing.assert_array_equal(c["masks"]["fc1"]["kernel"], final)

def test_iterative_equal_steps():
  method = registry.build("prune", ["fc1/kernel"], sparsity="0.6", prune_schedule="iterative",
                      iterations=3, interval=4)
  trainable, cstate = method.init(_params())
  seen = [prune.sparsity_report(trainable, cstate)["global"]["nonzero"]]
  update = jax.jit(method.update)
  for step in range(1, 13):
    trainable, cstate = update(trainable, cstate, step)
    seen.append(prune.sparsity_report(trainable, cstate)["global"]["nonzero"])
  # round(35 * 0.2) = 7 pruned at step 0, 14 at step 4, 21 from step 8 on.
  assert seen == [28] * 4 + [21] * 4 + [14] * 5


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="fc2")(nn.relu(nn.Dense(16, name="fc1")(x)))


@pytest.mark.parametrize("schedule", ["oneshot", "gradual"])
def test_retraining_never_revives_pruned_weights(schedule):
  """Adam + L2 weight decay: momentum from before a mask update would move the
  newly pruned weights without the masked optimizer; update() alone would hide it."""
  model = _MLP()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 32))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]  # no threefry compiles
  params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) / 3, jnp.float32),
                        shapes)
  method = registry.build("prune", ["fc1/kernel", "fc2/kernel"], sparsity="0.75",
                      prune_schedule=schedule, interval=3, ramp_steps=6, begin_step=2)
  trainable, cstate = method.init(params)
  tx = method.optimizer(trainable, optax.chain(optax.add_decayed_weights(1e-2), optax.adam(0.05)))
  opt_state = tx.init(trainable)

  @jax.jit
  def loss(t, c):
    logits = model.apply({"params": method.apply(t, c)}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(t, c, o):
    updates, o = tx.update(jax.grad(loss)(t, c), o, t)
    return optax.apply_updates(t, updates), c, o

  start = loss(trainable, cstate)
  for i in range(1, 12):
    before = trainable
    trainable, cstate, opt_state = step(trainable, cstate, opt_state)
    for path, m in sel.flatten(cstate["masks"]).items():  # the optimizer alone kept them at 0
      assert not np.asarray(sel.flatten(trainable)[path])[~np.asarray(m)].any(), (i, path)
    trainable, cstate = jax.jit(method.update)(trainable, cstate, jnp.int32(i))
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                     jax.tree.leaves(trainable))]
    assert all(moved)
  report = prune.sparsity_report(trainable, cstate)
  assert report["global"]["nonzero"] == (128 + 48) - round(0.75 * 128) - round(0.75 * 48)
  assert loss(trainable, cstate) < start


def test_pruned_weights_get_zero_gradient():
  method = registry.build("prune", PATHS, sparsity="0.5")
  trainable, cstate = method.init(_params())
  grads = jax.jit(jax.grad(lambda t: sum(jnp.sum(v ** 2 + 1) for v in
                                 jax.tree.leaves(method.apply(t, cstate)))))(trainable)
  for path, m in sel.flatten(cstate["masks"]).items():
    assert not np.asarray(sel.flatten(grads)[path])[~np.asarray(m)].any()


def test_jit_equals_eager():
  method = registry.build("prune", PATHS, sparsity="0.7", prune_schedule="iterative",
                      iterations=2, interval=1, structure="l2")
  params = _params()
  eager, jitted = method.init(params), jax.jit(method.init)(params)
  assert jax.tree.all(jax.tree.map(np.array_equal, eager, jitted))
  trainable, cstate = eager
  perturbed = jax.tree.map(lambda w: w * 1.5 - 0.1, trainable)
  for fn in (method.apply, lambda t, c: method.update(t, c, 1)):
    assert jax.tree.all(jax.tree.map(np.array_equal, fn(perturbed, cstate),
                                     jax.jit(fn)(perturbed, cstate)))


@pytest.mark.parametrize("sparsity, fmt", [
    (0.0, "dense"), (0.3, "bitmask"), (0.95, "relative"), (0.999, "relative"), (0.9999, "bitmask")])
def test_export_round_trip_exact_and_compact(sparsity, fmt):
  shape = (40, 30)
  w = jnp.asarray(np.random.default_rng(3).standard_normal(shape), jnp.float32)
  method = registry.build("prune", ["net/kernel"], sparsity=str(sparsity))
  trainable, cstate = method.init({"net": {"kernel": w}})
  exported = prune.export_arrays(trainable, cstate)
  payload, meta = exported["net/kernel"]
  assert meta["format"] == fmt and meta["shape"] == list(shape)
  kept = w.size - round(sparsity * w.size)
  assert meta["kept"] == kept
  assert len(payload) <= min(4 * w.size, -(-w.size // 8) + 4 * kept)
  back = prune.import_arrays(exported)["net/kernel"]
  forward = np.asarray(method.apply(trainable, cstate)["net"]["kernel"])
  assert back.dtype == np.float32 and back.tobytes() == forward.tobytes()


def test_relative_indices_use_fillers_for_long_gaps():
  w = np.zeros(5000, np.float32)
  w[[0, 1, 3000, 4999]] = [1.0, -2.0, 3.0, 4.0]
  cstate = {"masks": {"w": jnp.asarray(w != 0)}}
  (payload, meta), = prune.export_arrays({"w": jnp.asarray(w)}, cstate).values()
  assert meta["format"] == "relative" and meta["entries"] >= 4
  assert len(payload) < 5000 // 8
  assert prune.import_arrays({"w": (payload, meta)})["w"].tobytes() == w.tobytes()


def test_sparsity_report_counts():
  params = {"a": {"kernel": jnp.array([[0.0, 1.0], [2.0, 3.0]])}}
  cstate = {"masks": {"a": {"kernel": jnp.array([[True, True], [False, True]])}}}
  assert prune.sparsity_report(params, cstate) == {
      "layers": {"a/kernel": {"size": 4, "nonzero": 2, "sparsity": 0.5}},
      "global": {"size": 4, "nonzero": 2, "sparsity": 0.5}}


def test_options_fit_the_compress_command():
  from jcompress import cli
  args = cli.parser().parse_args([
      "compress", "--from", "a", "--workdir", "b", "--method", "prune", "--sparsity", "fc1=0.9,0.5",
      "--prune-schedule", "gradual", "--ramp-steps", "40", "--interval", "10", "--schedule", "cosine"])
  given = cli.method_option_values(args)
  assert (given["sparsity"], given["prune-schedule"], given["ramp-steps"], args.schedule) == (
      "fc1=0.9,0.5", "gradual", "40", "cosine")


def _groups(mask):
  """Kept counts per group of 4 consecutive inputs (axis -2) of a kernel mask."""
  m = np.moveaxis(np.asarray(mask), -2, -1)
  return m.reshape(m.shape[:-1] + (m.shape[-1] // 4, 4)).sum(-1)


@pytest.mark.parametrize("shape", [(16, 8), (3, 3, 8, 4)])
@pytest.mark.parametrize("nm,kept", [("2:4", 2), ("1:4", 1)])
def test_n_of_m_keeps_the_largest_of_every_group(shape, nm, kept):
  w = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  m = registry.build("prune", ["w"], structure=nm)
  trainable, cstate = m.init({"w": w})
  mask = np.asarray(cstate["masks"]["w"])
  assert np.all(_groups(mask) == kept)
  groups = np.moveaxis(np.abs(np.asarray(w)), -2, -1)
  groups = groups.reshape(groups.shape[:-1] + (-1, 4))
  top = np.sort(groups, -1)[..., -kept:]
  g_mask = np.moveaxis(mask, -2, -1).reshape(groups.shape)
  np.testing.assert_array_equal(np.sort(np.where(g_mask, groups, -1), -1)[..., -kept:], top)
  assert np.all(np.asarray(trainable["w"])[~mask] == 0)


def test_n_of_m_pattern_holds_after_every_gradual_update():
  w = jnp.asarray(np.random.default_rng(1).normal(size=(32, 6)), jnp.float32)
  m = registry.build("prune", ["w"], structure="2:4", prune_schedule="gradual", interval=2,
                     ramp_steps=8)
  trainable, cstate = m.init({"w": w})
  previous = np.asarray(cstate["masks"]["w"])
  for step in range(1, 13):
    trainable = {"w": trainable["w"] + 0.01}  # an optimizer step
    trainable, cstate = m.update(trainable, cstate, step)
    mask = np.asarray(cstate["masks"]["w"])
    pruned = 4 - _groups(mask)
    assert np.all(pruned == pruned.flat[0]) and pruned.flat[0] <= 2  # every group alike
    assert np.all(mask <= previous)  # masks only tighten
    assert np.all(np.asarray(trainable["w"])[~mask] == 0)
    previous = mask
  assert np.all(_groups(previous) == 2)


def test_n_of_m_options_are_checked():
  with pytest.raises(ValueError, match="use --scope layer"):
    registry.build("prune", ["w"], structure="2:4", scope="global")
  with pytest.raises(ValueError, match=r"--structure.*0 < N < M"):
    registry.build("prune", ["w"], structure="4:2")
  m = registry.build("prune", ["w"], structure="2:4")
  with pytest.raises(ValueError, match="'w' has 6 inputs, not a multiple of 4"):
    m.init({"w": jnp.ones((6, 3))})
