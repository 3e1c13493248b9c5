"""``--dtype bfloat16``: float32 params, optimizer state and statistics, bfloat16
compute; losses within 1e-2 of float32 after 20 steps, straight-through gradients
(TTQ's custom_vjp) float32 (test_tensorboard: a compress run records its dtype)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcompress import models
from jcompress.transforms import base, registry
from jcompress.train.step import init_state, stand_in_state, train_step


def _state(model, shape, tx, method, stand_in):
  if not stand_in:
    return init_state(model, tx, shape, 0, method)
  # Compiling the random initialisation of the larger models takes most of a minute on
  # a CPU: stand-in variables (stand_in_state) with numpy-random kernels instead.
  rng = np.random.default_rng(1)
  state = stand_in_state(model, shape)
  params = jax.tree.map(lambda x: jnp.asarray(
      rng.normal(size=x.shape) / np.sqrt(np.prod(x.shape[:-1])) if x.ndim > 1 else x,
      jnp.float32), state.params)
  return state.replace(params=params, opt_state=tx.init(params),
                       batch_stats=jax.tree.map(jnp.asarray, state.batch_stats),
                       step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0))


def _losses(name, shape, dtype, method_name=None, steps=20, stand_in=False, **config):
  model = models.create(name, num_classes=10, input_shape=shape, **config)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(8, *shape)).astype(np.float32),
           "label": rng.integers(0, 10, 8)}
  tx, method = optax.sgd(0.01, momentum=0.9), base.IDENTITY
  if method_name:
    paths = ["conv1/kernel", "fc1/kernel"]
    method = registry.build(method_name, paths, **registry.check_options(method_name, {}))
  state = _state(model, shape, tx, method, stand_in)
  step = jax.jit(functools.partial(train_step, model=model, method=method, dtype=dtype,
                                   tx=method.optimizer(state.params, tx)))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, state


@pytest.mark.parametrize("name, shape, config, method", [
    # LeNet-5, its conv1 and fc1 ternary: custom_vjp straight-through under bfloat16
    ("lenet5", (28, 28, 1), {}, "ttq"),
    ("fcn", (28, 28, 1), {"width": 32}, None),  # batch norm after every hidden layer
    pytest.param("microbotnet", (16, 16, 3), {"width": 0.16, "stand_in": True}, None,
                 marks=pytest.mark.heavy),  # BN, depthwise, SE, hard-swish: ~1 min to compile
])
def test_bfloat16_losses_follow_float32(name, shape, config, method):
  full, _ = _losses(name, shape, "float32", method, **config)
  mixed, state = _losses(name, shape, "bfloat16", method, **config)
  assert full[-1] < full[0]  # it learns
  assert abs(mixed[-1] - full[-1]) < 1e-2, (full[-1], mixed[-1])
  assert mixed != full  # the compute did change
  floats = [x for x in jax.tree.leaves((state.params, state.opt_state, state.batch_stats,
                                        state.cstate)) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)


def test_straight_through_cotangents_are_float32():
  """The grads through TTQ's custom_vjp under bfloat16 compute: float32, finite."""
  model = models.create("lenet5", num_classes=10, input_shape=(28, 28, 1))
  method = registry.build("ttq", ["fc1/kernel"], **registry.check_options("ttq", {}))
  state = init_state(model, optax.sgd(0.1), (28, 28, 1), 0, method)
  image = jnp.ones((2, 28, 28, 1), jnp.bfloat16)

  def loss(params):
    applied = jax.tree.map(lambda x: x.astype(jnp.bfloat16), method.apply(params, state.cstate))
    return model.apply({"params": applied}, image).astype(jnp.float32).sum()

  grads = jax.jit(jax.grad(loss))(state.params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert g.dtype == jnp.float32, path
    assert bool(jnp.all(jnp.isfinite(g))), path
  assert float(jnp.abs(grads["fc1"]["kernel_wp"])) > 0  # the scales learn
