"""Loading trained runs: a workdir's checkpoint (``load_workdir``), or a file
``jcompress export`` wrote where a source run is expected (``load_source``), and
the :class:`~jcompress.transforms.base.Context` methods load teachers through."""

from __future__ import annotations

import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jcompress import data, models, parallel
from jcompress.checkpoint import BrokenCheckpointError, Checkpoints, mismatches
from jcompress.train.runs import warn
from jcompress.train.state import TrainState
from jcompress.train.step import init_state, init_variables
from jcompress.transforms import base, registry


def build_model(name: str, model_config: dict, dataset: str) -> nn.Module:
  spec = data.spec(dataset)
  return models.create(name, num_classes=spec.num_classes, input_shape=spec.image_shape,
                       **model_config)



def _stored_structure(ckpts: Checkpoints, epoch: int, state: TrainState, model: nn.Module,
                      method: base.Method, input_shape: tuple[int, ...]) -> TrainState:
  """``state`` with params and cstate shaped as checkpoint ``epoch`` stores them, where
  they differ and ``method.apply`` maps the stored ones onto the model's params: a
  method may size its tensors from the trained weights (Tucker ranks by energy,
  VBMF or a budget), which ``init`` on fresh weights does not reproduce. Otherwise
  ``state`` as it is (``check_fits`` then names the differences)."""
  stored = ckpts.stored_shapes(epoch)
  if not mismatches({"params": state.params, "cstate": state.cstate},
                               {"params": stored["params"], "cstate": stored["cstate"]}):
    return state
  zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
  params, cstate = zeros(stored["params"]), zeros(stored["cstate"])
  try:
    applied = jax.eval_shape(method.apply, params, cstate)
  except (ValueError, TypeError, KeyError, AttributeError):
    return state
  expected = jax.eval_shape(lambda: init_variables(model, input_shape, 0))["params"]
  return state if mismatches(expected, applied) else state.replace(
      params=params, cstate=cstate)


def context(mesh: Mesh | None = None, dataset: str | None = None,
            data_dir: str | None = None) -> base.Context:
  """What methods' ``prepare``/``extra`` hooks may use: the mesh, trained runs
  loaded by workdir (a teacher) as ``(model, variables, meta)`` on that mesh, and
  with ``dataset`` its first training images, normalised (loaded when asked for)."""
  def images(n: int):
    ds, s = data.load(dataset, data_dir), data.spec(dataset, data_dir)
    n = min(int(n), len(ds.train_images))
    batch = next(data.batches(ds.train_images[:n], ds.train_labels[:n], n, mean=s.mean,
                              std=s.std, pad=False, prefetch=0))
    return jax.device_get(batch["image"])

  def load_model(source: str):
    model, state, meta, method = load_source(source, mesh=mesh)
    variables = {"params": method.apply(state.params, state.cstate)}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
    return model, variables, meta
  return base.Context(mesh=mesh, load_model=load_model,
                      images=images if dataset is not None else None)


def load_source(source: str | os.PathLike, *, mesh: Mesh | None = None
                ) -> tuple[nn.Module, TrainState, dict, base.Method]:
  """``load_workdir(source)`` for a workdir; for a file ``jcompress export`` wrote
  (``--init-from``/``--from``/``--teacher`` accept published weights), the model
  its header names with the decoded tensors as plain float params: a run with no
  compression plan (the file's methods are baked into its weights), epoch 0."""
  if not os.path.isfile(source):
    return load_workdir(source, mesh=mesh)
  from jcompress import measure  # pylint: disable=import-outside-toplevel  (imports loop)
  model, state, header, _ = measure.load_exported(source)
  state = state.replace(params=jax.tree.map(jnp.asarray, state.params),
                        batch_stats=jax.tree.map(jnp.asarray, state.batch_stats),
                        step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0))
  state = parallel.replicate(state, parallel.data_mesh() if mesh is None else mesh)
  meta = {**header, "compression": [], "epoch": 0, "exported_from": header.get("compression")}
  return model, state, meta, registry.from_plan([])


def load_workdir(workdir: str | os.PathLike, which: str | int = "latest", *,
                 mesh: Mesh | None = None) -> tuple[nn.Module, TrainState, dict, base.Method]:
  """Rebuilds the model and compression method of a workdir and restores
  checkpoint ``which`` into them, replicated on ``mesh`` (default: all devices),
  whatever the number of devices that wrote it. Only reads the workdir.

  Returns ``(model, state, meta, method)``; ``state`` holds params (the trainable
  tree of ``method``), batch_stats and cstate; its optimizer state is not restored.
  The model runs with ``method.apply(state.params, state.cstate)``.

  ``latest`` is the newest complete checkpoint: broken newer ones (a folder
  missing, unreadable data) are skipped with a warning naming them.

  Raises:
    FileNotFoundError: no checkpoints.
    CheckpointError (a ValueError): the checkpoint is broken (for ``latest``: all
      are), damaged (checksum), or holds non-finite values; the message names it.
  """
  workdir = pathlib.Path(workdir)
  if not (workdir / "checkpoints").is_dir():
    raise FileNotFoundError(f"--workdir {workdir} has no checkpoints; train into it first")
  ckpts = Checkpoints(workdir, read_only=True)
  try:
    candidates = ckpts.newest_first() if which == "latest" else [ckpts.resolve(which)]
    if not candidates:
      raise FileNotFoundError(f"no checkpoint in {ckpts.directory}")
    broken: list[tuple[int, str]] = []
    for epoch in candidates:
      try:
        model, state, meta, method = _load(ckpts, epoch, mesh)
        break
      except BrokenCheckpointError as e:
        if which != "latest":
          raise
        broken.append((epoch, e.reason))
    else:
      raise BrokenCheckpointError(ckpts.directory, "no complete checkpoint in it ("
                                  + "; ".join(f"epoch {e}: {p}" for e, p in broken) + ")")
    for e, problem in broken:
      warn(f"checkpoint {ckpts.path(e)} is broken ({problem}); using epoch {epoch}")
  finally:
    ckpts.close()
  return model, state, {**meta, "epoch": epoch}, method


def _load(ckpts: Checkpoints, epoch: int, mesh: Mesh | None
          ) -> tuple[nn.Module, TrainState, dict, base.Method]:
  meta = ckpts.meta(epoch)
  model = build_model(meta["model"], meta["model_config"], meta["dataset"])
  method = registry.from_plan(meta["compression"])
  state = init_state(model, optax.identity(), tuple(meta["input_shape"]), 0, method)
  state = _stored_structure(ckpts, epoch, state, model, method, tuple(meta["input_shape"]))
  ckpts.check_fits(epoch, {"params": state.params, "batch_stats": state.batch_stats},
                   f"model {meta['model']}")
  state = parallel.replicate(state, parallel.data_mesh() if mesh is None else mesh)
  return model, ckpts.restore(epoch, state, model_only=True), meta, method
