"""``compress(source, workdir, method, ...)``: a trained checkpoint, compressed and fine-tuned.

The library form of ``jcompress compress``: experiments and notebooks call it
directly.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

import jax

from jcompress import bench, data, models, parallel, transforms, workdir_lock
from jcompress.train.loop import FINE_TUNE_DEFAULTS, TrainConfig, build_model, \
    check_destination, context, load_source, train_and_evaluate
from jcompress.train.step import init_variables
from jcompress.transforms import distill, registry
from jcompress.transforms.select import order_like, select as select_paths


def compress(source: str | os.PathLike, workdir: str | os.PathLike,
             method: str | Sequence[str], options: dict[str, Any] | None = None, *,
             select: str | None = None, min_size: int = 0, keep_ends: bool = False,
             log=print, check_speed: bool = True, **train: Any) -> dict[str, Any]:
  """Applies ``method`` (or several, in order) to ``source``'s latest checkpoint,
  fine-tunes, saves ``workdir``.

  The new plan is ``source``'s plan followed by these methods, so compressing a
  compressed model composes (prune, then quantize), and so does one call with
  several methods (``["ttq", "distill"]``: a ternary student trained by a
  teacher). ``workdir`` resumes like ``train_and_evaluate`` when it already
  holds this plan.

  Args:
    source: workdir of a trained (possibly compressed) model; never modified.
    workdir: the output run folder.
    method: a registered method name (``transforms.METHODS``) or a list of them.
    options: the methods' options by keyword (``bits``, ``sparsity``...); each
      method takes those it defines, missing ones take their defaults; a key
      ``METHOD.NAME`` (``"ttq.threshold"``) goes to that method alone.
    select: regex over "/"-joined param paths; ``min_size``: only tensors with
      more weights; ``keep_ends``: leave the first and last layers alone. The
      same selection for every method that selects tensors.
    log: where progress lines go.
    check_speed: after a method that changes how the network runs (one that
      declares a ``default_execution``: Tucker), time the whole compressed network
      against ``source``'s and log the speed-up at the end, as a warning when it is
      slower (:func:`measure_speed`).
    **train: ``TrainConfig`` fields for the fine-tuning (``epochs``, ``lr``...);
      those not given (or None) take ``FINE_TUNE_DEFAULTS``, not the model's
      training recipe.

  Returns:
    The last epoch's record (``epoch`` 0 for one-shot compression).

  Raises:
    ValueError: ``workdir`` is ``source`` or inside it, an unknown method or
      option, or a selection that matches nothing (the message lists the param
      paths); ``workdir`` holds another run or is in use (``workdir_lock``).
  """
  # Before anything is created: the source run is never written.
  check_destination(source, workdir, overwrite=bool(train.get("overwrite")))
  names = [method] if isinstance(method, str) else list(method)
  if not names:
    raise ValueError("give at least one --method")
  specs = [registry.spec(name) for name in names]
  per_method = split_options(names, options or {})
  # Locked from the start (train_and_evaluate takes the same lock again): a second
  # run on this workdir stops before loading anything.
  with workdir_lock.hold(workdir) if parallel.is_main_process() else contextlib.nullcontext():
    model, src, meta, src_method = load_source(source)
    input_shape = tuple(meta["input_shape"])
    params = {k: v for k, v in src.params.items() if k != distill.ADAPTERS}
    if keep_ends:  # the first and last layers in creation order, not alphabetical order
      params = order_like(init_variables(model, input_shape, 0)["params"], params)
    paths = []
    if any(spec.selects for spec in specs):
      paths = select_paths(params, select, min_size=min_size, keep_ends=keep_ends)
    variables = {"params": src_method.apply(src.params, src.cstate),
                 "batch_stats": src.batch_stats}
    plan = list(meta["compression"])
    for spec, step_options in zip(specs, per_method):
      step_paths = paths if spec.selects else []
      log(f"{spec.name}: " + (f"{len(step_paths)} tensors selected: {', '.join(step_paths)}"
                              if spec.selects else "no tensors selected (the loss changes)"))
      step_options = plan_options(spec, step_options, step_paths, model, variables, input_shape,
                                  dataset=meta["dataset"], data_dir=train.get("data_dir"))
      said = spec.describe(step_options) if spec.describe else None
      if said:
        log(f"{spec.name}: {said}")
      plan.append(registry.plan_step(spec.name, step_paths, step_options))
    for line in revived(plan):
      log(f"warning: {line}")
    speed = None
    if (check_speed and any(spec.default_execution for spec in specs)
        and jax.process_count() == 1):  # the shapes are set now; fine-tuning keeps them
      speed = measure_speed(model, src, variables, plan, len(meta["compression"]),
                            input_shape, str(source), str(workdir))
    config = TrainConfig(model=meta["model"], dataset=meta["dataset"],
                         model_config=meta["model_config"], init_from=str(source),
                         compression=plan, **(FINE_TUNE_DEFAULTS | {
                             k: v for k, v in train.items() if v is not None}))
    # What this call was given besides the training options: config.json's record that
    # `jcompress compress --config WORKDIR/config.json` replays (cli_config).
    given = {"from": os.path.abspath(source), "method": names, "select": select,
             "min_size": min_size, "keep_ends": keep_ends, "options": dict(options or {})}
    record = train_and_evaluate(config, workdir, log=log, source_option="--from",
                                extra_meta={"compress_config": given})
  if speed:
    log(speed)
  return record


def measure_speed(model, src, original: dict, plan: list[dict], start: int,
                  input_shape: tuple[int, ...], source: str, workdir: str, *,
                  batch_size: int = 128, repeats: int = 10) -> str:
  """Times the whole network compressed by ``plan`` (its steps from ``start`` on
  initialised on ``src``, the loaded source state) against ``original`` (the
  source's variables), with ``bench.compare`` at the plan's default execution and
  no per-layer rows, and says the measured speed-up: a warning when it is below 1,
  since fewer FLOPs need not make a network faster (Tucker ranks that are not
  multiples of 8 made LeNet-5 2x slower on CPU)."""
  trainable, cstate = src.params, dict(src.cstate)
  for i, step in enumerate(plan[start:], start=start):
    trainable, cstate[str(i)] = registry.build(step["method"], step["paths"],
                                               **step["options"]).init(trainable)
  table = bench.compare(model, {k: v for k, v in original.items() if v},
                        registry.plan_methods(plan), trainable, cstate, input_shape,
                        batch_stats=src.batch_stats, batch_size=batch_size, repeats=repeats,
                        per_layer=False)
  speedup, cpus = table.measured_speedup, bench.cpu_count()
  where = (f"{table.execution} execution, batch {batch_size}, median of {repeats} on "
           + (f"{cpus} CPU{'s' if cpus != 1 else ''}" if jax.default_backend() == "cpu"
              else jax.devices()[0].device_kind))
  if speedup < 1:
    return (f"warning: the compressed network runs slower than --from {source}: "
            f"{speedup:.2f}x its speed for {table.theoretical_speedup:.2f}x fewer FLOPs "
            f"({where}); per layer: jcompress bench --workdir {workdir} --baseline {source}")
  return (f"measured speed-up {speedup:.2f}x over --from {source} for "
          f"{table.theoretical_speedup:.2f}x fewer FLOPs ({where})")


def split_options(names: Sequence[str], options: dict[str, Any]) -> list[dict[str, Any]]:
  """Each method's options from ``options``: ``{"bits": 4}`` goes to every method
  of ``names`` that takes ``bits``; ``{"ttq.threshold": 0.1}`` to ``ttq`` alone.

  Raises:
    ValueError: an option none of ``names`` takes (the message names it).
  """
  out: list[dict[str, Any]] = [{} for _ in names]
  for key, value in options.items():
    method, dot, name = key.rpartition(".")
    name = name.replace("-", "_")
    takers = [i for i, n in enumerate(names) if (not dot or n == method)
              and name in {o.key for o in registry.spec(n).options}]
    if not takers:
      owners = sorted(n for n in registry.METHODS
                      if name in {o.key for o in registry.METHODS[n].options})
      raise ValueError(f"--{key.replace('_', '-')} is not an option of --method "
                       f"{' / '.join(names)}" + (f" (it belongs to {', '.join(owners)})"
                                                 if owners else ""))
    kinds = {registry.spec(names[i]).options[[o.key for o in registry.spec(names[i]).options]
                                              .index(name)] for i in takers}
    if len(kinds) > 1:
      raise ValueError(f"--{key.replace('_', '-')} is ambiguous: "
                       f"{' and '.join(names[i] for i in takers)} define it differently; use "
                       + " / ".join(f"--{names[i]}.{name.replace('_', '-')}" for i in takers))
    for i in takers:
      out[i][name] = value
  return out


def revived(plan: list[dict]) -> list[str]:
  """Warnings for plan steps whose method revives (densifies) tensors an earlier
  step pruned: e.g. ``tucker`` after ``prune`` (its factors are dense)."""
  methods = registry.plan_methods(plan)
  out, pruned = [], {}
  for step, m in zip(plan, methods):
    if m.revives and pruned:
      hit = sorted(set(step["paths"]) & set(pruned))
      if hit:
        out.append(f"{step['method']} replaces the pruned tensors {', '.join(hit)} (of "
                   f"{', '.join(sorted({pruned[p] for p in hit}))}) by dense ones: their zeros "
                   "are not kept")
    if m.masks is not None:
      pruned.update({p: step["method"] for p in step["paths"]})
  return out


def plan_options(spec: transforms.MethodSpec, options: dict[str, Any], paths: list[str],
                 model, variables: dict, input_shape: tuple[int, ...], *,
                 dataset: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
  """``spec``'s options from ``options`` (checked, defaults filled in), validated by
  building the method, then completed by its ``prepare`` hook: what a plan step stores."""
  values = registry.check_options(spec.name, options)
  registry.build(spec.name, paths, **values)  # validates the options before any work
  if spec.prepare is not None:  # options that depend on the model (Tucker's layer positions)
    values = spec.prepare(paths, values, model, variables, input_shape,
                          context(dataset=dataset, data_dir=data_dir))
  return values


def distill_step(config: TrainConfig, options: dict[str, Any]) -> dict[str, Any]:
  """The plan step that trains ``config``'s model from scratch as a student of
  ``options["teacher"]`` (``jcompress train --teacher``): put it in
  ``config.compression``."""
  config.validate()
  model = build_model(config.model, models.resolve_config(config.model, **config.model_config),
                      config.dataset)
  shape = data.spec(config.dataset).image_shape
  variables = init_variables(model, shape, config.seed)
  return registry.plan_step("distill", [], plan_options(
      registry.spec("distill"), options, [], model, variables, shape,
      dataset=config.dataset, data_dir=config.data_dir))
