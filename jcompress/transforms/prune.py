"""Magnitude pruning with masks held through retraining (Han et al. 2015; Zhu & Gupta 2017).

The method ``prune`` (``jcompress compress --method prune``) keeps a boolean mask
per selected tensor in ``cstate["masks"]`` (nested like the params). ``apply``
zeroes the pruned entries (so their gradient is exactly zero), ``update``
re-zeroes them after every optimizer step and tightens the masks on the
schedule's steps, and ``optimizer`` drops the update of every masked-layer entry
that is exactly zero with an exactly zero gradient (it cannot see ``cstate``;
pruned entries always are, live ones only by coincidence, for one step), so
pruned weights never move, even under Adam's momentum and weight decay.

* Criterion: the smallest ``|w|`` (``--structure none``) or whole output
  channels, the last kernel axis (Dense ``(in, out)``, Conv ``(kh, kw, in, out)``),
  by their L1 or L2 norm (``--structure l1|l2``); a pruned channel's bias is
  masked too, so the neuron outputs exactly zero. ``--structure N:M`` (jaxpruner's
  ``NByM``, TF Model Optimization's ``sparsity_m_by_n``) keeps the N largest ``|w|``
  of every M consecutive weights along the input axis (-2) of each kernel, the
  pattern sparse tensor cores run (2:4); the schedules ramp the pruned count per
  group (``round(s * M)`` at stage sparsity ``s``) up to ``M - N``. The export
  stores the kept values and their in-group positions (``packing``'s ``nm`` form,
  chosen from the mask, also for the codes of a later quantize, share or binary);
  ``--execution nm`` runs the dense and 1x1 conv layers from the kept weights
  (:mod:`jcompress.nm`).
* Exact counts: a tensor of ``n`` weights (or ``n`` channels) at sparsity ``s``
  loses exactly ``round(s * n)`` of them; ties go to the lower flat index.
  ``--scope global`` ranks all selected weights together and prunes
  ``round(s * N)`` of the ``N``, so layers end at different sparsities.
* Masks only tighten: entries pruned earlier rank below every live one.
* ``--prune-schedule``: ``oneshot`` (prune at ``init``; the other schedule options
  are unused), ``iterative`` (``k =
  --iterations`` equal steps ``s * j / k``, ``j = 1..k``, at ``--begin-step + (j - 1)
  * --interval``) or ``gradual`` (Zhu & Gupta: at ``t = t0 + j dt``, ``j = 0..n``,
  ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3`` with ``t0 = --begin-step``,
  ``dt = --interval``, ``n dt = --ramp-steps``, ``s_i = --initial-sparsity``; frozen at
  ``s_f`` afterwards). A stage due at step 0 runs in ``init``.

>>> method = registry.build("prune", ["w"], sparsity="0.5")
>>> trainable, cstate = method.init({"w": jnp.array([[0.1, -3.0], [2.0, -0.2]])})
>>> trainable["w"].tolist(), cstate["masks"]["w"].tolist()
([[0.0, -3.0], [2.0, 0.0]], [[False, True], [True, False]])
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jcompress import nm, sparse
from jcompress.transforms import base, packing, registry
from jcompress.transforms import select as sel

from jcompress.transforms.magnitude import (SCHEDULES, SCOPES, STRUCTURES,  # noqa: F401
                                            check_masks, check_options, map_masked,
                                            Pruner, zero_pruned, parse_sparsity, parse_structure,
                                            schedule)


# ----------------------------------------------------------------------------
# The method.


def prune_method(paths: list[str], *, sparsity: str = "0.9", scope: str = "layer",
                 structure: str = "none", prune_schedule: str = "oneshot", iterations: int = 5,
                 interval: int = 100, ramp_steps: int = 1000, begin_step: int = 0,
                 initial_sparsity: float = 0.0) -> base.Method:
  """Magnitude pruning of ``paths`` (see the module docstring for the options).

  >>> m = registry.build("prune", ["w"], sparsity="0.75", prune_schedule="gradual",
  ...                interval=2, ramp_steps=4)
  >>> t, c = m.init({"w": jnp.arange(1.0, 9.0)})
  >>> int(c["masks"]["w"].sum()), int(m.update(t, c, 2)[1]["masks"]["w"].sum())
  (8, 3)
  """
  if not paths:
    raise ValueError("prune: no tensor selected")
  targets = check_options(paths, sparsity, scope, structure, prune_schedule, iterations,
                           interval, ramp_steps, begin_step, initial_sparsity)
  stages = {p: schedule(prune_schedule, s, initial=float(initial_sparsity),
                        begin_step=begin_step, interval=interval, ramp_steps=ramp_steps,
                        iterations=iterations) for p, s in targets.items()}
  pruner = Pruner(list(paths), scope, structure, stages)
  starts = pruner.starts
  t0, dt = starts[0], interval

  def init(params):
    flat = sel.flatten(params)
    masks = {p: jnp.ones(np.shape(flat[p]), bool) for p in pruner.owned(flat)}
    if t0 == 0:
      masks = pruner.prune(flat, masks, pruner.counts(flat)[0])
    return zero_pruned(params, masks), {"masks": sel.unflatten(masks)}

  def apply(trainable, cstate):
    masks = sel.flatten(cstate["masks"])
    check_masks(sel.flatten(trainable), masks, strict=False)
    return zero_pruned(trainable, masks)

  def update(trainable, cstate, step):
    flat, masks = sel.flatten(trainable), sel.flatten(cstate["masks"])
    check_masks(flat, masks, strict=False)
    if step is not None and (len(starts) > 1 or t0 > 0):
      table = jnp.asarray(pruner.counts(flat))
      stage = (step - t0) // dt
      due = (step >= t0) & ((step - t0) % dt == 0) & (stage < len(starts))
      counts = table[jnp.clip(stage, 0, len(starts) - 1)]
      masks = lax.cond(due, lambda: pruner.prune(flat, masks, counts), lambda: masks)
    return zero_pruned(trainable, masks), {"masks": sel.unflatten(masks)}

  def optimizer(trainable, base_tx):
    flat = sel.flatten(trainable)
    # A path a later method replaced (Tucker's factors) is no longer prune's to freeze.
    owned = (set(pruner.owned(flat)) if all(p in flat for p in pruner.paths)
             else {p for p in pruner.paths if p in flat})
    inner = optax.with_extra_args_support(base_tx)

    def update_fn(grads, state, params=None, **extra):
      if params is None:
        raise ValueError("prune: the optimizer needs the params: tx.update(grads, state, params)")
      updates, state = inner.update(grads, state, params, **extra)
      # The optimizer cannot see cstate. A pruned entry is exactly zero with an exactly
      # zero gradient (apply's where); its momentum and weight decay must not move it.
      flat_g, flat_p = sel.flatten(grads), sel.flatten(params)
      frozen = {p: (flat_g[p] == 0) & (flat_p[p] == 0) for p in owned
                if hasattr(flat_g.get(p), "shape")}
      return map_masked(lambda u, f: jnp.where(f, jnp.zeros((), u.dtype), u), updates,
                         frozen), state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)

  def masks(trainable, cstate):
    return sel.flatten(cstate["masks"])

  def encode(trainable, cstate, zeros):
    return export_arrays(trainable, cstate)

  def bits(trainable, cstate):  # dense 32-bit accounting; the sparse form is exported_bytes
    return {}

  return base.Method("prune", init, apply, update, optimizer, bits, encode=encode, masks=masks)


# ----------------------------------------------------------------------------
# Reports and export.


def sparsity_report(params: Any, cstate: Any) -> dict[str, Any]:
  """Per masked tensor and over all of them: size, nonzero count and sparsity.

  ``params`` may be the trainable or the forward params: the masks are applied.

  >>> m = registry.build("prune", ["w"], sparsity="0.25")
  >>> sparsity_report(*m.init({"w": jnp.arange(1.0, 5.0)}))["global"]
  {'size': 4, 'nonzero': 3, 'sparsity': 0.25}
  """
  flat, masks = sel.flatten(params), sel.flatten(cstate["masks"])
  check_masks(flat, masks)
  layers = {}
  for path, m in masks.items():
    n, nz = int(np.size(m)), int(np.count_nonzero(np.asarray(m) & (np.asarray(flat[path]) != 0)))
    layers[path] = {"size": n, "nonzero": nz, "sparsity": 1 - nz / n if n else 0.0}
  size = sum(v["size"] for v in layers.values())
  nonzero = sum(v["nonzero"] for v in layers.values())
  return {"layers": layers, "global": {"size": size, "nonzero": nonzero,
                                       "sparsity": 1 - nonzero / size if size else 0.0}}


def _f32(values: np.ndarray) -> bytes:
  return np.asarray(values, "<f4").tobytes()


def _from_f32(buf: bytes, n: int) -> np.ndarray:
  return np.frombuffer(buf, "<f4", count=n)


def _encode(w: np.ndarray, mask: np.ndarray) -> tuple[bytes, dict]:
  """The smallest of dense float32, a 1-bit mask + kept values, or relative indices
  at the best width (2..16 bits) + values (fillers included)."""
  sections, meta = packing.pack_sparse(w.astype("<f4"), mask, 32, _f32)
  payload, layout = packing.concat(sections)
  return payload, {**meta, "shape": list(w.shape), "dense_bytes": 4 * int(np.size(w)),
                   "layout": layout}


def export_arrays(trainable: Any, cstate: Any) -> dict[str, tuple[bytes, dict]]:
  """The bytes to store per masked tensor, in its most compact form.

  The kept entries (mask True, in C order) are float32 values; where they are is
  stored as a 1-bit mask (``bitmask``), or as ``relative`` indices (the zeros
  skipped before each entry, ``index_bits`` wide, with zero-valued filler entries
  for longer runs, as in Deep Compression); a dense tensor stays ``dense``; an
  ``N:M`` mask (``--structure N:M``) gives ``nm``: the kept values group by group
  and their in-group ``positions`` (:func:`packing.pack_sparse`). The
  meta holds ``format``, ``shape``, ``kept``, ``dense_bytes`` and the ``layout``;
  the payload length is the tensor's stored size.

  >>> m = registry.build("prune", ["w"], sparsity="0.99")
  >>> payload, meta = export_arrays(*m.init({"w": jnp.arange(1.0, 1001.0)}))["w"]
  >>> meta["format"], meta["index_bits"], len(payload), meta["dense_bytes"]
  ('relative', 10, 53, 4000)
  """
  flat, masks = sel.flatten(trainable), sel.flatten(cstate["masks"])
  check_masks(flat, masks, strict=False)
  return {path: _encode(np.asarray(flat[path]), np.asarray(m)) for path, m in masks.items()
          if path in flat}


def import_arrays(exported: dict[str, tuple[bytes, dict]]) -> dict[str, np.ndarray]:
  """Inverse of :func:`export_arrays`: ``{path: float32 tensor}``, bit-identical to
  the pruned tensors ``apply`` gives the model.

  Raises:
    ValueError: a tensor has an unknown format.
  """
  out = {}
  for path, (payload, meta) in exported.items():
    shape = tuple(meta["shape"])
    out[path] = packing.unpack_sparse(packing.split(payload, meta["layout"]), meta,
                                      int(np.prod(shape)), np.float32, _from_f32).reshape(shape)
  return out


def _sparse_matrices(methods, index, trainable, cstate) -> dict[str, sparse.SparseMatrix]:
  """CSR matrices of the pruned dense and 1x1 conv kernels, as the model runs them."""
  kernels = sel.flatten(jax.device_get(base.stack(list(methods)).apply(trainable, cstate)))
  pruned = [p for i, m in enumerate(methods) if m.masks is not None
            for p in m.masks(trainable, cstate[str(i)])]
  return {p: sparse.from_dense(kernels[p], "csr") for p in dict.fromkeys(pruned)
          if np.ndim(kernels[p]) == 2
          or (np.ndim(kernels[p]) == 4 and np.shape(kernels[p])[:2] == (1, 1))}


def _sparse(methods, index, matrices, cstate):
  return sparse.sparse_execution(matrices)


def _nm_matrices(methods, index, trainable, cstate) -> dict[str, Any]:
  """:class:`jcompress.nm.NMMatrix` of this method's N:M-pruned dense and 1x1 conv
  kernels, as the model runs them (after any later method of the plan)."""
  kernels = sel.flatten(jax.device_get(base.stack(list(methods)).apply(trainable, cstate)))
  masks = jax.device_get(methods[index].masks(trainable, cstate[str(index)]))
  out = {}
  for path, mask in masks.items():
    shape = np.shape(kernels.get(path))
    if not (len(shape) == 2 or (len(shape) == 4 and shape[:2] == (1, 1))):
      continue  # biases, spatial convs: they run densely
    pattern = packing.nm_pattern(np.asarray(mask))
    if pattern is None:
      raise ValueError(f"--execution nm runs kernels pruned with --structure N:M; {path!r} "
                       "is not (use --execution sparse)")
    out[path] = nm.from_dense(kernels[path], *pattern)
  return out


def _nm(methods, index, matrices, cstate):
  return sparse.sparse_execution(matrices, nm.matmul)


_PRUNE_OPTIONS = (
    base.Option("sparsity", str, "0.9", "fraction of weights pruned: one value, or rules "
                "'REGEX=S,...' over the selected paths (first match wins, a bare value is "
                "the default), e.g. 'fc1=0.92,fc2=0.91,0.74'"),
    base.Option("scope", str, "layer", "one threshold per layer or one across all "
                "selected layers", SCOPES),
    base.Option("structure", parse_structure, "none", "prune single weights (none), whole "
                "output channels by their l1 / l2 norm, or N:M (e.g. 2:4: the N largest of "
                "every M consecutive weights along the input axis; sets --sparsity to "
                "1 - N/M)"),
    base.Option("prune-schedule", str, "oneshot", "oneshot at the start; iterative in "
                "--iterations equal steps every --interval steps; gradual: Zhu & Gupta's "
                "cubic ramp over --ramp-steps", SCHEDULES),
    base.Option("iterations", int, 5, "iterative: pruning steps to reach --sparsity",
                range="[1, inf)"),
    base.Option("interval", int, 100, "iterative / gradual: optimizer steps between mask updates",
                range="[1, inf)"),
    base.Option("ramp-steps", int, 1000, "gradual: optimizer steps of the ramp (n * interval)",
                range="[1, inf)"),
    base.Option("begin-step", int, 0, "iterative / gradual: step of the first mask update",
                range="[0, inf)"),
    base.Option("initial-sparsity", float, 0.0, "gradual: sparsity at --begin-step",
                range="[0, 1)"),
)
registry.register(
    "prune", *_PRUNE_OPTIONS, decode=import_arrays, renamed={"steps": "ramp_steps"},
    executions={"sparse": base.ExecutionMode(
        _sparse, "pruned dense / 1x1 conv layers as CSR products", prepare=_sparse_matrices,
        skips_zeros=True), "nm": base.ExecutionMode(
        _nm, "N:M-pruned dense / 1x1 conv layers as gathered products of their kept "
        f"weights, expanded to dense from {nm.GATHER_ROWS} rows", prepare=_nm_matrices,
        skips_zeros=True)},
    help="magnitude pruning (per layer or global, weights or channels) with masks held "
         "during fine-tuning")(prune_method)
