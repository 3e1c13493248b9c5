"""Bring your own model and training loop: a linen module and an NNX model defined
here, trained with a plain optax loop under a jcompress method, counted and exported."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jcompress
from jcompress import cost, export

X = jax.random.normal(jax.random.key(0), (256, 20))
Y = (X[:, :4].sum(-1) > 0).astype(jnp.int32) + 2 * (X[:, 4] > 0)  # 4 learnable classes


class Mine(nn.Module):  # no ``train`` argument: not a zoo model
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64, name="hidden")(x))
    return nn.Dense(4, name="out")(x)


class MineNNX(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(20, 64, rngs=rngs)
    self.out = nnx.Linear(64, 4, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def _train(method, params, forward, steps=150):
  """A researcher's own loop: jcompress gives init / optimizer / apply / update."""
  trainable, cstate = method.init(params)
  tx = method.optimizer(trainable, optax.adam(1e-2))
  opt_state = tx.init(trainable)

  def loss_fn(trainable, cstate):
    logits = forward(method.apply(trainable, cstate), X)
    return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()

  @jax.jit
  def step(trainable, cstate, opt_state, i):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, cstate)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable, cstate = method.update(optax.apply_updates(trainable, updates), cstate, i)
    return trainable, cstate, opt_state, loss

  first = None
  for i in range(1, steps + 1):
    trainable, cstate, opt_state, loss = step(trainable, cstate, opt_state, i)
    first = float(loss) if first is None else first
  return trainable, cstate, first, float(loss)


def _accuracy(forward, params):
  return float(jnp.mean(jnp.argmax(forward(params, X), -1) == Y))


@pytest.mark.parametrize("name,options", [("ttq", {"threshold": 0.05}), ("binary", {}),
                                          ("qat", {"bits": 4})])
def test_linen_model_own_loop(name, options, tmp_path):
  model = Mine()
  params = model.init(jax.random.key(1), X[:1])["params"]
  method = jcompress.build(name, paths=["hidden/kernel"], **options)
  forward = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  trainable, cstate, first, last = _train(method, params, forward)
  assert last < 0.7 * first
  used = method.apply(trainable, cstate)
  summary = cost.summarize(model, {"params": used}, (20,),
                           bits=jcompress.transforms.bits_of(method, trainable, cstate))
  assert summary.params == 20 * 64 + 64 + 64 * 4 + 4 and summary.macs == 20 * 64 + 64 * 4
  assert summary.bytes < 0.5 * summary.params * 4  # the hidden kernel at <= 4 bits
  sizes = export.save_params(tmp_path / "m.jcm", method, trainable, cstate)
  assert sizes["param_bytes"] < 0.4 * summary.params * 4
  _, variables = export.load(tmp_path / "m.jcm")
  np.testing.assert_allclose(forward(variables["params"], X), forward(used, X), atol=1e-5)


def test_nnx_model_own_loop(tmp_path):
  model = MineNNX(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)

  def forward(p, x):  # rebuild the NNX model from a pure dict of (compressed) params
    s = jax.tree.map(lambda v: v, state)
    nnx.replace_by_pure_dict(s, p)
    return nnx.merge(graphdef, s)(x)

  method = jcompress.build("ttq", paths=["hidden/kernel"], threshold=0.05)
  trainable, cstate, first, last = _train(method, params, forward)
  assert last < 0.7 * first
  used = method.apply(trainable, cstate)
  values = np.unique(np.asarray(used["hidden"]["kernel"]))
  assert len(values) == 3 and 0.0 in values  # ternary: {-w_n, 0, w_p}
  assert _accuracy(forward, used) > 0.6
  export.save_params(tmp_path / "m.jcm", method, trainable, cstate)
  _, variables = export.load(tmp_path / "m.jcm")
  np.testing.assert_allclose(forward(variables["params"], X), forward(used, X), atol=1e-5)
