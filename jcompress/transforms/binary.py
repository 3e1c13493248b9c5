"""Binary weights with a learned scale (BinaryConnect, Courbariaux et al. 2015;
XNOR-Net's scaling, Rastegari et al. 2016): ``w_b = alpha * sign(w)``.

Each selected kernel keeps its full-precision latent copy ``w`` and gains a
trainable scale ``<path>_scale`` (one per tensor, or one per output channel,
the last kernel axis), initialised to XNOR-Net's optimum ``mean |w|``. The
forward pass uses ``alpha * sign(w)`` (``sign(0) = +1``: every weight takes one
bit); the backward pass is the clipped straight-through estimator: ``dL/dw =
alpha * g`` where ``|w| <= clip``, 0 beyond (the latent weight stops growing once
its sign is settled), and ``dL/dalpha = sum(g * sign(w))``.

Stored as 1 bit per weight (``np.packbits``) plus the float32 scales. After a
pruning step the pruned weights stay zero (the stack holds earlier methods'
zeros) and the codec stores only the kept signs, with their positions.

This module is the worked example of ``docs/writing-a-method.md``.

>>> m = registry.build("binary", ["w"])
>>> trainable, cstate = m.init({"w": jnp.array([0.5, -0.25, 0.0, -1.0])})
>>> m.apply(trainable, cstate)["w"].tolist()
[0.4375, -0.4375, 0.4375, -0.4375]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.transforms import base, packing, registry
from jcompress.transforms import select as sel

GRANULARITIES = ("tensor", "channel")
_SUFFIX = "_scale"


@jax.custom_vjp
def binarize(w: jax.Array, alpha: jax.Array, clip: float) -> jax.Array:
  """``alpha * sign(w)`` (``sign(0) = 1``) with the clipped straight-through gradient.

  >>> float(jax.grad(lambda w: binarize(w, 2.0, 1.0))(0.3))
  2.0
  """
  return alpha * jnp.where(w >= 0, 1.0, -1.0)


def _binarize_fwd(w, alpha, clip):
  signs = jnp.where(w >= 0, 1.0, -1.0)
  return alpha * signs, (signs, jnp.abs(w) <= clip, alpha, clip)


def _binarize_bwd(residuals, g):
  signs, inside, alpha, clip = residuals
  g_alpha = jnp.sum(g * signs, axis=tuple(range(g.ndim - jnp.ndim(alpha))))
  return (jnp.where(inside, alpha * g, 0.0), g_alpha.reshape(jnp.shape(alpha)),
          jnp.zeros_like(clip))


binarize.defvjp(_binarize_fwd, _binarize_bwd)


def binary_method(paths: list[str], *, granularity: str = "tensor", clip: float = 1.0
                  ) -> base.Method:
  """Binary weights with a learned scale for the kernels at ``paths`` (module doc).

  ``trainable`` is the params plus ``<path>_scale`` leaves; ``cstate`` is empty.
  """
  chosen = list(paths)

  def init(params):
    flat = sel.flatten(params)
    sel.check_new_leaves(flat, chosen, (_SUFFIX,), "binary")
    out = {}
    for path, leaf in flat.items():
      out[path] = leaf
      if path in chosen:
        axes = tuple(range(np.ndim(leaf) - 1)) if granularity == "channel" else None
        out[path + _SUFFIX] = jnp.mean(jnp.abs(jnp.asarray(leaf, jnp.float32)), axis=axes)
    return sel.unflatten(out), {}

  def apply(trainable, cstate):
    flat = sel.flatten(trainable)
    return sel.unflatten({p: binarize(w, flat[p + _SUFFIX], jnp.float32(clip))
                          if p in chosen and p + _SUFFIX in flat else w
                          for p, w in flat.items() if not _is_scale(p, chosen)})

  def encode(trainable, cstate, zeros):
    flat = sel.flatten(jax.device_get(trainable))
    return {p: _pack(np.asarray(flat[p]), np.asarray(flat[p + _SUFFIX]), zeros.get(p))
            for p in chosen if p in flat}

  return base.Method("binary", init, apply, encode=encode)


def _is_scale(path: str, chosen: list[str]) -> bool:
  return path.endswith(_SUFFIX) and path[:-len(_SUFFIX)] in chosen


def _pack(w: np.ndarray, alpha: np.ndarray, keep: Any) -> tuple[bytes, dict]:
  """1 bit per sign; after pruning, the kept signs as 2-bit codes (-1, +1; 0 for
  the filler entries of relative indices) with their positions, whichever of
  :func:`packing.pack_sparse`'s forms is smallest."""
  signs = np.where(w >= 0, 1, -1).astype(np.int8).reshape(-1)
  if keep is None:
    sections = {"signs": np.packbits(signs > 0, bitorder="little").tobytes()}
    sparse = {"symbols": {"signs": [1, int(signs.size)]}}
  else:
    sections, sparse = packing.pack_sparse(signs, np.asarray(keep), 2,
                                           lambda v: packing.pack_codes(v, 2), codes=True)
  payload, layout = packing.concat({**sections, "scale": np.asarray(alpha, "<f4").tobytes()})
  return payload, {"shape": list(w.shape), "channels": int(np.size(alpha)) if np.ndim(alpha)
                   else 0, "layout": layout, **sparse}


def decode(exported: dict[str, tuple[bytes, dict]]) -> dict[str, np.ndarray]:
  """Inverse of the codec: ``{path: alpha * sign}``, zero where nothing was kept;
  bit-identical to what ``apply`` (and the stack's held zeros) give the model."""
  out = {}
  for path, (payload, meta) in exported.items():
    parts = packing.split(payload, meta["layout"])
    shape = tuple(meta["shape"])
    n = int(np.prod(shape))
    if "format" in meta:
      signs = packing.unpack_sparse(parts, meta, n, np.int8,
                                    lambda buf, k: packing.unpack_codes(buf, 2, k, True))
    else:
      if len(parts["signs"]) * 8 < n:
        raise ValueError(f"{path}: {len(parts['signs'])} bytes cannot hold {n} signs")
      bits = np.unpackbits(np.frombuffer(parts["signs"], np.uint8), count=n, bitorder="little")
      signs = bits.astype(np.int8) * 2 - 1
    alpha = np.frombuffer(parts["scale"], "<f4")
    alpha = alpha.reshape(meta["channels"]) if meta["channels"] else alpha.reshape(())
    out[path] = (alpha * signs.reshape(shape).astype(np.float32)).astype(np.float32)
  return out


def onnx_weights(trainable: Any, cstate: Any) -> dict[str, registry.IntWeight]:
  """``{path: IntWeight(signs, alpha, 0)}`` for ``export --format onnx``: int8 signs
  (``sign(0) = +1``) and the learned scales, exactly ``alpha * sign(w)``."""
  flat = sel.flatten(jax.device_get(trainable))
  return {p[:-len(_SUFFIX)]: registry.IntWeight(
      np.where(np.asarray(flat[p[:-len(_SUFFIX)]]) >= 0, 1, -1).astype(np.int8),
      np.asarray(alpha, np.float32), np.zeros(np.shape(alpha), np.int8))
      for p, alpha in flat.items() if p.endswith(_SUFFIX) and p[:-len(_SUFFIX)] in flat}


registry.register(
    "binary",
    base.Option("granularity", str, "tensor", "one learned scale per tensor or per output "
                "channel (last axis)", GRANULARITIES),
    base.Option("clip", float, 1.0, "straight-through estimator: no gradient to latent "
                "weights with |w| above this", range="(0, inf)"),
    decode=decode, onnx=onnx_weights,
    help="binary weights alpha * sign(w) with a learned scale, 1 bit per weight "
         "(BinaryConnect / XNOR-Net)")(binary_method)
