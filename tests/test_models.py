"""The model zoo: every registered model builds, runs and trains one step; the
shared blocks and the moving MNIST generator behave.

Initialisation is checked by tracing (``jax.eval_shape``): compiling the random
initialisers of the mobile nets takes minutes on 2 cores. The numeric checks run
on deterministic fake variables of the traced shapes.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jcompress import models
from jcompress.data.moving_mnist import make_moving_mnist
from jcompress.models import blocks

MNIST, CIFAR, VIDEO = (28, 28, 1), (32, 32, 3), (8, 32, 32, 1)
DATASET = {name: MNIST for name in models.names()}
DATASET.update({"c3d": VIDEO, "microbotnet": CIFAR, "mobilenetv2": CIFAR,
                "squeezenet": CIFAR, "dsc": CIFAR, "dsc-small": CIFAR, "dsc-large": CIFAR})
# Compiling forward + backward of these takes tens of seconds on 2 cores.
HEAVY = {"microbotnet", "mobilenetv2", "squeezenet", "dsc", "dsc-large"}
AUTO_NAME = re.compile(r"^[A-Z]\w*_\d+$")


def _batch(shape, n=2, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, *shape)), jnp.float32)


def _shapes(model, shape):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))


def _fake_variables(shapes):
  """Deterministic variables of the given shapes: small normal params, unit variance."""
  rng = np.random.default_rng(0)
  flat = traverse_util.flatten_dict(shapes)
  out = {}
  for path, s in flat.items():
    if path[0] == "batch_stats":
      value = np.ones(s.shape) if path[-1] == "var" else np.zeros(s.shape)
    else:
      value = rng.normal(scale=0.1, size=s.shape)
    out[path] = jnp.asarray(value, s.dtype)
  return traverse_util.unflatten_dict(out)


def test_registry_lists_every_family():
  assert {"fcn", "fcn-small", "fcn-large", "cnn", "lcn", "maxout", "maxout-small",
          "maxout-large", "dsc", "dsc-small", "dsc-large", "microbotnet", "mobilenetv2",
          "squeezenet", "c3d"} <= set(models.names())


def _distinct(names):
  """One registry name per distinct architecture (``fcn`` and ``fcn-small`` are one)."""
  out, seen = [], []
  for name in names:
    model = models.create(name, num_classes=10, input_shape=DATASET[name])
    if model not in seen:
      seen.append(model)
      out.append(name)
  return out


DISTINCT = _distinct(models.names())
# Every image model on MNIST and CIFAR shapes, the video model on clips.
BUILDS = [(name, shape) for name in DISTINCT
          for shape in ([VIDEO] if DATASET[name] == VIDEO else [MNIST, CIFAR])]


def test_presets_resolve_to_their_configs():
  assert models.create("fcn-large", num_classes=255, input_shape=(1000,)).width == 512
  assert models.create("fcn", num_classes=255, input_shape=(1000,)) == models.create(
      "fcn-small", num_classes=255, input_shape=(1000,))
  small = models.create("maxout-small", num_classes=10, input_shape=MNIST)
  assert (small.width, small.pieces, small.depth) == (250, 4, 4)
  assert models.create("dsc-large", num_classes=10, input_shape=CIFAR).size == "large"


@pytest.mark.parametrize("name,shape", BUILDS, ids=[f"{n}-{'x'.join(map(str, s))}"
                                                    for n, s in BUILDS])
def test_init_and_forward_trace_with_named_paths(name, shape):
  model = models.create(name, num_classes=7, input_shape=shape)
  out, shapes = jax.eval_shape(model.init_with_output, jax.random.key(0), _batch(shape, n=3))
  assert out.shape == (3, 7) and out.dtype == jnp.float32
  paths = traverse_util.flatten_dict(shapes["params"])
  assert paths
  for path in paths:
    assert not any(AUTO_NAME.match(part) for part in path), path


@pytest.mark.parametrize("name,shape", [
    ("c3d", MNIST), ("c3d", (4, 32, 32, 1)), ("cnn", VIDEO), ("microbotnet", (32, 32)),
    ("squeezenet", (4, 4, 3)), ("lenet5", (8, 8, 1))])
def test_shapes_that_do_not_fit_raise(name, shape):
  with pytest.raises(ValueError, match=name):
    models.create(name, num_classes=10, input_shape=shape)


@pytest.mark.parametrize("name,config,key", [
    ("fcn", {"width": 0}, "width"), ("maxout", {"pieces": 1.5}, "pieces"),
    ("dsc", {"size": "medium"}, "size"), ("microbotnet", {"width": -1.0}, "width"),
    ("squeezenet", {"dropout": 1.0}, "dropout")])
def test_bad_config_raises_naming_the_option(name, config, key):
  with pytest.raises(ValueError, match=key):
    models.create(name, num_classes=10, input_shape=DATASET[name], **config)


def _train_check(name):
  shape = DATASET[name]
  model = models.create(name, num_classes=10, input_shape=shape)
  variables = _fake_variables(_shapes(model, shape))
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  x, y = _batch(shape), jnp.array([1, 3])

  def loss_fn(params, state):
    logits, updates = model.apply({"params": params, **state}, x, train=True,
                                  rngs={"dropout": jax.random.key(1)},
                                  mutable=["batch_stats"])
    labels = jax.nn.one_hot(y, 10)
    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), -1)), updates

  @jax.jit
  def step(params, state):
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state)
    return loss, grads, updates, jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)

  loss, grads, updates, new_params = step(params, state)
  assert loss.shape == () and np.isfinite(float(loss))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads)) > 0
  assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(new_params))
  if "batch_stats" in state:
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state["batch_stats"],
                           updates["batch_stats"])
    assert all(jax.tree.leaves(changed))


def _one_per_family(names):
  """The first name of each model class (``fcn-large`` only widens ``fcn``)."""
  seen, out = set(), []
  for name in names:
    family = type(models.create(name, num_classes=10, input_shape=DATASET[name]))
    if family not in seen:
      seen.add(family)
      out.append(name)
  return out


@pytest.mark.parametrize("name", [n for n in _one_per_family(DISTINCT) if n not in HEAVY])
def test_one_sgd_step_is_finite_and_updates_batch_stats(name):
  _train_check(name)


@pytest.mark.parametrize("name", ["lenet5", "lcn", "maxout-small", "c3d"])
def test_jit_matches_eager(name):
  shape = DATASET[name]
  model = models.create(name, num_classes=10, input_shape=shape)
  variables = _fake_variables(_shapes(model, shape))
  x = _batch(shape)
  np.testing.assert_allclose(jax.jit(lambda v, x: model.apply(v, x))(variables, x),
                             model.apply(variables, x), rtol=1e-4, atol=1e-5)


def test_inverted_residual_with_se_trains_and_updates_batch_stats():
  block = blocks.InvertedResidual(16, 8, 3, 1, True, "hswish", residual_bn="lastBN")
  x = _batch((4, 4, 8))
  variables = _fake_variables(jax.eval_shape(block.init, jax.random.key(0), x))
  assert set(variables["params"]) == {"expand", "expand_bn", "dw", "dw_bn", "se", "project",
                                      "lastBN"}
  assert variables["params"]["dw"]["kernel"].shape == (3, 3, 1, 16)
  def train(v, x):
    return block.apply(v, x, train=True, mutable=["batch_stats"])

  y, updates = jax.jit(train)(variables, x)
  assert y.shape == x.shape
  assert bool(jnp.any(updates["batch_stats"]["lastBN"]["mean"] != 0))
  np.testing.assert_allclose(y, train(variables, x)[0], rtol=1e-5, atol=1e-6)


def test_zero_gamma_blocks_start_as_the_identity():
  block = blocks.InvertedResidual(8, 8, 3, 1, False, "relu", zero_gamma=True)
  x = _batch((3, 3, 8))
  variables, y = jax.jit(lambda x: block.init_with_output(jax.random.key(0), x)[::-1])(x)
  np.testing.assert_array_equal(variables["params"]["project_bn"]["scale"], 0)
  np.testing.assert_allclose(y, x, atol=1e-6)


def test_ensure_divisible_matches_the_reference_rule():
  assert [blocks.ensure_divisible(v * 0.32) for v in (16, 72, 24, 96, 40, 576)] == [
      8, 24, 8, 32, 16, 184]
  assert blocks.ensure_divisible(184 * 0.32) == 56  # the head: width applied twice
  assert blocks.ensure_divisible(3.0) == 8  # at least the divisor
  assert blocks.ensure_divisible(12.0) == 16  # 8 would lose more than 10%


def test_hard_activations():
  x = jnp.array([-4.0, -3.0, 0.0, 1.5, 3.0, 4.0])
  np.testing.assert_allclose(blocks.hard_sigmoid(x), [0, 0, 0.5, 0.75, 1, 1])
  np.testing.assert_allclose(blocks.hard_swish(x), x * np.array([0, 0, 0.5, 0.75, 1, 1]))


def test_squeeze_excite_scales_channels():
  se = blocks.SqueezeExcite()
  x = _batch((3, 3, 8))
  variables = _fake_variables(jax.eval_shape(se.init, jax.random.key(0), x))
  assert jax.tree.map(jnp.shape, variables["params"]) == {
      "fc1": {"kernel": (8, 2)}, "fc2": {"kernel": (2, 8)}}
  y = se.apply(variables, x)
  gate = y / x
  np.testing.assert_allclose(gate, jnp.broadcast_to(gate[:, :1, :1], gate.shape), rtol=1e-5)
  with pytest.raises(ValueError, match="reduction"):
    se.init(jax.random.key(0), _batch((3, 3, 6)))


def test_microbotnet_residual_blocks_end_in_last_bn():
  model = models.create("microbotnet", num_classes=10, input_shape=CIFAR)
  params = _shapes(model, CIFAR)["params"]
  residual = {name for name, block in params.items() if "lastBN" in block}
  # At x0.32 block4 keeps 16 channels too (40 and 48 both round to 16).
  assert residual == {"block3", "block4", "block5", "block7", "block8", "block9", "block10"}
  assert params["block1"]["expand"]["kernel"].shape == (1, 1, 8, 24)
  assert params["head_conv"]["kernel"].shape == (1, 1, 32, 56)
  assert params["feature_conv"]["kernel"].shape == (1, 1, 56, 1024)


def test_moving_mnist_is_deterministic_and_moves():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (50, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, 50)
  videos, out_labels = make_moving_mnist(images, labels)
  assert videos.shape == (50, 8, 32, 32, 1) and videos.dtype == np.uint8
  np.testing.assert_array_equal(out_labels, labels)
  again, _ = make_moving_mnist(images, labels)
  np.testing.assert_array_equal(again, videos)
  prefix, _ = make_moving_mnist(images[:10], labels[:10])
  np.testing.assert_array_equal(prefix, videos[:10])
  assert not np.array_equal(make_moving_mnist(images, labels, seed=1)[0], videos)
  # Every frame holds the whole digit (nonzero pixels) and the digit moves.
  assert (np.count_nonzero(videos, axis=(2, 3, 4)) == 784).all()
  assert (videos[:, 0] != videos[:, -1]).any(axis=(1, 2, 3)).all()
  first = videos[3, 0, :, :, 0]
  y, x = np.argwhere(first).min(axis=0)
  np.testing.assert_array_equal(first[y:y + 28, x:x + 28], images[3, :, :, 0])
  big, _ = make_moving_mnist(images[:2], labels[:2], frames=5, size=40)
  assert big.shape == (2, 5, 40, 40, 1)


@pytest.mark.parametrize("kwargs,match", [
    ({"size": 28}, "size"), ({"frames": 1}, "frames")])
def test_moving_mnist_rejects_bad_options(kwargs, match):
  images = np.zeros((2, 28, 28, 1), np.uint8)
  with pytest.raises(ValueError, match=match):
    make_moving_mnist(images, np.zeros(2), **kwargs)
  with pytest.raises(ValueError, match="uint8"):
    make_moving_mnist(images.astype(np.float32), np.zeros(2))
  with pytest.raises(ValueError, match="labels"):
    make_moving_mnist(images, np.zeros(3))


def test_c3d_fits_moving_mnist():
  images = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
  videos, _ = make_moving_mnist(images, np.array([0, 1]))
  model = models.create("c3d", num_classes=10, input_shape=videos.shape[1:])
  params = _shapes(model, videos.shape[1:])["params"]
  assert params["conv1"]["kernel"].shape == (3, 5, 5, 1, 16)
  assert params["fc1"]["kernel"].shape == (2 * 5 * 5 * 32, 128)
