"""``compress(source, workdir, method, ...)``: a trained checkpoint, compressed and fine-tuned.

The library form of ``jcompress compress``: experiments and notebooks call it
directly.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from jcompress import transforms
from jcompress.train.loop import TrainConfig, load_workdir, train_and_evaluate
from jcompress.train.step import init_variables
from jcompress.transforms.select import order_like, select as select_paths

# What ``compress`` fine-tunes with unless told otherwise (``jcompress compress``'s defaults).
FINE_TUNE_DEFAULTS = {"epochs": 0, "lr": 1e-3, "schedule": "constant"}


def compress(source: str | os.PathLike, workdir: str | os.PathLike, method: str,
             options: dict[str, Any] | None = None, *, select: str | None = None,
             min_size: int = 0, keep_ends: bool = False, log=print,
             **train: Any) -> dict[str, Any]:
  """Applies ``method`` to ``source``'s latest checkpoint, fine-tunes, saves ``workdir``.

  The new plan is ``source``'s plan followed by this method, so compressing a
  compressed model composes (prune, then quantize). ``workdir`` resumes like
  ``train_and_evaluate`` when it already holds this plan.

  Args:
    source: workdir of a trained (possibly compressed) model; never modified.
    workdir: the output run folder.
    method: a registered method name (``transforms.METHODS``).
    options: the method's options by keyword (``bits``, ``sparsity``...);
      missing ones take their defaults.
    select: regex over "/"-joined param paths; ``min_size``: only tensors with
      more weights; ``keep_ends``: leave the first and last layers alone.
    log: where progress lines go.
    **train: ``TrainConfig`` fields for the fine-tuning (``epochs``, ``lr``...);
      defaults ``FINE_TUNE_DEFAULTS``.

  Returns:
    The last epoch's record (``epoch`` 0 for one-shot compression).

  Raises:
    ValueError: ``workdir`` is ``source``, an unknown method or option, or a
      selection that matches nothing (the message lists the param paths).
  """
  if pathlib.Path(workdir).absolute() == pathlib.Path(source).absolute():
    raise ValueError("--workdir must differ from --from: the source checkpoint is kept intact")
  if method not in transforms.METHODS:
    raise ValueError(f"unknown --method {method!r}; valid: {', '.join(sorted(transforms.METHODS))}")
  model, src, meta, src_method = load_workdir(source)
  spec = transforms.METHODS[method]
  defaults = {o.name.replace("-", "_"): o.default for o in spec.options}
  options = defaults | dict(options or {})
  params = src.params
  if keep_ends:  # the first and last layers in creation order, not alphabetical order
    params = order_like(init_variables(model, tuple(meta["input_shape"]), 0)["params"], params)
  paths = select_paths(params, select, min_size=min_size, keep_ends=keep_ends)
  log(f"{method}: {len(paths)} tensors selected: {', '.join(paths)}")
  transforms.build(method, paths, **options)  # validates the options before any work
  if spec.prepare is not None:  # options that depend on the model (Tucker's layer positions)
    variables = {"params": src_method.apply(src.params, src.cstate),
                 "batch_stats": src.batch_stats}
    options = spec.prepare(paths, options, model, variables, tuple(meta["input_shape"]))
  plan = meta["compression"] + [{"method": spec.name, "options": options, "paths": paths}]
  config = TrainConfig(model=meta["model"], dataset=meta["dataset"],
                       model_config=meta["model_config"], init_from=str(source),
                       compression=plan, **(FINE_TUNE_DEFAULTS | train))
  return train_and_evaluate(config, workdir, log=log)
