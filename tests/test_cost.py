"""Cost accounting: the published figures, the counting convention, overrides for
compressed models, XLA's FLOP count, scores and the rendered tables.

Variables come from ``jax.eval_shape`` filled with ones (no initialiser compiles);
``summarize`` only traces the model.
"""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import cost, models, report


def _variables(model, shape):
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))
  return jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)


@functools.lru_cache(maxsize=None)
def _summary(name, shape, num_classes=10, **config):
  model = models.create(name, num_classes=num_classes, input_shape=shape, **config)
  return cost.summarize(model, _variables(model, shape), shape)


@pytest.mark.parametrize("preset,params,macs,seed000", [
    ("fcn-small", 521_215, 517_888, 519_936), ("fcn-large", 1_435_391, 1_428_992, 1_433_088)])
def test_seed000_fcn_figures(preset, params, macs, seed000):
  s = _summary(preset, (1000,), num_classes=255)
  assert (s.params, s.macs, s.mults("macs_bn")) == (params, macs, seed000)
  assert s.mults() == macs and s.norm_params == seed000 - macs
  width = 256 if preset == "fcn-small" else 512
  assert s.flops == (2 * 1000 - 1) * width + 3 * (2 * width - 1) * width + (2 * width - 1) * 255


@pytest.mark.parametrize("name,shape,params,macs", [
    ("cnn", (25, 40, 1), 260_519, 263_792),  # seed 000: 260.519K params
    ("lcn", (10, 100, 1), 288_661, 285_352),  # 288.661K params, 287.388K seed000 mults
    ("maxout-large", (1000,), 2_136_755, 2_127_500),
    ("maxout-small", (1000,), 1_826_005, 1_813_750)])
def test_seed000_other_families(name, shape, params, macs):
  s = _summary(name, shape, num_classes=255)
  assert (s.params, s.macs) == (params, macs)
  if name == "lcn":
    assert s.mults("macs_bn") == 287_388


def test_lenet_figures():
  s300 = _summary("lenet300", (28, 28, 1))
  assert (s300.params, s300.macs) == (266_610, 266_200)
  s5 = _summary("lenet5", (28, 28, 1))
  assert (s5.params, s5.macs) == (431_080, 2_293_000)
  assert {layer.path: layer.macs for layer in s5.layers if layer.macs} == {
      "conv1": 288_000, "conv2": 1_600_000, "fc1": 400_000, "fc2": 5_000}
  conv1 = next(layer for layer in s5.layers if layer.path == "conv1")
  assert (conv1.kind, conv1.input_shape, conv1.output_shape) == ("conv", (28, 28, 1),
                                                                  (24, 24, 20))
  assert conv1.flops == 20 * 24 * 24 * (2 * 1 * 25 - 1)  # seed 001's formula


def test_microbotnet_figures():
  s = _summary("microbotnet", (32, 32, 3))
  assert (s.params, s.macs) == (236_658, 782_368)
  kinds = {layer.kind for layer in s.layers}
  assert {"conv", "depthwise", "dense", "batch_norm", "ops"} <= kinds
  assert _summary("microbotnet", (32, 32, 3), width=1.0).params == 2_044_298
  dw = next(layer for layer in s.layers if layer.path == "block2/dw")
  assert (dw.kind, dw.macs, dw.output_shape) == ("depthwise", 4 * 4 * 32 * 25, (4, 4, 32))


def test_other_ops_follow_the_convention():
  s = _summary("microbotnet", (32, 32, 3))
  rows = {layer.path: layer for layer in s.layers}
  assert rows["stem_bn"].other_ops == 2 * 16 * 16 * 8  # folded scale and shift
  # block2: h-swish (5 ops) after the expansion and after the squeeze-excite.
  assert rows["block2"].other_ops == 5 * 8 * 8 * 32 + 5 * 4 * 4 * 32
  # SE: mean (1 per input element + 1 div per channel), ReLU, h-sigmoid (4), scale.
  assert rows["block2/se"].other_ops == (16 * 32 + 32) + 8 + 4 * 32 + 16 * 32
  # block3: the same plus the residual add.
  assert rows["block3"].other_ops == 2 * 5 * 4 * 4 * 80 + 4 * 4 * 16
  assert rows["classifier"].other_ops == 10  # bias adds
  assert s.other_ops == sum(layer.other_ops for layer in s.layers)


@pytest.mark.parametrize("name,shape", [("lenet300", (28, 28, 1)), ("lenet5", (28, 28, 1))])
def test_macs_match_xla_flops(name, shape):
  model = models.create(name, num_classes=10, input_shape=shape)
  variables = _variables(model, shape)
  s = cost.summarize(model, variables, shape)
  analysis = jax.jit(lambda v, x: model.apply(v, x)).lower(
      variables, jnp.zeros((1, *shape))).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  # XLA counts a MAC as 2 flops; it counts a 2x2 max pool as 3 comparisons, we as 4.
  assert 0 <= analysis["flops"] - 2 * s.macs <= s.other_ops
  if name == "lenet300":
    assert analysis["flops"] == 2 * s.macs + s.other_ops


def _lenet300():
  model = models.create("lenet300", num_classes=10, input_shape=(28, 28, 1))
  return model, _variables(model, (28, 28, 1))


def test_sparsity_counts_actual_zeros_by_default():
  model, variables = _lenet300()
  kernel = np.ones((784, 300), np.float32)
  kernel[:392] = 0
  variables["params"]["fc1"]["kernel"] = kernel
  s = cost.summarize(model, variables, (28, 28, 1))
  fc1 = next(layer for layer in s.layers if layer.path == "fc1")
  assert fc1.nonzero_macs == 392 * 300 and fc1.macs == 784 * 300
  assert fc1.nonzero_params == 392 * 300 + 300
  assert s.nonzero_macs == s.macs - 392 * 300
  assert s.sparsity == pytest.approx(392 * 300 / 266_200)  # zeros over all kernels


def test_masks_and_sparsity_overrides():
  model, variables = _lenet300()
  mask = np.zeros((300, 100), bool)
  mask[:, :10] = True
  s = cost.summarize(model, variables, (28, 28, 1),
                     masks={"fc2": {"kernel": mask}, "fc1/kernel": 0.92})
  rows = {layer.path: layer for layer in s.layers}
  assert rows["fc2"].nonzero_macs == 3000
  assert rows["fc1"].nonzero_macs == round(0.08 * 784 * 300)
  assert rows["fc3"].nonzero_macs == rows["fc3"].macs
  with pytest.raises(ValueError, match="fc9/kernel"):
    cost.summarize(model, variables, (28, 28, 1), masks={"fc9/kernel": 0.5})
  with pytest.raises(ValueError, match="shape"):
    cost.summarize(model, variables, (28, 28, 1), masks={"fc2/kernel": mask.T})


def test_bits_overrides_set_bytes():
  model, variables = _lenet300()
  s32 = cost.summarize(model, variables, (28, 28, 1))
  assert s32.bytes == 266_610 * 4 and s32.bits == 32
  ternary = cost.summarize(model, variables, (28, 28, 1),
                           bits={"fc1/kernel": 2, "fc2/kernel": 1.6})
  assert ternary.bytes == pytest.approx(784 * 300 * 2 / 8 + 300 * 100 * 1.6 / 8
                                        + (266_610 - 784 * 300 - 300 * 100) * 4)
  by_rule = cost.summarize(model, variables, (28, 28, 1),
                           bits=lambda path, leaf: 8 if path.endswith("kernel") else None)
  assert by_rule.bytes == (784 * 300 + 300 * 100 + 100 * 10) + 410 * 4
  fc1 = next(layer for layer in by_rule.layers if layer.path == "fc1")
  assert fc1.weight_bits == 8
  assert cost.summarize(model, variables, (28, 28, 1), bits=4).bytes == 266_610 / 2
  with pytest.raises(ValueError, match="bits"):
    cost.summarize(model, variables, (28, 28, 1), bits={"fc1/kernel": 0})


def test_sparse_bytes_store_nonzeros_and_a_bitmask():
  model, variables = _lenet300()
  s = cost.summarize(model, variables, (28, 28, 1), masks={"fc1/kernel": 0.9}, bits=8)
  fc1 = next(t for t in s.tensors if t.path == "fc1/kernel")
  assert fc1.sparse_bytes == pytest.approx(0.1 * 784 * 300 + 784 * 300 / 8)


class _Scaled(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return x * self.param("gain", nn.initializers.ones, (x.shape[-1],))


def test_unknown_layer_class_raises_until_registered():
  model = _Scaled()
  variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
  with pytest.raises(ValueError, match="_Scaled"):
    cost.summarize(model, variables, (4,))
  cost.register_layer(_Scaled, cost.LayerRule("gain", ops_per_output=1))
  s = cost.summarize(model, variables, (4,))
  assert [(layer.kind, layer.params, layer.other_ops) for layer in s.layers] == [("gain", 4, 4)]


def test_shared_and_composite_modules_need_no_rules():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      dense = nn.Dense(8, name="shared")
      return dense(nn.relu(dense(x)))

  model = Net()
  variables = model.init(jax.random.key(0), jnp.ones((1, 8)))
  s = cost.summarize(model, variables, (8,))
  assert [(layer.path, layer.kind) for layer in s.layers] == [("", "ops"), ("shared", "dense")]
  assert s.macs == 2 * 64 and s.params == 72  # called twice, stored once
  assert s.other_ops == 8 + 2 * 8  # ReLU, two bias adds


def test_parameters_no_call_touches_are_listed_as_unused():
  model, variables = _lenet300()
  variables["params"]["aux"] = {"kernel": np.ones((100, 5), np.float32)}
  s = cost.summarize(model, variables, (28, 28, 1))
  aux = s.layers[-1]
  assert (aux.path, aux.kind, aux.params, aux.macs) == ("aux", "unused", 500, 0)
  assert s.params == 266_610 + 500


def test_scores_and_energy():
  # Seed 000's FCN, small: 11.0079 truncated.
  assert int(10_000 * cost.score(0.093959, 521_215 * 4, 519_936)) == 110_079
  assert cost.energy_uj(782_368) == pytest.approx(0.782368)
  assert cost.energy_uj(1e6, pj_per_mac=3.1) == pytest.approx(3.1)
  with pytest.raises(ValueError, match="error"):
    cost.score(0.0, 1, 1)


def test_micronet_score():
  model, variables = _lenet300()
  full = cost.summarize(model, variables, (28, 28, 1))
  m = cost.micronet_score(full, reference_params=266_610,
                          reference_ops=2 * 266_200 + full.other_ops)
  assert (m.params, m.score) == (266_610, pytest.approx(2.0))
  pruned = cost.summarize(model, variables, (28, 28, 1), bits=8, masks={"fc1/kernel": 0.9})
  m8 = cost.micronet_score(pruned, reference_params=1, reference_ops=1)
  fc1_kernel = 784 * 300
  expected = (round(0.1 * fc1_kernel) * 8 + fc1_kernel) / 32 + (266_610 - fc1_kernel) / 4
  assert m8.params == pytest.approx(expected)
  # 8-bit weights with 32-bit activations multiply at 32 bits: 2 ops per nonzero MAC.
  assert m8.ops == pytest.approx(2 * pruned.nonzero_macs + pruned.other_ops)


def test_layer_table_formats():
  s = _summary("lenet5", (28, 28, 1))
  text = report.layer_table(s)
  assert "conv1" in text and "288,000" in text and "2,293,000" in text
  markdown = report.layer_table(s, "markdown")
  assert markdown.splitlines()[1].startswith("|---|")
  assert "| total |" in markdown
  latex = report.layer_table(s, "latex")
  assert latex.startswith(r"\begin{tabular}") and r"\\ \hline" in latex
  data = json.loads(report.layer_table(s, "json"))
  assert (data["params"], data["macs"], data["bytes"]) == (431_080, 2_293_000, 431_080 * 4)
  assert [layer["path"] for layer in data["layers"]] == ["", "conv1", "conv2", "fc1", "fc2"]
  with pytest.raises(ValueError, match="format"):
    report.layer_table(s, "html")


def test_comparison_table_reproduces_seed000():
  rows = [
      report.ModelRow("Fully Connected, Small", 0.093959, 519_936, 521_215, 521_215 * 4),
      report.ModelRow.from_summary("Fully Connected, Large", 0.029713,
                                   _summary("fcn-large", (1000,), num_classes=255),
                                   convention="macs_bn"),
  ]
  text = report.comparison_table(rows, "latex")
  assert ("Fully Connected, Small & 0.093959 & 519.936K & 521.215K & 2.08MB & 11.0079 "
          r"\\ \hline") in text
  assert ("Fully Connected, Large & 0.029713 & 1433.088K & 1435.391K & 5.74MB & 11.3882 "
          r"\\ \hline") in text
  with_baseline = report.comparison_table(
      [report.ModelRow("CNN (4-bit)", 0.1748, 265_334, 260_519, 260_519 / 2, baseline=10.5411)],
      "markdown")
  assert with_baseline.splitlines()[0].endswith("| Baseline |")
  assert "| 130.259KB | 9.7811 | 10.5411 |" in with_baseline
  data = json.loads(report.comparison_table(rows, "json"))
  assert data[0]["score"] == pytest.approx(11.00797, abs=1e-5)
