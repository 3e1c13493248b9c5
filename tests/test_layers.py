"""jcompress.layers: the shifted depthwise / grouped conv and the reshaped max pool equal
XLA's / flax's, values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress.layers import (IMPL_ENV, DepthwiseConv, depthwise_conv, grouped_conv, max_pool,
                              resolve_impl)


def _assert_close(actual, expected, rtol=1e-5):
  expected = np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def _vjp_both(conv, x, kernel):
  """(y, dx, dkernel) of ``conv(x, kernel, impl)`` for impl 'xla' and 'shifted', in one jit."""

  @jax.jit
  def run(x, kernel):
    out = {}
    for impl in ("xla", "shifted"):
      y, vjp = jax.vjp(lambda x, k, impl=impl: conv(x, k, impl), x, kernel)
      cotangent = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
      out[impl] = (y, *vjp(cotangent))
    return out

  return run(x, kernel)


def _inputs(n, hw, c, kernel_shape):
  # numpy, not jax.random: compiling a sampler per shape costs seconds.
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal((n, *hw, c)), jnp.float32),
          jnp.asarray(rng.standard_normal(kernel_shape), jnp.float32))


@pytest.mark.parametrize("n, hw, kernel, strides, padding", [
    (3, (7, 7), (3, 3), (1, 1), "SAME"),
    (11, (8, 8), (3, 3), (2, 2), "SAME"),
    (16, (7, 7), (5, 5), (2, 2), "SAME"),
    (2, (8, 6), (5, 5), (1, 1), "SAME"),
    (3, (7, 8), (3, 3), (2, 2), "VALID"),
    (2, (5, 9), (2, 3), (3, 1), ((2, 0), (1, 3))),
])
def test_depthwise_values_and_gradients_match_xla(n, hw, kernel, strides, padding):
  c = 5
  x, k = _inputs(n, hw, c, (*kernel, 1, c))
  out = _vjp_both(lambda x, k, impl: depthwise_conv(x, k, strides, padding, impl), x, k)
  for name, shifted, xla in zip(("y", "dx", "dkernel"), out["shifted"], out["xla"]):
    assert shifted.shape == xla.shape and shifted.dtype == xla.dtype, name
    _assert_close(shifted, xla)


@pytest.mark.parametrize("groups, cin, cout", [(2, 4, 6), (4, 4, 8), (3, 6, 3)])
def test_grouped_values_and_gradients_match_xla(groups, cin, cout):
  x, k = _inputs(3, (6, 7), cin, (3, 3, cin // groups, cout))
  out = _vjp_both(lambda x, k, impl: grouped_conv(x, k, groups, (2, 1), "SAME", impl), x, k)
  for shifted, xla in zip(out["shifted"], out["xla"]):
    _assert_close(shifted, xla)


def test_eager_equals_jit():
  x, k = _inputs(2, (6, 6), 3, (3, 3, 1, 3))
  f = lambda x, k: depthwise_conv(x, k, (2, 2), impl="shifted")
  # Eager dispatch rounds each tap's product and sum separately; jit fuses them.
  _assert_close(f(x, k), jax.jit(f)(x, k), rtol=1e-6)


def test_vmap_of_grad_matches_xla():
  x, k = _inputs(2, (5, 5), 3, (3, 3, 1, 3))
  xs = jnp.stack([x, 2 * x + 1])

  def grads(impl):
    loss = lambda x, k: jnp.sum(jnp.sin(depthwise_conv(x, k, (2, 2), impl=impl)))
    return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None)))(xs, k)

  for shifted, xla in zip(grads("shifted"), grads("xla")):
    _assert_close(shifted, xla)


def test_half_precision_keeps_dtype():
  x, k = _inputs(2, (6, 6), 4, (3, 3, 1, 4))
  x, k = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
  out = _vjp_both(lambda x, k, impl: depthwise_conv(x, k, impl=impl), x, k)
  assert [a.dtype for a in out["shifted"]] == [jnp.bfloat16] * 3
  for shifted, xla in zip(out["shifted"], out["xla"]):
    _assert_close(shifted.astype(jnp.float32), xla.astype(jnp.float32), rtol=2e-2)


def test_module_same_output_with_either_impl():
  x, kernel = _inputs(2, (8, 8), 6, (5, 5, 1, 6))
  init = jax.jit(DepthwiseConv(kernel_size=(5, 5), strides=(2, 2), use_bias=True).init)
  assert jax.tree.map(jnp.shape, init(jax.random.key(1), x)) == {
      "params": {"kernel": (5, 5, 1, 6), "bias": (6,)}}
  params = {"params": {"kernel": kernel, "bias": jnp.arange(6.0)}}
  modules = {impl: DepthwiseConv(kernel_size=(5, 5), strides=(2, 2), use_bias=True, impl=impl)
             for impl in ("xla", "shifted")}
  ys = {impl: jax.jit(module.apply)(params, x) for impl, module in modules.items()}
  _assert_close(ys["shifted"], ys["xla"])
  # Same parameter layout as a grouped nn.Conv, so checkpoints are interchangeable.
  grouped = nn.Conv(6, (5, 5), (2, 2), feature_group_count=6)
  _assert_close(ys["xla"], jax.jit(grouped.apply)(params, x))


def test_jit_traces_once_per_input_shape():
  traces = []

  @jax.jit
  def step(x, k):
    traces.append(x.shape)
    loss = lambda x, k: jnp.sum(depthwise_conv(x, k, impl="shifted") ** 2)
    return jax.grad(loss, argnums=1)(x, k)

  k = jnp.ones((3, 3, 1, 4))
  step(jnp.ones((2, 5, 5, 4)), k)
  step(jnp.zeros((2, 5, 5, 4)), k)
  assert traces == [(2, 5, 5, 4)]
  step(jnp.ones((3, 5, 5, 4)), k)
  assert traces == [(2, 5, 5, 4), (3, 5, 5, 4)]


def test_resolve_impl(monkeypatch):
  monkeypatch.delenv(IMPL_ENV, raising=False)
  assert resolve_impl("auto") == ("shifted" if jax.default_backend() == "cpu" else "xla")
  assert resolve_impl("xla") == "xla"
  monkeypatch.setenv(IMPL_ENV, "xla")
  assert resolve_impl("auto") == "xla"
  assert resolve_impl("shifted") == "shifted"
  monkeypatch.setenv(IMPL_ENV, "fast")
  with pytest.raises(ValueError, match=IMPL_ENV):
    resolve_impl("auto")
  with pytest.raises(ValueError, match="impl"):
    resolve_impl("cudnn")


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel=jnp.ones((3, 3, 1, 5))), "kernel must have shape"),
    (dict(padding="FULL"), "padding"),
    (dict(padding=((1, -1), (0, 0))), "non-negative"),
    (dict(strides=(0, 1)), "strides"),
    (dict(kernel=jnp.ones((7, 7, 1, 4)), padding="VALID"), "larger than the padded input"),
])
def test_depthwise_rejects_bad_arguments(kwargs, match):
  args = dict(x=jnp.ones((1, 5, 5, 4)), kernel=jnp.ones((3, 3, 1, 4))) | kwargs
  with pytest.raises(ValueError, match=match):
    depthwise_conv(**args)


def test_grouped_rejects_bad_groups():
  with pytest.raises(ValueError, match="groups=3"):
    grouped_conv(jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 1, 4)), groups=3)
  with pytest.raises(ValueError, match="kernel must have shape"):
    grouped_conv(jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 2, 5)), groups=2)


@pytest.mark.parametrize("shape, window", [
    ((3, 8, 8, 4), (2, 2)),
    ((2, 9, 7, 3), (2, 2)),  # odd sizes: the last row / column fills no window
    ((2, 5, 9, 3), (2, 3)),
    ((2, 4, 9, 9, 3), (2, 2, 2)),  # c3d's 3D pools
    ((2, 5, 9, 9, 3), (1, 2, 2)),
])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_values_and_gradients_equal_flax(shape, window, ties):
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  # Rounded inputs tie inside windows: both give the gradient to the first maximum.
  x = jnp.asarray(np.round(x) if ties else x)

  @jax.jit
  def run(x):
    out = []
    for pool in (lambda x: max_pool(x, window, window, impl="shifted"),
                 lambda x: nn.max_pool(x, window, window)):
      y, vjp = jax.vjp(pool, x)
      out.append((y, *vjp(jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape))))
    return out

  (y, dx), (y_ref, dx_ref) = run(x)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(dx, dx_ref)


def test_max_pool_falls_back_to_flax_for_overlapping_or_padded_windows():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 7, 3)), jnp.float32)
  for window, strides, padding in [((3, 3), (2, 2), "VALID"), ((2, 2), (2, 2), "SAME"),
                                   ((2, 2), None, "VALID")]:
    np.testing.assert_array_equal(max_pool(x, window, strides, padding, impl="shifted"),
                                  nn.max_pool(x, window, strides, padding))
  jaxpr = str(jax.make_jaxpr(lambda x: max_pool(x, (2, 2), (2, 2), impl="xla"))(x))
  assert "reduce_window_max" in jaxpr and "custom_vjp" not in jaxpr
