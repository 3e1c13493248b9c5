"""The ``quantize`` (post-training) and ``qat`` (quantization-aware training) methods:
uniform k-bit weights (:mod:`jcompress.transforms.uniform`), their packed export
and their int8 execution (:mod:`jcompress.transforms.int8`).

* ``quantize`` (post-training): ``init`` stores codes in ``cstate``; ``apply``
  gives the model their dequantized values. Fine-tuning with it is a no-op for the
  selected tensors: ``optimizer`` freezes their (unused) float copies in
  ``trainable`` and only the rest trains (biases, batch norm, other layers).
* ``qat``: ``trainable`` keeps full-precision latent kernels; ``apply``
  fake-quantizes them with the scales in ``cstate`` and a straight-through
  estimator, and ``update`` re-quantizes ``cstate`` from the new latent weights
  after every optimizer step (so ``cstate`` always holds the codes to export).

Both methods' ``cstate`` maps each selected kernel path to ``{"codes", "scale",
"zero_point", "bits"}``, which is what :func:`int8.int8_execution` and
:func:`export_arrays` read.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcompress.transforms import base, lowbits, packing, registry
from jcompress.transforms import select as sel
from jcompress.transforms.int8 import (int8_conv, int8_dense, int8_execution,  # noqa: F401
                                       quantize_activations)
from jcompress.transforms.uniform import (GRANULARITIES, SCHEMES, QTensor,  # noqa: F401
                                          _check_paths, _to_state, check_options, code_range,
                                          dequantize, dequantize_tensor, fake_quant, qtensors,
                                          quantize, quantize_tensor)

# --- Methods ---------------------------------------------------------------------

BITS = base.Option("bits", int, 8, "bits per weight code, 2..16", range="[2, 16]")
SCHEME = base.Option("scheme", str, "symmetric",
                     "symmetric (zero point 0) or asymmetric (min/max range)", SCHEMES)
GRANULARITY = base.Option("granularity", str, "tensor",
                          "one scale per tensor or per output channel (last axis)",
                          GRANULARITIES)


def _factory(paths: list[str], bits: int, scheme: str, granularity: str, *,
             qat: bool) -> base.Method:
  check_options(bits, scheme, granularity)
  chosen = list(paths)

  def quantize_all(flat):
    return {p: quantize_tensor(flat[p], bits, scheme, granularity) for p in chosen}

  def init(params):
    flat = sel.flatten(params)
    _check_paths(flat, chosen)
    return params, _to_state(quantize_all(flat), bits)

  def apply(trainable, cstate):
    flat = sel.flatten(trainable)
    qs = qtensors(cstate)
    present = [p for p in chosen if p in flat]  # a later method may have replaced a tensor
    if qat:  # the value of the codes in cstate (``update`` made them from these latent
      # weights; recomputed here a tie may round the other way), fake_quant's gradient
      for p in present:
        fq = fake_quant(flat[p], qs[p].scale, qs[p].zero_point, bits=bits, scheme=scheme)
        flat[p] = fq + jax.lax.stop_gradient(dequantize_tensor(qs[p]) - fq)
    else:
      flat.update({p: dequantize_tensor(qs[p]) for p in present})
    return sel.unflatten(flat)

  def update(trainable, cstate, step):
    del step
    if not qat:
      return trainable, cstate
    flat, old = sel.flatten(trainable), qtensors(cstate)
    return trainable, _to_state({p: quantize_tensor(flat[p], bits, scheme, granularity)
                                 if p in flat else old[p] for p in chosen}, bits)

  def optimizer(trainable, base_tx):
    if qat:
      return base_tx
    labels = sel.unflatten({p: "frozen" if p in chosen else "base" for p in sel.flatten(trainable)})
    return optax.partition({"base": base_tx, "frozen": optax.set_to_zero()}, labels)

  def bits_fn(trainable, cstate):
    del trainable, cstate
    return {p: float(bits) for p in chosen}

  def encode(trainable, cstate, zeros):
    return export_arrays(trainable, cstate, zeros)

  return base.Method("qat" if qat else "quantize", init, apply, update, optimizer, bits_fn,
                     encode=encode)


def quantize_method(paths: list[str], *, bits: int = 8, scheme: str = "symmetric",
                    granularity: str = "tensor") -> base.Method:
  """Post-training quantization of the kernels at ``paths``.

  >>> m = registry.build("quantize", ["fc1/kernel"], bits=4)
  >>> trainable, cstate = m.init({"fc1": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}})
  >>> cstate["fc1"]["kernel"]["codes"].tolist(), m.bits(trainable, cstate)
  ([[7, 7], [7, 7], [7, 7]], {'fc1/kernel': 4.0})
  """
  return _factory(paths, bits, scheme, granularity, qat=False)


def qat_method(paths: list[str], *, bits: int = 8, scheme: str = "symmetric",
               granularity: str = "tensor") -> base.Method:
  """Quantization-aware training of the kernels at ``paths`` (see :func:`fake_quant`).

  >>> m = registry.build("qat", ["fc1/kernel"], bits=4)
  >>> trainable, cstate = m.init({"fc1": {"kernel": jnp.ones((3, 2))}})
  >>> m.apply(trainable, cstate)["fc1"]["kernel"].shape
  (3, 2)
  """
  return _factory(paths, bits, scheme, granularity, qat=True)


# --- Export ----------------------------------------------------------------------

def export_arrays(trainable: Any, cstate: Any, masks: dict[str, Any] | None = None
                  ) -> dict[str, tuple[bytes, dict]]:
  """The bytes to store per quantized tensor of ``quantize``/``qat``.

  Each payload holds the codes packed at ``bits`` bits (:func:`packing.pack_codes`),
  the float32 little-endian scales and, for ``asymmetric``, the zero points packed
  at ``bits`` bits unsigned. The meta dict (JSON-able) gives the shape, ``bits``,
  ``scheme`` and the byte ``layout`` of these sections.

  With ``masks`` (``{path: bool array}`` of an earlier pruning step), a
  symmetric tensor stores only its kept codes, with their positions as a bitmask
  or relative indices (:func:`packing.pack_sparse`, whichever is smallest; meta
  ``format``): pruned and quantized in one encoding, as Deep Compression stores
  them. Asymmetric tensors keep dense codes (a pruned weight's code is its
  channel's zero point, not 0).

  >>> m = registry.build("quantize", ["w"], bits=4)
  >>> out = export_arrays(*m.init({"w": jnp.ones((5, 2))}))
  >>> len(out["w"][0]), out["w"][1]["layout"]
  (9, {'codes': [0, 5], 'scale': [5, 4]})
  """
  del trainable  # the codes of both methods live in cstate
  out = {}
  flat = sel.flatten(cstate)
  for path, q in qtensors(cstate).items():
    bits = int(flat[f"{path}/bits"])
    codes = np.asarray(q.codes)
    signed = np.issubdtype(codes.dtype, np.signedinteger)
    sparse = {}
    if signed and masks is not None and path in masks:
      code_sections, sparse = packing.pack_sparse(
          codes, np.asarray(masks[path]), bits, lambda v, b=bits: packing.pack_codes(v, b),
          codes=True)
    else:
      code_sections = {"codes": packing.pack_codes(codes, bits)}
      sparse = {"symbols": {"codes": [bits, int(codes.size)]}}
    sections = {**code_sections, "scale": np.asarray(q.scale, "<f4").tobytes()}
    if not signed:
      sections["zero_point"] = packing.pack_codes(np.asarray(q.zero_point), bits)
    payload, layout = packing.concat(sections)
    out[path] = payload, {"shape": list(codes.shape), "bits": bits,
                          "scheme": "symmetric" if signed else "asymmetric",
                          "channels": int(np.size(q.scale)) if np.ndim(q.scale) else 0,
                          "layout": layout, **sparse}
  return out


def import_arrays(exported: dict[str, tuple[bytes, dict]]) -> dict[str, jax.Array]:
  """Inverse of :func:`export_arrays`: ``{path: dequantized kernel}``, bit-identical to
  the kernels ``apply`` gives the model."""
  out = {}
  for path, (payload, meta) in exported.items():
    parts = packing.split(payload, meta["layout"])
    shape, bits, signed = tuple(meta["shape"]), meta["bits"], meta["scheme"] == "symmetric"
    scale_shape = (meta["channels"],) if meta["channels"] else ()
    n = int(np.prod(shape))
    if "format" in meta:  # pruned, then quantized: kept codes and their positions
      codes = packing.unpack_sparse(parts, meta, n, packing.code_dtype(bits, True),
                                    lambda buf, k: packing.unpack_codes(buf, bits, k, True))
    else:
      codes = packing.unpack_codes(parts["codes"], bits, n, signed)
    scale = np.frombuffer(parts["scale"], "<f4").reshape(scale_shape)
    zero_point = (np.zeros(scale_shape, np.int32) if signed else packing.unpack_codes(
        parts["zero_point"], bits, int(np.prod(scale_shape)), False).astype(np.int32)
        .reshape(scale_shape))
    out[path] = dequantize_tensor(QTensor(jnp.asarray(codes.reshape(shape)),
                                          jnp.asarray(scale), jnp.asarray(zero_point)))
  return out


def stablehlo_weights(trainable: Any, cstate: Any) -> dict[str, Any]:
  """``{path: () -> kernel}`` for ``export --format stablehlo``: each kernel
  dequantized in the graph from its codes (packed 2 or 4 to a byte up to 4 bits,
  :mod:`lowbits`; else int8, int16 above 8 bits) and float32 scales, which the
  serialized module then holds as constants of those types.

  >>> m = registry.build("quantize", ["w"], bits=4)
  >>> stablehlo_weights(*m.init({"w": jnp.ones((2,))}))["w"]().tolist()
  [1.0, 1.0]
  """
  del trainable  # the codes of both methods live in cstate
  out, flat = {}, sel.flatten(jax.device_get(cstate))
  for path, q in qtensors(jax.device_get(cstate)).items():
    codes = np.asarray(q.codes)
    codes_fn = lowbits.constant(codes, int(flat[f"{path}/bits"]),
                                np.issubdtype(codes.dtype, np.signedinteger))
    out[path] = lambda c=codes_fn, s=np.asarray(q.scale), z=np.asarray(q.zero_point): (
        dequantize_tensor(QTensor(c(), jnp.asarray(s), jnp.asarray(z))))
  return out


def onnx_weights(trainable: Any, cstate: Any) -> dict[str, registry.IntWeight]:
  """``{path: IntWeight(codes, scale, zero_point)}`` for ``export --format onnx``: the
  codes and scales this method trained, exactly what the model runs with.

  >>> m = registry.build("quantize", ["w"], bits=8)
  >>> onnx_weights(*m.init({"w": jnp.array([1.0, -0.5])}))["w"].codes.tolist()
  [127, -64]
  """
  del trainable
  return {p: registry.IntWeight(np.asarray(q.codes), np.asarray(q.scale, np.float32),
                                np.asarray(q.zero_point))
          for p, q in qtensors(jax.device_get(cstate)).items()}


def _int8(methods, index, trainable, cstate):
  return int8_execution(cstate[str(index)])


_EXECUTIONS = {"int8": base.ExecutionMode(
    _int8, "quantize/qat layers of 8 symmetric bits as int8 x int8 with int32 accumulation")}
registry.register("quantize", BITS, SCHEME, GRANULARITY, decode=import_arrays,
                  executions=_EXECUTIONS, stablehlo=stablehlo_weights, onnx=onnx_weights,
                  help="post-training uniform k-bit weight quantization (codes frozen)"
                  )(quantize_method)
registry.register("qat", BITS, SCHEME, GRANULARITY, decode=import_arrays, executions=_EXECUTIONS,
                  stablehlo=stablehlo_weights, onnx=onnx_weights,
                  help="quantization-aware training: fake-quant with a straight-through "
                  "estimator")(qat_method)
