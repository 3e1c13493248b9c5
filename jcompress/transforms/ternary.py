"""Trained ternary quantization (TTQ; Zhu, Han, Mao, Dally, ICLR 2017).

Each selected kernel ``w`` keeps a full-precision latent copy and two learned
per-layer scales ``w_p``, ``w_n`` (trainable leaves ``<kernel path>_wp`` and
``<kernel path>_wn``, scalars). The forward pass uses the ternary kernel

    w_t = w_p  where w > delta,   0 where |w| <= delta,   -w_n where w < -delta,

with ``delta = threshold * max|w|`` recomputed from the latent kernel at every
call (a constant for differentiation). With ``g = dL/dw_t`` the custom gradients
are: latent ``w_p * g`` on the positive set, ``g`` on the zero set, ``w_n * g`` on
the negative set; ``dL/dw_p = sum of g over the positive set``; and
``dL/dw_n = -sum of g over the negative set``, the true derivative (``w_t = -w_n``
there), as the official TF code computes it. The paper and the PyTorch port write
``+sum``, which moves ``w_n`` the wrong way.

Optimizers (``Method.optimizer``, via ``optax.partition``, formerly
``multi_transform``): the latent kernels and the scales each get their own
optimizer (default Adam at 1e-4, the PyTorch port's rate for both), everything
else the base optimizer; ``--latent-lr none`` / ``--scale-lr none`` hand that group
to the base optimizer instead.

>>> w = jnp.array([0.9, 0.02, -0.5, 0.3])
>>> ternarize(w, 1.5, 0.5, threshold=0.05).tolist()
[1.5, 0.0, -0.5, 1.5]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcompress.transforms import base, lowbits, registry
from jcompress.transforms import packing as bitpack
from jcompress.transforms import select as sel

SCALE_INITS = ("one", "mean")
SCALES = ("learned", "fixed")
OPTIMIZERS = ("adam", "sgd")
PACKINGS = ("2bit", "trit5")
_SUFFIXES = ("_wp", "_wn")


@jax.custom_vjp
def _ternarize(w, w_p, w_n, delta):
  return _ternarize_fwd(w, w_p, w_n, delta)[0]


def _ternarize_fwd(w, w_p, w_n, delta):
  pos, neg = w > delta, w < -delta
  return jnp.where(pos, w_p, jnp.where(neg, -w_n, 0.0)), (pos, neg, w_p, w_n, delta)


def _ternarize_bwd(residuals, g):
  pos, neg, w_p, w_n, delta = residuals
  g_w = jnp.where(pos, w_p * g, jnp.where(neg, w_n * g, g))
  g_wp = jnp.sum(jnp.where(pos, g, 0.0)).reshape(jnp.shape(w_p))
  g_wn = -jnp.sum(jnp.where(neg, g, 0.0)).reshape(jnp.shape(w_n))
  return g_w, g_wp, g_wn, jnp.zeros_like(delta)


_ternarize.defvjp(_ternarize_fwd, _ternarize_bwd)


def threshold_delta(w: jax.Array, threshold: float | jax.Array) -> jax.Array:
  """``delta = threshold * max|w|`` (no gradient flows through it)."""
  return jax.lax.stop_gradient(threshold * jnp.max(jnp.abs(w)))


def ternarize(w: jax.Array, w_p: jax.Array, w_n: jax.Array, *,
              threshold: float | jax.Array) -> jax.Array:
  """The ternary kernel in {-w_n, 0, w_p} with the TTQ custom gradients (module doc).

  Args:
    w: the latent full-precision kernel.
    w_p, w_n: the positive and negative scales (scalars, ``w_n > 0`` means the
      negative value is ``-w_n``).
    threshold: the fraction ``t`` of ``max|w|`` below which weights become 0.

  >>> g = jax.grad(lambda w_n: ternarize(jnp.array([-1.0, 0.5]), 1.0, w_n, threshold=0.1).sum())
  >>> float(g(2.0))  # true derivative: one weight at -w_n
  -1.0
  """
  w = jnp.asarray(w, jnp.float32)
  return _ternarize(w, jnp.asarray(w_p, jnp.float32), jnp.asarray(w_n, jnp.float32),
                    threshold_delta(w, threshold))


def ternary_codes(w: jax.Array, threshold: float | jax.Array) -> jax.Array:
  """The trits of ``w``: +1 above ``delta``, -1 below ``-delta``, else 0 (int8)."""
  delta = threshold_delta(w, threshold)
  return (jnp.asarray(w > delta, jnp.int8) - jnp.asarray(w < -delta, jnp.int8))


def _from_trits(trits: jax.Array, w_p: jax.Array, w_n: jax.Array) -> jax.Array:
  # The same selections as _ternarize's forward, so rebuilt kernels are bit-identical.
  return jnp.where(trits > 0, jnp.asarray(w_p, jnp.float32),
                   jnp.where(trits < 0, -jnp.asarray(w_n, jnp.float32), 0.0))


# --- Method ----------------------------------------------------------------------


def _initial_scales(path: str, w: jax.Array, threshold: float, how: str, shared: bool
                    ) -> tuple[jax.Array, jax.Array]:
  if how == "one":
    return jnp.ones((), jnp.float32), jnp.ones((), jnp.float32)
  trits = np.asarray(ternary_codes(w, threshold))
  w = np.asarray(w, np.float32)
  if shared:  # one scale: the mean magnitude of every weight beyond delta (TWN's alpha)
    if not trits.any():
      raise ValueError(f"{path} has no weight beyond delta: --scale-init mean is undefined "
                       "for it; use --scale-init one or another --threshold")
    scale = jnp.asarray(np.abs(w[trits != 0]).mean(), jnp.float32)
    return scale, scale
  for sign, name in ((1, "above delta"), (-1, "below -delta")):
    if not (trits == sign).any():
      raise ValueError(f"{path} has no weight {name}: --scale-init mean is undefined for it; "
                       f"use --scale-init one or another --threshold")
  return (jnp.asarray(w[trits == 1].mean(), jnp.float32),
          jnp.asarray(-w[trits == -1].mean(), jnp.float32))


def _group_tx(name: str, lr: float | None, base_tx: optax.GradientTransformation
              ) -> optax.GradientTransformation:
  if lr is None:
    return base_tx
  return optax.adam(lr) if name == "adam" else optax.sgd(lr, momentum=0.9)


def ttq_method(paths: list[str], *, threshold: float = 0.05, scale_init: str = "mean",
               latent_optimizer: str = "adam", latent_lr: float | None = 1e-4,
               scale_optimizer: str = "adam", scale_lr: float | None = 1e-4,
               packing: str = "2bit", scales: str = "learned") -> base.Method:
  """TTQ of the kernels at ``paths`` (see the module docstring).

  ``scales="fixed"``: weights in ``{-1, 0, 1}`` times one scale per layer that does
  not train (``w_p = w_n``, the mean magnitude beyond delta at ``init``, or 1.0 with
  ``scale_init="one"``): the fixed-ternary baseline TTQ compares with; only the
  latent kernels learn.

  ``trainable`` is the params plus scalar leaves ``<path>_wp``, ``<path>_wn``;
  ``cstate`` holds each kernel's ``threshold``; ``apply`` returns the model's
  params with ternary kernels.

  >>> m = registry.build("ttq", ["fc1/kernel"])
  >>> params = {"fc1": {"kernel": jnp.array([[0.5, -1.0]]), "bias": jnp.zeros(2)}}
  >>> trainable, cstate = m.init(params)
  >>> sorted(trainable["fc1"]), m.apply(trainable, cstate)["fc1"]["kernel"].tolist()
  (['bias', 'kernel', 'kernel_wn', 'kernel_wp'], [[0.5, -1.0]])
  """
  chosen = list(paths)
  scale_paths = {p + s for p in chosen for s in _SUFFIXES}
  bits_per_weight = 2.0 if packing == "2bit" else 8 / bitpack.TRITS_PER_BYTE

  def init(params):
    flat = sel.flatten(params)
    sel.check_new_leaves(flat, chosen, _SUFFIXES, "ttq")
    trainable = {}
    for path, leaf in flat.items():
      trainable[path] = leaf
      if path in chosen:
        trainable[path + "_wp"], trainable[path + "_wn"] = _initial_scales(
            path, leaf, threshold, scale_init, scales == "fixed")
    cstate = sel.unflatten({f"{p}/threshold": jnp.asarray(threshold, jnp.float32)
                            for p in chosen})
    return sel.unflatten(trainable), cstate

  def apply(trainable, cstate):
    flat, thresholds = sel.flatten(trainable), sel.flatten(cstate)
    return sel.unflatten({
        path: ternarize(leaf, flat[path + "_wp"], flat[path + "_wn"],
                        threshold=thresholds[path + "/threshold"])
        if path in chosen and path + "_wp" in flat else leaf
        for path, leaf in flat.items() if path not in scale_paths})

  def optimizer(trainable, base_tx):
    labels = {p: "latent" if p in chosen else "scale" if p in scale_paths else "base"
              for p in sel.flatten(trainable)}
    return optax.partition({"base": base_tx,
                            "latent": _group_tx(latent_optimizer, latent_lr, base_tx),
                            "scale": optax.set_to_zero() if scales == "fixed" else
                            _group_tx(scale_optimizer, scale_lr, base_tx)},
                           sel.unflatten(labels))

  def bits(trainable, cstate):
    del trainable, cstate
    return {p: bits_per_weight for p in chosen}

  def encode(trainable, cstate, zeros):
    return export_arrays(trainable, cstate, packing=packing, masks=zeros)

  return base.Method("ttq", init, apply, optimizer=optimizer, bits=bits, encode=encode)


def _layers(trainable: Any, cstate: Any):
  flat = sel.flatten(trainable)
  for key, threshold in sel.flatten(cstate).items():
    path = key.rsplit("/", 1)[0]
    if path not in flat:  # a later method of the plan replaced it
      continue
    yield path, flat[path], flat[path + "_wp"], flat[path + "_wn"], threshold


def ternary_stats(trainable: Any, cstate: Any) -> tuple[list[dict], dict]:
  """Per-layer and total counts of ``+w_p``, ``0`` and ``-w_n`` weights.

  Args:
    trainable, cstate: the ``ttq`` method's state (``cstate`` names the layers).

  Returns:
    ``(rows, total)``: one dict per ternary kernel with ``path``, ``size``,
    ``positive``, ``zero``, ``negative``, ``sparsity`` (fraction of zeros),
    ``w_p``, ``w_n``, ``threshold`` and ``delta``; ``total`` sums the counts over
    all layers (``path`` = "total") with the overall sparsity.

  >>> m = registry.build("ttq", ["w"])
  >>> rows, total = ternary_stats(*m.init({"w": jnp.array([0.9, 0.02, -0.5, 0.3])}))
  >>> {k: rows[0][k] for k in ("positive", "zero", "negative", "sparsity")}
  {'positive': 2, 'zero': 1, 'negative': 1, 'sparsity': 0.25}
  """
  rows = []
  for path, w, w_p, w_n, threshold in _layers(trainable, cstate):
    trits = np.asarray(ternary_codes(w, threshold))
    size = int(trits.size)
    rows.append({"path": path, "size": size, "positive": int((trits == 1).sum()),
                 "zero": int((trits == 0).sum()), "negative": int((trits == -1).sum()),
                 "sparsity": float((trits == 0).sum() / max(size, 1)),
                 "w_p": float(w_p), "w_n": float(w_n), "threshold": float(threshold),
                 "delta": float(threshold_delta(w, threshold))})
  total = {k: sum(r[k] for r in rows) for k in ("size", "positive", "zero", "negative")}
  total = {"path": "total", **total, "sparsity": total["zero"] / max(total["size"], 1)}
  return rows, total


def export_arrays(trainable: Any, cstate: Any, *, packing: str = "2bit",
                  masks: dict[str, Any] | None = None) -> dict[str, tuple[bytes, dict]]:
  """The bytes to store per ternary kernel: the trits (``2bit``: two's complement
  2-bit codes; ``trit5``: five per byte), then ``w_p``, ``w_n`` as float32.

  Pass the method's ``--packing`` so the bytes match its ``bits``. With ``masks``
  (``{path: bool array}`` of an earlier pruning step) only the kept trits are
  stored, with their positions (:func:`bitpack.pack_sparse`; meta ``format``).

  >>> m = registry.build("ttq", ["w"], scale_init="one")
  >>> out = export_arrays(*m.init({"w": jnp.ones((10,))}), packing="trit5")
  >>> len(out["w"][0]), out["w"][1]["layout"]
  (10, {'trits': [0, 2], 'scales': [2, 8]})
  """
  if packing not in PACKINGS:
    raise ValueError(f"--packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
  out = {}
  for path, w, w_p, w_n, threshold in _layers(trainable, cstate):
    trits = np.asarray(ternary_codes(w, threshold))
    pack = ((lambda v: bitpack.pack_codes(v, 2)) if packing == "2bit" else bitpack.pack_trits)
    sparse = {}
    if masks is not None and path in masks:
      trit_sections, sparse = bitpack.pack_sparse(trits, np.asarray(masks[path]), 2, pack,
                                                  codes=packing == "2bit")
    else:
      trit_sections = {"trits": pack(trits)}
      if packing == "2bit":
        sparse = {"symbols": {"trits": [2, int(trits.size)]}}
    payload, layout = bitpack.concat(
        {**trit_sections, "scales": np.asarray([w_p, w_n], "<f4").tobytes()})
    out[path] = payload, {"shape": list(trits.shape), "packing": packing, "layout": layout,
                          **sparse}
  return out


def import_arrays(exported: dict[str, tuple[bytes, dict]]) -> dict[str, jax.Array]:
  """Inverse of :func:`export_arrays`: ``{path: ternary kernel}``, bit-identical to the
  kernels ``apply`` gives the model."""
  out = {}
  for path, (payload, meta) in exported.items():
    parts = bitpack.split(payload, meta["layout"])
    shape = tuple(meta["shape"])
    n = int(np.prod(shape))
    unpack = ((lambda buf, k: bitpack.unpack_codes(buf, 2, k, signed=True))
              if meta["packing"] == "2bit" else bitpack.unpack_trits)
    trits = (bitpack.unpack_sparse(parts, meta, n, np.int8, unpack) if "format" in meta
             else unpack(parts["trits"], n))
    w_p, w_n = np.frombuffer(parts["scales"], "<f4")
    out[path] = _from_trits(jnp.asarray(trits.reshape(shape)), w_p, w_n)
  return out


def stablehlo_weights(trainable: Any, cstate: Any) -> dict[str, Any]:
  """``{path: () -> ternary kernel}`` for ``export --format stablehlo``: each kernel
  rebuilt in the graph from its trits (2 bits, four to a byte: :mod:`lowbits`) and
  float32 ``w_p``, ``w_n``, which the serialized module then holds as constants.

  >>> m = registry.build("ttq", ["w"], scale_init="one")
  >>> stablehlo_weights(*m.init({"w": jnp.array([1.0, -1.0, 0.0])}))["w"]().tolist()
  [1.0, -1.0, 0.0]
  """
  out = {}
  for path, w, w_p, w_n, threshold in _layers(jax.device_get(trainable),
                                              jax.device_get(cstate)):
    trits = lowbits.constant(np.asarray(ternary_codes(w, threshold)), 2, signed=True)
    out[path] = lambda t=trits, p=np.float32(w_p), n=np.float32(w_n): _from_trits(t(), p, n)
  return out


def onnx_weights(trainable: Any, cstate: Any) -> dict[str, registry.IntWeight]:
  """``{path: IntWeight}`` for ``export --format onnx``: the trits as int8 codes
  ``+round(w_p / s)``, ``0``, ``-round(w_n / s)`` with ``s = max(w_p, w_n) / 127``, so
  ONNX Runtime's int8 kernels run them (``w_p``, ``w_n`` within ``s / 2``).

  >>> m = registry.build("ttq", ["w"], scale_init="one")
  >>> onnx_weights(*m.init({"w": jnp.array([1.0, -1.0, 0.0])}))["w"].codes.tolist()
  [127, -127, 0]
  """
  out = {}
  for path, w, w_p, w_n, threshold in _layers(jax.device_get(trainable),
                                              jax.device_get(cstate)):
    trits = np.asarray(ternary_codes(w, threshold))
    scale = np.float32(max(float(w_p), float(w_n), 1e-12) / 127)
    codes = np.where(trits > 0, np.round(float(w_p) / scale),
                     np.where(trits < 0, -np.round(float(w_n) / scale), 0)).astype(np.int8)
    out[path] = registry.IntWeight(codes, scale, np.int8(0))
  return out


_TTQ_OPTIONS = (
    base.Option("threshold", float, 0.05, "ternary threshold t: delta = t * max|w|, in (0, 1)",
                range="(0, 1)"),
    base.Option("scale-init", str, "mean", "w_p, w_n start at 1.0 or at the mean magnitude "
                "above the threshold (with one, a one-shot LeNet-5 had test loss 9,518 and "
                "MicroBotNet 4e29; with mean, 0.58 and 2.32)", SCALE_INITS),
    base.Option("latent-optimizer", str, "adam", "optimizer of the latent kernels "
                "(sgd: momentum 0.9)", OPTIMIZERS),
    base.Option("latent-lr", base.optional_float, 1e-4, "learning rate of the latent kernels; "
                "none = the base optimizer drives them", range="(0, inf)"),
    base.Option("scale-optimizer", str, "adam", "optimizer of the scales w_p, w_n "
                "(sgd: momentum 0.9)", OPTIMIZERS),
    base.Option("scale-lr", base.optional_float, 1e-4, "learning rate of the scales; "
                "none = the base optimizer drives them", range="(0, inf)"),
    base.Option("packing", str, "2bit", "ternary storage: 2 bits per weight or 5 trits "
                "per byte (1.6 bits)", PACKINGS),
    base.Option("scales", str, "learned", "learned: w_p and w_n train (TTQ); fixed: one "
                "scale per layer (w_p = w_n, the mean magnitude beyond delta) that does not "
                "train, the fixed-ternary {-1, 0, 1} baseline", SCALES),
)
registry.register("ttq", *_TTQ_OPTIONS, decode=import_arrays, stablehlo=stablehlo_weights,
                  onnx=onnx_weights,
                  help="trained ternary quantization with learned per-layer scales w_p, w_n"
                  )(ttq_method)
