"""jcompress.conv: the matmul input gradient equals XLA's; LeNet-5 is the same with either."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcompress import models
from jcompress.conv import conv_general_dilated
from jcompress.layers import IMPL_ENV

DN = ("NHWC", "HWIO", "NHWC")


def _assert_close(actual, expected, rtol=1e-5):
  expected = np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def _inputs(x_shape, kernel_shape):
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal(x_shape), jnp.float32),
          jnp.asarray(rng.standard_normal(kernel_shape), jnp.float32))


def _vjp_both(x, kernel, **kwargs):
  """(y, dx, dkernel) of jcompress's conv (impl "shifted") and of lax's, in one jit."""

  @jax.jit
  def run(x, kernel):
    out = []
    for conv in (lambda x, k: conv_general_dilated(x, k, **kwargs, impl="shifted"),
                 lambda x, k: jax.lax.conv_general_dilated(x, k, **kwargs)):
      y, vjp = jax.vjp(conv, x, kernel)
      out.append((y, *vjp(jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape))))
    return out

  return run(x, kernel)


def _uses_custom_gradient(x, kernel, **kwargs):
  jaxpr = jax.make_jaxpr(lambda x, k: conv_general_dilated(x, k, **kwargs, impl="shifted"))
  return "custom_vjp" in str(jaxpr(x, kernel))


@pytest.mark.parametrize("x_shape, kernel_shape, padding", [
    ((4, 12, 12, 20), (5, 5, 20, 50), "VALID"),  # LeNet-5's conv2
    ((3, 28, 28, 1), (5, 5, 1, 20), "VALID"),  # LeNet-5's conv1
    ((2, 9, 7, 3), (3, 3, 3, 8), "SAME"),
    ((2, 9, 7, 4), (3, 2, 4, 8), ((2, 0), (1, 3))),
])
def test_values_and_gradients_match_lax(x_shape, kernel_shape, padding):
  x, kernel = _inputs(x_shape, kernel_shape)
  kwargs = dict(window_strides=(1, 1), padding=padding, dimension_numbers=DN)
  assert _uses_custom_gradient(x, kernel, **kwargs)
  ours, ref = _vjp_both(x, kernel, **kwargs)
  for name, a, b in zip(("y", "dx", "dkernel"), ours, ref):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    _assert_close(a, b)


@pytest.mark.parametrize("x_shape, kernel_shape, kwargs", [
    ((2, 8, 8, 16), (3, 3, 16, 16), {}),  # does not double the channels: XLA's is faster
    ((2, 8, 8, 4), (3, 3, 4, 8), dict(window_strides=(2, 2))),
    ((2, 8, 8, 4), (3, 3, 4, 8), dict(rhs_dilation=(2, 2))),
    ((2, 8, 8, 4), (3, 3, 2, 8), dict(feature_group_count=2)),
    ((2, 4, 8, 8), (3, 3, 4, 8), dict(dimension_numbers=("NCHW", "HWIO", "NHWC"))),
])
def test_other_convs_are_lax(x_shape, kernel_shape, kwargs):
  x, kernel = _inputs(x_shape, kernel_shape)
  kwargs = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=DN) | kwargs
  assert not _uses_custom_gradient(x, kernel, **kwargs)
  np.testing.assert_array_equal(conv_general_dilated(x, kernel, **kwargs, impl="shifted"),
                                jax.lax.conv_general_dilated(x, kernel, **kwargs))


def test_vmap_of_grad_and_half_precision():
  x, kernel = _inputs((2, 6, 6, 3), (3, 3, 3, 8))
  kwargs = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=DN)

  def grads(impl, x, kernel):
    loss = lambda x, k: jnp.sum(jnp.sin(conv_general_dilated(x, k, **kwargs, impl=impl)))
    return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None)))(x, kernel)

  xs = jnp.stack([x, 2 * x + 1])
  for a, b in zip(grads("shifted", xs, kernel), grads("xla", xs, kernel)):
    _assert_close(a, b)
  half = grads("shifted", xs.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert [g.dtype for g in half] == [jnp.bfloat16] * 2


def test_lenet5_same_logits_and_gradients_with_either_impl(monkeypatch):
  model = models.create("lenet5", num_classes=10, input_shape=(28, 28, 1))
  x, _ = _inputs((8, 28, 28, 1), (1,))
  labels = jnp.arange(8) % 10
  variables = jax.jit(model.init)(jax.random.key(0), x)
  # Same parameter layout as plain nn.Conv layers, so checkpoints are interchangeable.
  assert jax.tree.map(jnp.shape, variables["params"]["conv2"]) == {
      "kernel": (5, 5, 20, 50), "bias": (50,)}

  def loss(params):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

  out = {}
  for impl in ("shifted", "xla"):  # resolved at trace time: one jit per setting
    monkeypatch.setenv(IMPL_ENV, impl)
    step = jax.value_and_grad(loss, has_aux=True)
    assert ("custom_vjp" in str(jax.make_jaxpr(step)(variables["params"]))) == (impl == "shifted")
    (_, logits), grads = jax.jit(step)(variables["params"])
    out[impl] = (logits, grads)
  _assert_close(out["shifted"][0], out["xla"][0])
  for a, b in zip(jax.tree.leaves(out["shifted"][1]), jax.tree.leaves(out["xla"][1])):
    _assert_close(a, b, rtol=1e-4)


DN3 = ("NDHWC", "DHWIO", "NDHWC")


def _conv_ranks(jaxpr):
  """The input rank of every convolution in ``jaxpr`` and the jaxprs it calls."""
  ranks = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      ranks.append(eqn.invars[0].aval.ndim)
    for value in eqn.params.values():
      inner = getattr(value, "jaxpr", value)
      if hasattr(inner, "eqns"):
        ranks += _conv_ranks(inner)
  return ranks


@pytest.mark.parametrize("x_shape, kernel_shape, kwargs", [
    ((2, 6, 12, 12, 1), (3, 5, 5, 1, 8), {}),  # c3d's conv1: taps stacked on the channels
    ((2, 4, 8, 8, 8), (3, 3, 3, 8, 16), {}),  # kt C_in > 16: one 2D conv per tap, summed
    ((2, 5, 7, 6, 3), (2, 3, 3, 3, 4), dict(padding="SAME", window_strides=(1, 2, 1))),
    ((2, 5, 7, 6, 9), (2, 3, 2, 9, 4), dict(padding=((1, 0), (1, 2), (0, 1)))),
])
def test_3d_convs_run_as_2d_with_lax_values_and_gradients(x_shape, kernel_shape, kwargs):
  x, kernel = _inputs(x_shape, kernel_shape)
  kwargs = dict(window_strides=(1, 1, 1), padding="VALID", dimension_numbers=DN3) | kwargs
  jaxpr = jax.make_jaxpr(lambda x, k: conv_general_dilated(x, k, **kwargs, impl="shifted"))(
      x, kernel)
  assert set(_conv_ranks(jaxpr.jaxpr)) == {4}
  ours, ref = _vjp_both(x, kernel, **kwargs)
  for name, a, b in zip(("y", "dx", "dkernel"), ours, ref):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    _assert_close(a, b, rtol=1e-4)
  strided = kwargs | dict(window_strides=(2, 1, 1))  # strided in time: XLA's 3D conv
  assert _conv_ranks(jax.make_jaxpr(lambda x, k: conv_general_dilated(
      x, k, **strided, impl="shifted"))(x, kernel).jaxpr) == [5]
  np.testing.assert_array_equal(conv_general_dilated(x, kernel, **strided, impl="shifted"),
                                jax.lax.conv_general_dilated(x, kernel, **strided))
