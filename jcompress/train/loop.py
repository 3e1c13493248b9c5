"""``train_and_evaluate(config, workdir)``: the epoch loop, resumption and evaluation."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, ContextManager

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm import tqdm

from jcompress import atomic, data, models, parallel, workdir_lock
from jcompress.data import order
from jcompress.checkpoint import Checkpoints
from jcompress.train import optim, tensorboard
from jcompress.train.runs import check_destination, check_finite, \
    check_finite_state, check_saved_run, clear_run, divergence_limit, read_metrics, resume, \
    source_differences
# Re-exported: loading runs lives in restore.py.
from jcompress.train.restore import build_model, context, load_source, load_workdir  # noqa: F401
from jcompress.train.state import TrainState
from jcompress.train.step import DTYPES, eval_step, init_state, train_step
from jcompress.transforms import base, registry
from jcompress.transforms.select import flatten


# What ``train`` uses for an option (``models.RECIPE_KEYS``) that neither the caller nor
# the model's recipe (``models.recipe``) sets.
GENERIC_RECIPE = {"epochs": 10, "lr": 0.05, "optimizer": "sgd", "momentum": 0.9,
                  "weight_decay": 0.0, "schedule": "cosine", "warmup_epochs": 0.0}
# What ``compress`` fine-tunes with unless told otherwise (``jcompress compress``'s
# defaults): every recipe option, so a model's training recipe never applies to it.
FINE_TUNE_DEFAULTS = GENERIC_RECIPE | {"epochs": 0, "lr": 1e-3, "schedule": "constant"}


@dataclasses.dataclass
class TrainConfig:
  """Options of ``jcompress train`` (the CLI flags have the same names).

  The recipe options (``models.RECIPE_KEYS``: epochs, lr, optimizer, momentum,
  weight_decay, schedule, warmup_epochs) default to None: the model's recipe,
  else ``GENERIC_RECIPE``; :meth:`resolved` fills them in, and
  ``train_and_evaluate`` saves and compares those values.
  """
  model: str
  dataset: str
  model_config: dict[str, Any] = dataclasses.field(default_factory=dict)
  data_dir: str | None = None
  epochs: int | None = None
  batch_size: int = 128
  eval_batch_size: int = 1000
  lr: float | None = None
  optimizer: str | None = None
  momentum: float | None = None
  weight_decay: float | None = None
  schedule: str | None = None
  warmup_epochs: float | None = None
  decay_epochs: tuple[float, ...] = ()
  decay_factor: float = 0.1
  label_smoothing: float = 0.0
  augment: bool | None = None
  train_size: int | None = None
  test_size: int | None = None
  seed: int = 0
  keep: int = 2
  save_every: int = 1
  init_from: str | None = None
  dtype: str = "float32"  # forward/backward compute dtype (step.DTYPES)
  tensorboard: bool | None = None  # None: event files when tensorboardX is installed
  log_every: int = 50  # steps between per-step TensorBoard scalars
  compression: list[dict] = dataclasses.field(default_factory=list)
  # Start afresh: the workdir's earlier checkpoints, metrics.jsonl and config.json are
  # removed first (instead of resuming, or refusing a run with other settings).
  overwrite: bool = False

  def resolved(self) -> TrainConfig:
    """This config with each recipe option left None taken from the model's recipe
    (``models.recipe``), else from ``GENERIC_RECIPE``.

    >>> TrainConfig(model="lenet5", dataset="mnist", epochs=2).resolved().lr
    0.01
    """
    recipe = GENERIC_RECIPE | models.recipe(self.model)
    return dataclasses.replace(self, **{k: recipe[k] for k in GENERIC_RECIPE
                                        if getattr(self, k) is None})

  def validate(self) -> None:
    """Raises ValueError naming the first bad option (of the :meth:`resolved` config)."""
    c = self.resolved()
    positive = ("batch_size", "eval_batch_size", "save_every", "keep", "log_every")
    if c.epochs < (0 if c.init_from else 1):
      raise ValueError(f"--epochs must be at least {0 if c.init_from else 1}, got {c.epochs}")
    for name in positive:
      if getattr(c, name) < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(c, name)}")
    if not 0 <= c.label_smoothing < 1:
      raise ValueError(f"--label-smoothing must be in [0, 1), got {c.label_smoothing}")
    if c.test_size is not None and c.test_size < 1:
      raise ValueError(f"--test-size must be at least 1, got {c.test_size}")
    if c.train_size is not None and c.train_size < c.batch_size:
      raise ValueError(f"--train-size {c.train_size} is smaller than --batch-size {c.batch_size}")
    for name in ("lr", "momentum", "weight_decay", "warmup_epochs", "decay_factor",
                 "label_smoothing"):
      value = getattr(c, name)
      if not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value!r}")
    if not (isinstance(c.seed, int) and 0 <= c.seed <= 2 ** 63 - 1):
      raise ValueError(f"--seed must be an integer in [0, 2**63 - 1] (JAX's PRNGKey takes "
                       f"an int64), got {c.seed!r}")
    if c.warmup_epochs < 0 or not 0 < c.decay_factor <= 1 or c.momentum < 0:
      raise ValueError("--warmup-epochs and --momentum must be >= 0, --decay-factor in (0, 1]")
    for e in c.decay_epochs:
      if not (isinstance(e, (int, float)) and math.isfinite(e) and 0 <= e <= c.epochs):
        raise ValueError(f"--decay-epochs {e!r} is not within [0, --epochs {c.epochs}]: "
                         "the step schedule decays at epochs of this run")
    if c.decay_epochs and c.schedule != "step":
      raise ValueError(f"--decay-epochs applies to --schedule step only, not {c.schedule}")
    if c.optimizer not in optim.OPTIMIZERS:
      raise ValueError(f"unknown --optimizer {c.optimizer!r}; valid: {', '.join(optim.OPTIMIZERS)}")
    if c.schedule not in optim.SCHEDULES:
      raise ValueError(f"unknown --schedule {c.schedule!r}; valid: {', '.join(optim.SCHEDULES)}")
    if not (c.dataset in data.names() or data.is_user(c.dataset) or data.is_tfds(c.dataset)):
      raise ValueError(f"unknown --dataset {c.dataset!r}; valid: {', '.join(data.names())}, "
                       "npz:PATH, folder:PATH, tfds:NAME")
    if c.dtype not in DTYPES:
      raise ValueError(f"unknown --dtype {c.dtype!r}; valid: {', '.join(DTYPES)}")
    tensorboard.enabled(c.tensorboard)  # asked for without tensorboardX: the extra to install
    models.resolve_config(c.model, **c.model_config)


_eval_jit = jax.jit(eval_step, static_argnames=("model", "method", "execution"))


def evaluate(model: nn.Module, state: TrainState, images: np.ndarray, labels: np.ndarray,
             spec: data.DatasetSpec, batch_size: int = 1000,
             method: base.Method = base.IDENTITY,
             execution: Callable[[Any, Any], ContextManager[None]] | None = None
             ) -> dict[str, float]:
  """Accuracy and mean loss of ``state``'s (compressed) model over all of ``images``,
  run inside ``execution`` (``jcompress.execution.get(...)``; None: float);
  the last batch is padded, not recompiled. Batches are split over the mesh that
  ``state.params`` is replicated on (``batch_size`` rounded up to a multiple of
  its devices)."""
  mesh = parallel.mesh_of(state.params)
  batch_size = -(-min(batch_size, len(images)) // mesh.size) * mesh.size
  sums = None
  for batch in data.batches(images, labels, batch_size, mean=spec.mean, std=spec.std,
                            pad=True, sharding=parallel.batch_sharding(mesh)):
    out = _eval_jit(state.params, state.batch_stats, state.cstate, batch, model=model,
                    method=method, execution=execution)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  totals = {k: float(v) for k, v in sums.items()}
  return {"accuracy": totals["correct"] / totals["count"],
          "loss": totals["loss"] / totals["count"]}


def train_and_evaluate(config: TrainConfig, workdir: str | os.PathLike,
                       log=print, *, mesh: Mesh | None = None,
                       source_option: str = "--init-from",
                       extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
  """Trains ``config.model`` on ``config.dataset``, checkpointing into ``workdir``.

  Data parallel over ``mesh`` (default: all devices of all processes,
  ``parallel.data_mesh()``): each global batch of ``config.batch_size`` is split
  over its devices, the state is replicated on them. Resumes automatically from
  the latest checkpoint in ``workdir``, written on any number of devices. Only
  process 0 logs and writes ``metrics.jsonl`` and ``config.json``. Returns the
  last epoch's record (also the last line of ``workdir/metrics.jsonl``).
  ``source_option`` names ``config.init_from`` in errors (``compress`` gives ``--from``);
  ``extra_meta`` joins config.json and the checkpoints' meta (compress's own options).
  """
  config = config.resolved()
  config.validate()
  mesh = parallel.data_mesh() if mesh is None else mesh
  parallel.check_batch_size(config.batch_size, mesh)
  main = parallel.is_main_process()
  log = log if main else lambda *_: None
  if mesh.size > 1:
    log(f"data parallel over {parallel.describe(mesh)}: each batch of {config.batch_size} "
        f"is split {mesh.size} ways")
  workdir = pathlib.Path(workdir)
  if config.init_from:
    check_destination(config.init_from, workdir, overwrite=config.overwrite,
                      option=source_option)
  if not main:  # process 0 holds the lock for the run
    workdir_lock.make_workdir(workdir)
  with workdir_lock.hold(workdir) if main else contextlib.nullcontext():
    return _train(config, workdir, log, mesh, main, source_option, extra_meta or {})


def _train(config: TrainConfig, workdir: pathlib.Path, log, mesh: Mesh,
           main: bool, source_option: str, extra_meta: dict[str, Any]) -> dict[str, Any]:
  """``train_and_evaluate`` once the workdir is locked."""
  spec = data.spec(config.dataset, config.data_dir)  # tfds: datasets read their data dir
  if not config.overwrite:  # refuse another run's workdir before any work
    check_saved_run(workdir, config)
  ds = data.load(config.dataset, config.data_dir, verbose=main)
  train_x, train_y = ds.train_images, ds.train_labels
  test_x, test_y = ds.test_images, ds.test_labels
  if config.train_size is not None:  # each class in proportion (data.order.stratified)
    keep = order.stratified(train_y, min(config.train_size, len(train_y)))
    train_x, train_y = train_x[keep], train_y[keep]
  if config.test_size is not None:
    keep = order.stratified(test_y, min(config.test_size, len(test_y)))
    test_x, test_y = test_x[keep], test_y[keep]
  model_config = models.resolve_config(config.model, **config.model_config)
  model = build_model(config.model, model_config, config.dataset)
  method = registry.from_plan(config.compression)
  steps_per_epoch = data.num_batches(len(train_x), config.batch_size, drop_remainder=True)
  schedule = optim.make_schedule(
      config.schedule, config.lr, max(config.epochs * steps_per_epoch, 1),
      warmup_steps=round(config.warmup_epochs * steps_per_epoch),
      decay_steps=[round(e * steps_per_epoch) for e in config.decay_epochs],
      decay_factor=config.decay_factor)
  base_tx = optim.make_optimizer(config.optimizer, schedule, momentum=config.momentum,
                                 weight_decay=config.weight_decay)
  if config.init_from:
    state, done = _from_source(config, method, base_tx, mesh, source_option)
  else:
    state, done = init_state(model, base_tx, spec.image_shape, config.seed, method), 0
  # The source's plan steps are held: a gradual or iterative pruning schedule of an
  # earlier run must not start again on this run's step counter.
  method = registry.from_plan(config.compression, held=done)
  state = parallel.replicate(state, mesh)
  tx = method.optimizer(state.params, base_tx)
  # Losses (distillation) apply while the plan step that asks for them trains, not after:
  # held steps add none.
  extra = method.extra(context(mesh)) if method.extra is not None else None
  jitted = parallel.jit_step(functools.partial(train_step, model=model, tx=tx,
                                               label_smoothing=config.label_smoothing,
                                               method=method, dtype=config.dtype), mesh, extra=1)
  step = lambda state, batch: jitted(state, batch, extra)  # noqa: E731
  metrics_path = workdir / "metrics.jsonl"
  if config.overwrite and main:
    clear_run(workdir, log)
  ckpts = Checkpoints(workdir, keep=config.keep)
  state, start = resume(ckpts, state, config, metrics_path)
  train_config = {**dataclasses.asdict(config), "model_config": model_config}
  train_config.pop("overwrite")
  meta = {"model": config.model, "model_config": model_config, "dataset": config.dataset,
          "num_classes": spec.num_classes, "input_shape": list(spec.image_shape),
          "compression": config.compression, "train_config": train_config, **extra_meta}
  if main:
    atomic.write_text(workdir / "config.json", json.dumps(meta, indent=2) + "\n")
  augment = spec.augment if config.augment is None else config.augment
  limit = divergence_limit(spec.num_classes)
  board = tensorboard.open_board(workdir, config.tensorboard, schedule, config.log_every,
                                 int(state.step) if ckpts.steps() else -1, main)
  record: dict[str, Any] = {}
  interactive = sys.stderr.isatty() and main
  try:
    for epoch in range(start, config.epochs):
      start_time = time.perf_counter()
      sums = None
      bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                 disable=not interactive, leave=False, unit="step")
      batches = data.batches(train_x, train_y, config.batch_size, mean=spec.mean,
                             std=spec.std, seed=config.seed, epoch=epoch, augment=augment,
                             drop_remainder=True, sharding=parallel.batch_sharding(mesh))
      for i, batch in enumerate(batches):
        state, out = step(state, batch)
        out = {"loss": out["loss"] * out["count"], "correct": out["correct"],
               "count": out["count"]}
        board.step(epoch * steps_per_epoch + i + 1, out)
        if sums is None:  # time from the end of the first (compiling) step
          sums = jax.block_until_ready(out)
          first_done, first_count = time.perf_counter(), int(out["count"])
        else:
          sums = jax.tree.map(jnp.add, sums, out)
        if (i + 1) % 50 == 0 or i + 1 == steps_per_epoch:
          done = {k: float(v) for k, v in sums.items()}
          check_finite(done["loss"] / done["count"], epoch, i, ckpts, limit)
          elapsed = time.perf_counter() - start_time
          bar.set_postfix(loss=f"{done['loss'] / done['count']:.4f}",
                          acc=f"{done['correct'] / done['count']:.4f}",
                          img_s=f"{done['count'] / elapsed:.0f}")
        bar.update(1)
      bar.close()
      done = {k: float(v) for k, v in sums.items()}
      steady = time.perf_counter() - first_done
      test = evaluate(model, state, test_x, test_y, spec,
                      config.eval_batch_size, method)
      record = {"epoch": epoch + 1, "step": int(state.step),
                "train_loss": done["loss"] / done["count"],
                "train_accuracy": done["correct"] / done["count"],
                "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                "lr": float(schedule(int(state.step) - 1)),
                "images_per_sec": (done["count"] - first_count) / steady if steady > 0 else 0.0,
                "epoch_seconds": time.perf_counter() - start_time}
      log(f"epoch {epoch + 1}/{config.epochs}: train loss {record['train_loss']:.4f} "
          f"acc {record['train_accuracy']:.4f} | test loss {test['loss']:.4f} "
          f"acc {test['accuracy']:.4f} | {record['images_per_sec']:.0f} img/s")
      # A diverging run can keep a finite running loss while its last steps blow
      # the weights up: only a finite state and test loss make a good checkpoint.
      check_finite_state(state, test["loss"], epoch, ckpts)
      # Before the checkpoint: a resumed run drops it if unsaved.
      board.epoch(record, functools.partial(compression_scalars, method, state))
      if (epoch + 1) % config.save_every == 0 or epoch + 1 == config.epochs:
        ckpts.save(epoch + 1, state, {**meta, "record": record},
                   {"test_accuracy": test["accuracy"]})
      if main:
        with metrics_path.open("a") as f:
          f.write(json.dumps(record) + "\n")
    if config.epochs == 0 and not ckpts.steps():  # one-shot compression: no training
      test = evaluate(model, state, test_x, test_y, spec,
                      config.eval_batch_size, method)
      record = {"epoch": 0, "step": 0, "test_loss": test["loss"],
                "test_accuracy": test["accuracy"]}
      log(f"one-shot: test loss {test['loss']:.4f} acc {test['accuracy']:.4f}")
      check_finite_state(state, test["loss"], -1, ckpts)
      board.epoch(record, functools.partial(compression_scalars, method, state))
      ckpts.save(0, state, {**meta, "record": record}, {"test_accuracy": test["accuracy"]})
      if main:
        with metrics_path.open("a") as f:
          f.write(json.dumps(record) + "\n")
  finally:
    board.close()
    ckpts.close()
  return record or read_metrics(metrics_path)[-1]


def compression_scalars(method: base.Method, state: TrainState) -> dict[str, float]:
  """``sparsity`` (zeros among the params the model runs with) and ``param_bytes``
  (those params at ``method``'s bits per weight, 32 elsewhere) of ``state``."""
  params = flatten(jax.device_get(method.apply(state.params, state.cstate)))
  bits = base.bits_of(method, state.params, state.cstate)
  size = sum(np.size(v) for v in params.values())
  zeros = sum(int(np.count_nonzero(np.asarray(v) == 0)) for v in params.values())
  return {"sparsity": zeros / max(size, 1),
          "param_bytes": sum(np.size(v) * bits.get(p, 32) for p, v in params.items()) / 8}


def _from_source(config: TrainConfig, method: base.Method,
                 base_tx: optax.GradientTransformation, mesh: Mesh,
                 option: str = "--init-from") -> tuple[TrainState, int]:
  """The state of ``config.init_from``'s checkpoint (restored onto ``mesh``) with
  the methods of ``config.compression`` beyond the source's own initialised on
  top, and the number of plan steps the source had done. Raises ValueError, naming
  ``option`` and saying what differs, when the source is not this run's model."""
  _, src, src_meta, _ = load_source(config.init_from, mesh=mesh)
  done = src_meta["compression"]
  differs = source_differences(config, src_meta)
  if differs:
    raise ValueError(f"{option} {config.init_from} does not fit this run: "
                     + "; ".join(differs))
  trainable, cstate = src.params, dict(src.cstate)
  for i, plan in enumerate(config.compression[len(done):], start=len(done)):
    trainable, cstate[str(i)] = registry.build(plan["method"], plan["paths"],
                                           **plan["options"]).init(trainable)
  rng = jax.random.split(jax.random.PRNGKey(config.seed))[1]
  return TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                    batch_stats=src.batch_stats, rng=rng, cstate=cstate,
                    opt_state=method.optimizer(trainable, base_tx).init(trainable)), len(done)
