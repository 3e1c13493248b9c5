"""The ``act_quant`` method: quantization-aware training of the activations that
``export --format onnx --activations static`` quantizes, so the run trains and
evaluates the uint8 rounding ONNX Runtime's int8 kernels apply (Jacob et al.
2018, the TFLite scheme): MicroBotNet x0.32's int8 file agrees with its run on
0.9996 of the test set with it, 0.977 without (docs/deploy.md).

Stack it with the weight quantizer, on the same layers (``--epochs 0``: the run
only computes what the runtime computes; more to fine-tune with the rounding)::

    jcompress compress --from RUN --workdir RUN_qa --method qat --method act_quant --epochs 0

Sites: each selected kernel's layer (a Flax module with a ``kernel``) has its input
and its output quantized: the output of the batch norm the layer feeds directly
where there is one (the exporter folds it into the conv), else the layer's output
(a ``Dense``'s before its bias: the ONNX MatMul's). The layer whose output is the
model's (the logits) stays float, as the exporter leaves it. The input's rounding
reaches that layer only (the exporter quantizes it for that node alone); the
output's reaches every consumer.

Grids: per tensor, uint8 ``(scale, zero point)``, the ones ``export --format onnx``
calibrates (the ``--percentile`` of each tensor's values over
``--calibration-images`` training images, its placement rules), computed at
compress time by the exporter itself (so ``act_quant`` needs ``jcompress[deploy]``)
and fixed while training; the plan stores them (``sites``) and ``export --format
onnx`` uses them instead of calibrating.
Gradients pass straight through inside a range and are zero outside (clipped STE).
The weights are left as they are: the method changes no tensor.

ONNX Runtime stores a quantized conv's bias (the folded batch norm's shift) as int32
codes of step ``input scale * weight scale``; the run adds the same rounding to its
conv outputs (:func:`bias_rounding`, in inference where a batch norm follows: in
training it uses batch statistics), for weights on the symmetric ``--bits`` grid of
quantize/qat, per tensor or per channel (the same option: one ``--bits 8`` sets both;
``compress --from`` a quantized run takes that run's ``--bits`` again).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jcompress import onnx_qdq
from jcompress.transforms import base, quantize, registry

OPTIONS = (
    base.Option("percentile", float, onnx_qdq.CALIBRATION_PERCENTILE,
                "each activation range clipped to this percentile of its calibration "
                "values (100 - it below zero; 100: min-max)", range="(50, 100]"),
    base.Option("calibration-images", int, 512,
                "training images whose activations set the ranges (at compress time)",
                range="[1, inf)"),
    quantize.BITS,
    base.Option("sites", dict, None, "the quantized tensors' uint8 scales and zero points",
                hidden=True),
)


def fake_quant(x: jax.Array, scale: float, zero: int) -> jax.Array:
  """``x`` on the uint8 grid ``scale * (q - zero)``, ``q = clip(round(x / scale) + zero,
  0, 255)`` (ONNX QuantizeLinear then DequantizeLinear); gradient 1 inside the grid's
  range, 0 outside."""
  scale, zero = np.float32(scale), np.float32(zero)
  lo, hi = (0 - zero) * scale, (255 - zero) * scale
  xf = x.astype(jnp.float32)
  q = jnp.clip(jnp.round(xf / scale) + zero, 0, 255)
  clipped = jnp.clip(xf, lo, hi)
  return (clipped + jax.lax.stop_gradient((q - zero) * scale - clipped)).astype(x.dtype)


def bias_rounding(kernel, bias, a, b, in_scale: float, bits: int):
  """What ONNX Runtime adds to a conv's output by storing its bias as int32 codes of
  step ``in_scale * weight scale`` (its QLinearConv; the batch norm ``a * y + b``
  folded in): ``round(total / step) * step - total`` per output channel, ``total = a
  * bias + b``, for a kernel on the symmetric ``bits`` grid of quantize/qat (one scale
  per output channel, or per tensor: whichever the kernel is on); zero for a kernel on
  neither. A hundredth of a step, but the flipped roundings it causes downstream
  changed 1.6% of MicroBotNet x0.32's predictions (docs/deploy.md)."""
  qmax = 2 ** (bits - 1) - 1
  kernel = kernel.astype(jnp.float32)
  total = b + (a * bias if bias is not None else 0.0)

  def on(w_scale):  # (kernel on this grid?, delta)
    safe = jnp.where(w_scale > 0, w_scale, 1.0)
    codes = kernel / safe
    step = np.float32(in_scale) * (w_scale * jnp.abs(a))
    delta = jnp.where(step > 0, jnp.round(total / jnp.where(step > 0, step, 1.0)) * step
                      - total, 0.0)
    return jnp.max(jnp.abs(codes - jnp.round(codes))) < 1e-3, delta
  channel = on(jnp.max(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 1))) / qmax)
  tensor = on(jnp.max(jnp.abs(kernel)) / qmax)
  delta = jnp.where(channel[0], channel[1], jnp.where(tensor[0], tensor[1], 0.0))
  return jax.lax.stop_gradient(delta)


def _folded(module, kwargs) -> tuple[Any, Any] | None:
  """``(a, b)`` of a batch norm in inference (``a * x + b``), None in training."""
  running = kwargs.get("use_running_average", module.use_running_average)
  if not running:
    return None
  mean = module.get_variable("batch_stats", "mean")
  a = jax.lax.rsqrt(module.get_variable("batch_stats", "var") + module.epsilon)
  if module.use_scale:
    a = a * module.get_variable("params", "scale")
  b = module.get_variable("params", "bias") if module.use_bias else 0.0
  return a, b - mean * a


def _intercept(layers: set[str], visit: Callable[[str, str, Any], Any],
               out_at: Callable[[str], str], offset: Callable[..., Any] | None = None):
  """A Flax interceptor calling ``visit(layer, role, value) -> value`` on each of
  ``layers``' input (``"in"``), output (``"out"``: the layer's, before a Dense's bias)
  and the output of a batch norm taking that output directly (``"bn"``); where
  ``out_at(layer)`` is ``"bn"``, only the batch norm's output is visited.
  ``offset(layer, kernel, bias, a, b)`` (a conv's :func:`bias_rounding`) is added to
  a visited conv output first."""
  pending: dict[int, tuple[str, Any, Any, Any]] = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or module.is_initializing():
      return next_fun(*args, **kwargs)
    x = args[0] if args else next(iter(kwargs.values()), None)
    if isinstance(module, nn.BatchNorm):
      hit = pending.pop(id(x), None)
      y = next_fun(*args, **kwargs)
      if hit is None or hit[1] is not x:
        return y
      folded = _folded(module, kwargs) if offset is not None else None
      if folded is not None:
        y = y + offset(hit[0], hit[2], hit[3], *folded).astype(y.dtype)
      return visit(hit[0], "bn", y)
    layer = "/".join(module.path)
    if layer not in layers:
      return next_fun(*args, **kwargs)
    if args:
      y = next_fun(visit(layer, "in", x), *args[1:], **kwargs)
    else:
      key = next(iter(kwargs))
      y = next_fun(**kwargs | {key: visit(layer, "in", x)})
    bias = (module.get_variable("params", "bias") if module.has_variable("params", "bias")
            else None)
    if isinstance(module, nn.Dense):  # its ONNX MatMul's output: before the bias, no
      # batch norm folded in
      return visit(layer, "out", y) if bias is None else visit(layer, "out", y - bias) + bias
    kernel = module.get_variable("params", "kernel")
    pending[id(y)] = (layer, y, kernel, bias)
    if out_at(layer) == "bn":
      return y
    if offset is not None:
      y = y + offset(layer, kernel, bias, 1.0, 0.0).astype(y.dtype)
    return visit(layer, "out", y)
  return interceptor


def _layers(paths: list[str]) -> list[str]:
  return sorted(p[:-len("/kernel")] for p in paths if p.endswith("/kernel"))


def calibrate(model: nn.Module, variables: dict, images: np.ndarray, paths: list[str],
              percentile: float) -> dict[str, dict[str, Any]]:
  """``{layer: {"in": [scale, zero], "out": [scale, zero], "out_at": "bn" | "self"}}``:
  the grids ``export --format onnx`` calibrates on ``images`` for the selected
  kernels' layers as int8 layers (:func:`jcompress.onnx_export.activation_grids`:
  the same percentile ranges and placement, e.g. an output only a ReLU reads on
  ``[0, hi]``, the input of a layer after pooling on that output's grid), and where
  the model computes each output (a following batch norm's, or the layer's own)."""
  from jcompress import onnx_export  # pylint: disable=import-outside-toplevel
  layers = set(_layers(paths))
  bn: set[str] = set()

  def fn(v, x):
    def visit(layer, role, value):
      if role == "bn":
        bn.add(layer)
      return value
    with nn.intercept_methods(_intercept(layers, visit, lambda layer: "self")):
      return model.apply(v, x, train=False)
  jax.eval_shape(fn, variables, images[:1])
  grids = onnx_export.activation_grids(model, variables, images.shape[1:], paths, images,
                                       percentile)
  return {path[:-len("/kernel")]: {"in": list(g[:2]), "out": list(g[2:]),
                                   "out_at": "bn" if path[:-len("/kernel")] in bn else "self"}
          for path, g in sorted(grids.items())}


def prepare(paths: list[str], options: dict[str, Any], model: nn.Module, variables: dict,
            input_shape: tuple[int, ...], context: base.Context) -> dict[str, Any]:
  """Calibrates the grids (``sites``) on the run's training images."""
  del input_shape
  if not paths:
    raise ValueError("--method act_quant: no kernels selected")
  if context is None or context.images is None:
    raise ValueError("--method act_quant calibrates on training images: pass a Context "
                     "with images")
  images = np.asarray(context.images(options["calibration_images"]), np.float32)
  sites = calibrate(model, {k: v for k, v in variables.items() if v}, images, paths,
                    options["percentile"])
  return options | {"sites": sites}


def method(paths: list[str], percentile: float, calibration_images: int, bits: int = 8,
           sites: dict | None = None) -> base.Method:
  """Fake-quantized uint8 activations around the selected layers (module doc)."""
  sites = dict(sites or {})

  def offset(layer, kernel, bias, a, b):
    return bias_rounding(kernel, bias, a, b, sites[layer]["in"][0], bits)

  def visit(layer, role, value):
    site = sites.get(layer)
    if site is None:
      return value
    scale, zero = site["in"] if role == "in" else site["out"]
    return fake_quant(value, scale, zero)

  @contextlib.contextmanager
  def forward(trainable, cstate):
    del trainable, cstate
    with nn.intercept_methods(_intercept(set(sites), visit,
                                         lambda layer: sites[layer]["out_at"], offset=offset)):
      yield
  return base.Method("act_quant", init=lambda params: (params, {}), apply=lambda t, c: t,
                     paths=(), forward=forward if sites else None)


def onnx_ranges(options: dict[str, Any]) -> dict[str, tuple[float, float, float, float]]:
  """``{kernel path: (in scale, in zero, out scale, out zero)}`` for the exporter."""
  return {f"{layer}/kernel": (*s["in"], *s["out"])
          for layer, s in (options.get("sites") or {}).items()}


def describe(options: dict[str, Any]) -> str | None:
  sites = options.get("sites") or {}
  return (f"{len(sites)} layers' inputs and outputs quantized to uint8 "
          f"({options['percentile']:g}th-percentile ranges)") if sites else None


registry.register("act_quant", *OPTIONS, prepare=prepare, describe=describe,
                  onnx_ranges=onnx_ranges,
                  help="quantization-aware training of the uint8 activations the ONNX "
                  "export's int8 layers run with (stack after qat)")(method)
