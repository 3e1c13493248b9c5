"""Power-of-two weights (log quantization, Miyashita et al. 2016): ``w_q = sign(w) *
2^round(log2 |w|)``, exponents clipped to ``[-max-shift, 0]`` relative to the
tensor's largest power of two; zero stays zero. Straight-through gradient.

Stored as one int8 code per weight (``0``: zero, else ``sign * (1 + shift)``) and
the float32 top power. A complete outside method in one file.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.transforms import base, packing, registry
from jcompress.transforms import select as sel


def _codes(w, max_shift):
  top = jnp.floor(jnp.log2(jnp.maximum(jnp.max(jnp.abs(w)), 1e-30)))
  e = jnp.clip(jnp.round(jnp.log2(jnp.maximum(jnp.abs(w), 1e-30))), top - max_shift, top)
  shift = (top - e).astype(jnp.int8)
  return jnp.where(w == 0, 0, jnp.sign(w).astype(jnp.int8) * (shift + 1)), top


def _values(codes, top):
  shift = jnp.abs(codes).astype(jnp.float32) - 1
  return jnp.where(codes == 0, 0.0, jnp.sign(codes) * jnp.exp2(top - shift))


@jax.custom_vjp
def _pow2(w, max_shift):
  return _values(*_codes(w, max_shift))


_pow2.defvjp(lambda w, s: (_pow2(w, s), s), lambda s, g: (g, jnp.zeros_like(s)))


def pow2_method(paths, *, max_shift=7):
  chosen = list(paths)

  def init(params):
    return params, {}

  def apply(trainable, cstate):
    flat = sel.flatten(trainable)
    return sel.unflatten({p: _pow2(w, jnp.float32(max_shift)) if p in chosen else w
                          for p, w in flat.items()})

  def encode(trainable, cstate, zeros):
    flat = sel.flatten(jax.device_get(trainable))
    out = {}
    for p in chosen:
      codes, top = _codes(jnp.asarray(flat[p]), max_shift)
      payload, layout = packing.concat({"codes": np.asarray(codes, np.int8).tobytes(),
                                        "top": np.asarray(top, "<f4").tobytes()})
      out[p] = payload, {"shape": list(np.shape(flat[p])), "layout": layout}
    return out

  return base.Method("pow2", init, apply, encode=encode)


def decode(exported):
  out = {}
  for path, (payload, meta) in exported.items():
    parts = packing.split(payload, meta["layout"])
    codes = np.frombuffer(parts["codes"], np.int8).reshape(meta["shape"])
    top = np.frombuffer(parts["top"], "<f4")[0]
    out[path] = np.asarray(_values(jnp.asarray(codes), jnp.float32(top)))
  return out


registry.register("pow2", base.Option("max-shift", int, 7, "smallest power kept: "
                                      "2^-max-shift of the largest", range="[0, 30]"),
                  decode=decode, help="power-of-two weights (log quantization)")(pow2_method)
