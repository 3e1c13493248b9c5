import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import models, sparse
from jcompress.transforms import base, registry, prune  # noqa: F401  (registers prune)
from jcompress.transforms import select as sel


RNG = np.random.default_rng(0)


def _normal(*shape):
  return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def _init(model, x):
  """Random params of ``model`` without compiling its (threefry) initializers."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  return jax.tree.map(lambda s: _normal(*s.shape) / np.sqrt(s.shape[0]), shapes)


def _pruned(shape, sparsity, structure="none"):
  w = _normal(*shape)
  method = registry.build("prune", ["w"], sparsity=str(sparsity), structure=structure)
  return method.apply(*method.init({"w": w}))["w"]


@pytest.mark.parametrize("fmt", sparse.FORMATS)
@pytest.mark.parametrize("sparsity, structure", [(0.0, "none"), (0.9, "none"), (0.99, "none"),
                                                 (0.5, "l1")])
def test_matmul_equals_dense_masked(fmt, sparsity, structure):
  w = _pruned((24, 10), sparsity, structure=structure)
  m = sparse.from_dense(w, fmt)
  assert m.shape == (24, 10) and m.nonzero == np.count_nonzero(w)
  for x_shape in [(1, 24), (2, 3, 24)]:
    x = _normal(*x_shape)
    np.testing.assert_allclose(sparse.matmul(x, m), x @ w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(sparse.matmul)(x, m), sparse.matmul(x, m), rtol=1e-6,
                             atol=1e-6)


def test_all_zero_and_conv_kernels():
  x = jnp.ones((3, 6))
  for fmt in sparse.FORMATS:
    assert not sparse.matmul(x, sparse.from_dense(jnp.zeros((6, 4)), fmt)).any()
    w = _pruned((1, 1, 6, 4), 0.5)
    np.testing.assert_allclose(sparse.matmul(x, sparse.from_dense(w, fmt)), x @ w[0, 0],
                               rtol=1e-6)


def test_compact_shrinks_channel_pruned_kernels():
  m = sparse.from_dense(_pruned((30, 20), 0.75, structure="l2"), "compact")
  assert m.arrays[2].shape == (30, 5) and m.nbytes == 4 * (30 + 5 + 30 * 5)


def test_bad_inputs():
  with pytest.raises(ValueError, match="unknown format 'coo'; valid: csr, ell, bcoo, compact"):
    sparse.from_dense(jnp.ones((2, 2)), "coo")
  with pytest.raises(ValueError, match=r"shape \(3, 3, 2, 4\) is not a dense or 1x1 conv"):
    sparse.from_dense(jnp.ones((3, 3, 2, 4)))
  with pytest.raises(ValueError, match="'fc9/kernel' is not a parameter path"):
    sparse.sparsify({"fc1": {"kernel": jnp.ones((2, 2))}}, ["fc9/kernel"])


@pytest.mark.parametrize("fmt", ["csr", "ell"])
def test_lenet300_sparse_logits_equal_dense_masked(fmt):
  model = models.create("lenet300", num_classes=10, input_shape=(28, 28, 1))
  x = _normal(4, 28, 28, 1)
  params = _init(model, x)
  paths = ["fc1/kernel", "fc2/kernel", "fc3/kernel"]
  method = registry.build("prune", paths, sparsity="fc1=0.92,fc2=0.91,fc3=0.74")
  forward = method.apply(*method.init(params))
  matrices = sparse.sparsify(forward, paths, fmt)

  @jax.jit
  def sparse_logits(params, matrices, x):
    with sparse.sparse_execution(matrices):
      return model.apply({"params": params}, x)

  # The sparse layers never read their dense kernels.
  without = sel.unflatten({p: v for p, v in sel.flatten(forward).items() if p not in paths})
  expected = jax.jit(model.apply)({"params": forward}, x)
  np.testing.assert_allclose(sparse_logits(without, matrices, x), expected, rtol=1e-5, atol=1e-5)


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3, 3), name="conv")(x)
    x = nn.Conv(5, (1, 1), name="pw")(nn.relu(x))
    return nn.Dense(3, use_bias=False, name="head")(x.mean((1, 2)))


def test_pointwise_conv_runs_sparse_and_others_are_refused():
  model = _Net()
  x = _normal(2, 5, 5, 4)
  params = _init(model, x)
  method = registry.build("prune", ["pw/kernel", "head/kernel"], sparsity="0.6")
  forward = method.apply(*method.init(params))

  @jax.jit
  def logits(matrices):
    with sparse.sparse_execution(matrices):
      return model.apply({"params": forward}, x)

  np.testing.assert_allclose(logits(sparse.sparsify(forward, ["pw/kernel", "head/kernel"], "ell")),
                             logits({}), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="'conv/kernel' is a conv that is not 1x1"):
    with sparse.sparse_execution(sparse.sparsify(
        {"conv": {"kernel": jnp.ones((1, 1, 4, 6))}}, ["conv/kernel"])):
      model.apply({"params": forward}, x)
