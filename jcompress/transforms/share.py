"""Trained weight sharing (Han, Mao & Dally, ICLR 2016, Deep Compression's second
stage), which is also TF Model Optimization's weight clustering.

Each selected kernel's weights are clustered by 1-D k-means into ``k = 2**bits``
values (a per-layer codebook; ``--bits``, default 5); every weight is replaced by the index of its
centroid. The codebook is trainable (leaf ``<kernel path>_codebook``), the indices
are compression state (fixed after ``init``): the forward pass uses
``codebook[index]``, so autodiff gives each centroid the summed gradient of its
members, Han's fine-tuning rule, with no custom gradient. The latent kernel is gone:
a layer trains ``k`` numbers. A centroid's gradient sums thousands of weights' own,
so the codebooks get their own optimizer (``--codebook-lr``, Adam; ``none`` hands
them to the base optimizer).

Zero weights (a kernel pruned before this method, or zeros held by an earlier
method) get no centroid: in a kernel with zeros, code 0 means an exact zero
(``codebook[0]`` is held at 0 and gets no gradient) and the nonzero weights are
clustered into the other ``k - 1`` values, so they stay zero, do not pull the
clustering towards 0, and the codes still fit in ``bits`` bits. ``masks`` declares
them, so later methods keep them zero too.

Centroid initialisation (``--centroid-init``), as Han compares: ``linear`` (evenly
spaced between the smallest and the largest weight; theirs, best for the large
weights), ``density``
(quantiles of the weights) or ``random`` (``k`` weights drawn with ``--share-seed``).
``--iters`` Lloyd iterations follow (1-D: assignments by the midpoints between
sorted centroids; an empty cluster keeps its centroid).

Bits per weight are ``bits``; the codec stores the indices at ``bits`` bits (only
the kept ones, with their positions, after pruning: whichever of
:func:`packing.pack_sparse`'s forms is smallest) plus the float32 codebook.

>>> m = registry.build("share", ["w"], bits=2)
>>> trainable, cstate = m.init({"w": jnp.array([0.9, 1.1, -1.0, 0.0, -1.2])})
>>> [round(x, 2) for x in trainable["w_codebook"].tolist()]
[0.0, -1.1, -0.05, 1.0]
>>> [round(x, 2) for x in m.apply(trainable, cstate)["w"].tolist()]
[1.0, 1.0, -1.1, 0.0, -1.1]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcompress.transforms import base, packing, registry
from jcompress.transforms import select as sel

INITS = ("linear", "density", "random")
_SUFFIX = "_codebook"


def initial_centroids(values: np.ndarray, k: int, init: str,
                      rng: np.random.Generator) -> np.ndarray:
  """``k`` starting centroids for 1-D ``values`` (non-empty), sorted."""
  if init == "linear":
    return np.linspace(values.min(), values.max(), k)
  if init == "density":
    return np.quantile(values, (np.arange(k) + 0.5) / k)
  return np.sort(rng.choice(values, size=k, replace=values.size < k))


def kmeans_1d(values: np.ndarray, k: int, init: str = "linear", iters: int = 20,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Lloyd's k-means on 1-D ``values``: ``(centroids float32 (k,), index per value)``.

  >>> c, i = kmeans_1d(np.array([0.0, 0.1, 1.0, 1.2]), 2)
  >>> [round(x, 2) for x in c.tolist()], i.tolist()
  ([0.05, 1.1], [0, 0, 1, 1])
  """
  values = np.asarray(values, np.float64).reshape(-1)
  centroids = initial_centroids(values, k, init, np.random.default_rng(seed))
  index = None
  for _ in range(max(iters, 1)):
    order = np.argsort(centroids, kind="stable")
    centroids = centroids[order]
    new = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values)
    if index is not None and np.array_equal(new, index):
      break
    index = new
    counts = np.bincount(index, minlength=k)
    sums = np.bincount(index, weights=values, minlength=k)
    centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
  return centroids.astype(np.float32), index.astype(np.int32)


def shared(codebook: jax.Array, index: jax.Array, zero: jax.Array) -> jax.Array:
  """``codebook[index]``, exactly 0 where ``index == zero`` (-1: no zero code)."""
  return jnp.where(index == zero, jnp.zeros((), codebook.dtype), jnp.take(codebook, index))


def cluster(w: np.ndarray, bits: int, init: str = "linear", iters: int = 20, seed: int = 0
            ) -> tuple[np.ndarray, np.ndarray, int]:
  """``(codebook (2**bits,), index (shape of w), zero)`` of kernel ``w``: k-means of its
  nonzero weights; with zeros, code ``zero = 0`` is theirs, else ``zero = -1``."""
  w, k = np.asarray(w, np.float32), 2 ** bits
  keep = w != 0
  if keep.all():
    codebook, index = kmeans_1d(w, k, init, iters, seed)
    return codebook, index.reshape(w.shape), -1
  codebook, index = np.zeros(k, np.float32), np.zeros(w.shape, np.int32)
  if keep.any():
    codebook[1:], index[keep] = kmeans_1d(w[keep], k - 1, init, iters, seed)
    index[keep] += 1
  return codebook, index, 0


def share_method(paths: list[str], *, bits: int = 5, centroid_init: str = "linear",
                 iters: int = 20, share_seed: int = 0, codebook_lr: float | None = 1e-4
                 ) -> base.Method:
  """Trained weight sharing of the kernels at ``paths`` (module doc).

  ``trainable``: the params with each chosen kernel replaced by ``<path>_codebook``
  (``2**bits`` float32); ``cstate``: ``{"index": {path: int32 codes, the kernel's
  shape}, "zero": {path: the code of exact zeros, -1 for none}}``.
  """
  chosen = list(paths)

  def init(params):
    flat = sel.flatten(params)
    sel.check_new_leaves(flat, chosen, (_SUFFIX,), "share")
    trainable, index, zero = {}, {}, {}
    for path, leaf in flat.items():
      if path not in chosen:
        trainable[path] = leaf
        continue
      codebook, idx, z = cluster(jax.device_get(leaf), bits, centroid_init, iters, share_seed)
      trainable[path + _SUFFIX] = jnp.asarray(codebook)
      index[path], zero[path] = jnp.asarray(idx), jnp.asarray(z, jnp.int32)
    return sel.unflatten(trainable), {"index": sel.unflatten(index),
                                      "zero": sel.unflatten(zero)}

  def apply(trainable, cstate):
    flat, index, zero = (sel.flatten(trainable), sel.flatten(cstate["index"]),
                         sel.flatten(cstate["zero"]))
    out = {p: v for p, v in flat.items() if not _is_codebook(p, chosen)}
    for path, idx in index.items():
      out[path] = shared(flat[path + _SUFFIX], idx, zero[path])
    return sel.unflatten(out)

  def masks(trainable, cstate):
    zero = sel.flatten(cstate["zero"])
    return {p: idx != zero[p] for p, idx in sel.flatten(cstate["index"]).items()}

  def bits_of(trainable, cstate):
    return {p: float(bits) for p in sel.flatten(cstate["index"])}

  def encode(trainable, cstate, zeros):
    flat = sel.flatten(jax.device_get(trainable))
    zero = sel.flatten(jax.device_get(cstate["zero"]))
    return {p: _pack(np.asarray(idx), np.asarray(flat[p + _SUFFIX]), bits, int(zero[p]))
            for p, idx in sel.flatten(jax.device_get(cstate["index"])).items()}

  def optimizer(trainable, base_tx):
    if codebook_lr is None:
      return base_tx
    labels = {p: "codebook" if _is_codebook(p, chosen) else "base"
              for p in sel.flatten(trainable)}
    return optax.partition({"base": base_tx, "codebook": optax.adam(codebook_lr)},
                           sel.unflatten(labels))

  return base.Method("share", init, apply, optimizer=optimizer, bits=bits_of, encode=encode,
                     masks=masks)



def _is_codebook(path: str, chosen: list[str]) -> bool:
  return path.endswith(_SUFFIX) and path[:-len(_SUFFIX)] in chosen


def _pack(index: np.ndarray, codebook: np.ndarray, bits: int, zero: int
          ) -> tuple[bytes, dict]:
  """The codes at ``bits`` bits (with zeros: only the nonzero ones and their
  positions, code 0 being the zero) and the float32 codebook."""
  flat = index.reshape(-1)
  if zero < 0:
    sections = {"values": packing.pack_codes(flat, bits)}
    sparse = {"symbols": {"values": [bits, int(flat.size)]}}
  else:
    sections, sparse = packing.pack_sparse(index, index != zero, bits,  # shaped: N:M
                                           lambda v: packing.pack_codes(v, bits), codes=True)
  payload, layout = packing.concat({**sections, "codebook": codebook.astype("<f4").tobytes()})
  return payload, {"shape": list(index.shape), "bits": bits, "zero": zero, "layout": layout,
                   **sparse}


def decode(exported: dict[str, tuple[bytes, dict]]) -> dict[str, np.ndarray]:
  """Inverse of the codec: ``{path: codebook[code]}``, 0 for the zero code;
  bit-identical to what ``apply`` gives the model."""
  out = {}
  for path, (payload, meta) in exported.items():
    parts = packing.split(payload, meta["layout"])
    shape, bits, zero = tuple(meta["shape"]), meta["bits"], meta["zero"]
    if not (isinstance(bits, int) and 1 <= bits <= 16 and zero in (-1, 0)):
      raise ValueError(f"{path}: bits {bits!r} not in [1, 16] or zero code {zero!r} not 0/-1")
    n = int(np.prod(shape))
    codebook = np.frombuffer(parts["codebook"], "<f4")
    if codebook.size != 2 ** bits:
      raise ValueError(f"{path}: codebook of {codebook.size} values for {bits}-bit codes")
    if zero == 0:  # fillers of the relative form decode to code 0, the zero
      index = packing.unpack_sparse(parts, meta, n, np.int64,
                                    lambda buf, m: packing.unpack_codes(buf, bits, m, False))
    else:
      if len(parts["values"]) < packing.packed_size(n, bits):
        raise ValueError(f"{path}: {len(parts['values'])} bytes cannot hold {n} codes")
      index = packing.unpack_codes(parts["values"], bits, n, False).astype(np.int64)
    values = np.where(index == zero, np.float32(0), codebook[index])
    out[path] = values.reshape(shape).astype(np.float32)
  return out


def onnx_weights(trainable: Any, cstate: Any) -> dict[str, registry.IntWeight]:
  """``{path: IntWeight(indices, codebook=...)}`` for ``export --format onnx``: the
  model's kernel is ``codebook[indices]`` (the zero code's entry 0), a Gather."""
  flat = sel.flatten(jax.device_get(trainable))
  zero = sel.flatten(jax.device_get(cstate["zero"]))
  out = {}
  for path, idx in sel.flatten(jax.device_get(cstate["index"])).items():
    table = np.array(flat[path + _SUFFIX], np.float32)
    if int(zero[path]) >= 0:
      table[int(zero[path])] = 0.0
    dtype = np.uint8 if table.size <= 256 else np.int32
    out[path] = registry.IntWeight(np.asarray(idx).astype(dtype), codebook=table)
  return out


registry.register(
    "share",
    base.Option("bits", int, 5, "index bits per weight: a codebook of 2**bits shared "
                "values per layer", range="[1, 16]"),
    base.Option("centroid-init", str, "linear", "k-means initialisation of the centroids "
                "(Han et al. 2016 compare them; linear is theirs)", INITS),
    base.Option("iters", int, 20, "Lloyd iterations of the k-means", range="[1, inf)"),
    base.Option("share-seed", int, 0, "seed of --centroid-init random", range="[0, inf)"),
    base.Option("codebook-lr", base.optional_float, 1e-4, "Adam learning rate of the codebooks "
                "(a centroid's gradient sums its members': thousands of weights); none: the "
                "base optimizer, Han et al.'s plain rule", range="(0, inf)"),
    decode=decode, onnx=onnx_weights,
    help="trained weight sharing: per-layer k-means codebooks of 2**bits values, "
         "centroids fine-tuned (Han et al. 2016; weight clustering)")(share_method)
