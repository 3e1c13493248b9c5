"""The bodies of the ``jcompress`` commands, one function per command taking the
parsed arguments; ``cli`` imports this module only once a command runs, so that
``--help`` needs neither JAX nor the data pipeline."""

from __future__ import annotations

import json
import os
import tempfile

import jax

from jcompress import bench, data, demo, entropy, export, models, parallel, report, \
    runtime_bench, stablehlo, transforms
from jcompress.cli import FORMATS, method_option_values
from jcompress.measure import costs, load_exported, measure_loaded, pipeline, pipeline_table
from jcompress.train.compress import compress as compress_run, distill_step
from jcompress.train.loop import GENERIC_RECIPE, TrainConfig, load_workdir, \
    train_and_evaluate
from jcompress.train.step import stand_in_state


_TRAIN_KEYS = ("data_dir", "epochs", "batch_size", "eval_batch_size", "lr", "optimizer",
               "momentum", "weight_decay", "schedule", "warmup_epochs", "decay_epochs",
               "decay_factor", "label_smoothing", "augment", "train_size", "test_size", "seed",
               "keep", "save_every", "overwrite", "dtype", "tensorboard", "log_every")


def tfds_dataset(args) -> str:
  """``--dataset`` with ``--train-split``, ``--test-split`` and ``--image-size`` folded
  into its recorded name (``tfds:NAME;train=...``), checked against the builder's
  info before any work (unknown name, bad split, varying sizes, not prepared)."""
  given = [f"--{k.replace('_', '-')}" for k in ("train_split", "test_split", "image_size")
           if getattr(args, k, None) is not None]
  if not data.is_tfds(args.dataset):
    if given:
      raise ValueError(f"{given[0]} applies to tfds datasets; {args.dataset} is read by "
                       "jcompress's own reader (--dataset tfds:NAME reads a dataset tfds "
                       "prepared, e.g. tfds:mnist)")
    return args.dataset
  from jcompress.data import tfds_generic  # pylint: disable=import-outside-toplevel
  size = tfds_generic.image_size(args.image_size) if args.image_size else None
  name = tfds_generic.canonical(args.dataset, args.train_split, args.test_split, size)
  tfds_generic.check(name, args.data_dir)
  return name


def _train(args) -> int:
  parallel.initialize(args.coordinator, args.num_processes, args.process_id)
  model_config = dict(args.model_arg)
  if args.width is not None:
    model_config["width"] = args.width
  dataset = tfds_dataset(args)
  config = TrainConfig(model=args.model, dataset=dataset, model_config=model_config,
                       init_from=args.init_from, **{k: getattr(args, k) for k in _TRAIN_KEYS})
  config.compression = distill_plan(args, config)
  record = train_and_evaluate(config, args.workdir)
  if parallel.is_main_process():
    print(f"done: test accuracy {record['test_accuracy']:.4f} after "
          f"{report.plural(record['epoch'], 'epoch')} ({args.workdir})")
  return 0


def distill_plan(args, config: TrainConfig) -> list[dict]:
  """``[the distill step]`` for ``train --teacher``, ``[]`` without (its options then
  are errors)."""
  given = {o.key: getattr(args, o.key)
           for o in transforms.METHODS["distill"].options if not o.hidden}
  given = {k: v for k, v in given.items() if v is not None}
  if not given:
    return []
  if "teacher" not in given:
    raise ValueError(f"--{next(iter(given)).replace('_', '-')} needs --teacher WORKDIR")
  if config.init_from:
    raise ValueError("--teacher with --init-from: use jcompress compress --method distill")
  return [distill_step(config, given)]


def _compress(args) -> int:
  parallel.initialize(args.coordinator, args.num_processes, args.process_id)
  for name in args.method:
    transforms.registry.spec(name)  # unknown: the error lists the valid ones
  options = method_option_values(args)
  record = compress_run(args.source, args.workdir, args.method, options, select=args.select,
                    min_size=args.min_size, keep_ends=args.keep_ends,
                    **{k: getattr(args, k) for k in _TRAIN_KEYS})
  if parallel.is_main_process():
    print(f"done: test accuracy {record['test_accuracy']:.4f} after "
          f"{report.plural(record['epoch'], 'epoch')} of fine-tuning ({args.workdir})")
  return 0


def count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def _export(args) -> int:
  if args.batch_size is not None and args.format != "stablehlo":
    raise ValueError("--batch-size fixes a --format stablehlo module's batch: the packed "
                     "file has none")
  if args.entropy is not None and args.format == "stablehlo":
    raise ValueError("--entropy codes the packed file's streams: --format stablehlo has none")
  onnx_only = [o for o in ("activations", "calibration_batches", "calibration_percentile",
                           "data_dir")
               if getattr(args, o) is not None]
  if onnx_only and args.format != "onnx":
    raise ValueError(f"--{onnx_only[0].replace('_', '-')} is for --format onnx")
  if args.format == "onnx":
    return _export_onnx(args)
  if args.format == "stablehlo":
    sizes = stablehlo.export(args.out, *load_workdir(args.workdir, args.checkpoint),
                             batch_size=args.batch_size)
    print(f"wrote {args.out}: {sizes['file_bytes']:,} bytes of StableHLO for "
          f"{', '.join(sizes['platforms'])}, batch {sizes['batch'] or 'any'} "
          f"(+ {args.out}{stablehlo.SIDECAR}: dataset, input shape, normalisation)")
    print(json.dumps(sizes))
    return 0
  _, state, meta, _ = load_workdir(args.workdir, args.checkpoint)
  sizes = export.export(args.out, meta, transforms.plan_methods(meta["compression"]), state,
                        coder=args.entropy or "best")
  print(f"wrote {args.out}: {sizes['file_bytes']:,} bytes = header {sizes['header_bytes']:,} "
        f"+ params {sizes['param_bytes']:,} + batch-norm statistics "
        f"{sizes['payload_bytes'] - sizes['param_bytes']:,}")
  print("params by role: " + ", ".join(f"{role} {sizes[role + '_bytes']:,}"
                                       for role in entropy.ROLES))
  print(json.dumps(sizes))
  return 0


def _export_onnx(args) -> int:
  from jcompress import onnx_export  # pylint: disable=import-outside-toplevel
  if args.batch_size is not None or args.entropy is not None:
    raise ValueError(f"--{'batch-size' if args.batch_size is not None else 'entropy'} is not "
                     "for --format onnx (any batch; no code streams)")
  sizes = onnx_export.export(args.out, *load_workdir(args.workdir, args.checkpoint),
                             activations=args.activations or "static",
                             calibration_batches=args.calibration_batches or 8,
                             calibration_percentile=args.calibration_percentile,
                             data_dir=args.data_dir)
  print(f"wrote {args.out}: {sizes['file_bytes']:,} bytes of ONNX, "
        f"{len(sizes['int8_weights'])} tensors as integer codes, activations "
        f"{sizes['activations']} (+ {args.out}{stablehlo.SIDECAR}: dataset, input shape, "
        "normalisation)")
  print(json.dumps(sizes))
  return 0


_IN_LAYER_TOTALS = ("params", "macs", "nonzero_macs", "bytes", "sparsity")


def _summary(args) -> int:
  if (args.model is None) == (args.workdir is None):
    raise ValueError("give --model NAME or --workdir DIR (one of them)")
  if args.pj_per_mac <= 0:
    raise ValueError(f"--pj-per-mac must be positive, got {args.pj_per_mac}")
  error, recipe, plan = None, None, []
  _check_summary_options(args)
  if args.pipeline:
    rows = pipeline(args.workdir, data_dir=args.data_dir)
    fmt = FORMATS[args.format]
    print(json.dumps(rows) if fmt == "json" else pipeline_table(rows, fmt))
    return 0
  if args.workdir:
    model, state, meta, method = load_workdir(args.workdir, args.checkpoint)
    input_shape = tuple(meta["input_shape"])
    error = 1 - meta["record"]["test_accuracy"]
    title = f"{meta['model']} on {meta['dataset']} ({args.workdir}, epoch {meta['epoch']})"
    plan = meta["compression"]
  else:
    spec = data.spec(args.dataset or "mnist", args.data_dir)
    input_shape = args.input_shape or spec.image_shape
    num_classes = args.num_classes or spec.num_classes
    if num_classes < 1:
      raise ValueError(f"--num-classes must be at least 1, got {num_classes}")
    config = dict(args.model_arg) | ({"width": args.width} if args.width is not None else {})
    model = models.create(args.model, num_classes=num_classes, input_shape=input_shape,
                          **config)
    method, meta = transforms.base.IDENTITY, None
    state = stand_in_state(model, input_shape)  # traced, not compiled
    title = f"{args.model} for input {input_shape}, {num_classes} classes"
    resolved = TrainConfig(model=args.model, dataset=args.dataset or "mnist").resolved()
    recipe = {k: getattr(resolved, k) for k in GENERIC_RECIPE}
  summary, totals = costs(model, state, method, input_shape, meta, error, args.pj_per_mac)
  if error is not None:
    totals["error"] = error
  fmt = FORMATS[args.format]
  if fmt == "json":
    print(json.dumps(summary.to_dict() | totals | ({"recipe": recipe} if recipe else {})))
    return 0
  if fmt != "text":  # markdown / LaTeX: the tables alone, to paste; the totals the
    # layer table's total row lacks as one more row
    extra = {k: v for k, v in totals.items() if k not in _IN_LAYER_TOTALS}
    print(report.layer_table(summary, fmt) + "\n\n" + report.headline_table(extra, fmt))
    return 0
  print(title)
  for i, step in enumerate(plan, 1):
    print(f"plan step {i}: {transforms.registry.describe_step(step)}")
  print(report.layer_table(summary, fmt))
  print(report.key_values(totals))
  if recipe:
    print("training recipe (jcompress train's defaults): " + " ".join(
        f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
        for k, v in recipe.items()))
  return 0


def _check_summary_options(args) -> None:
  """Options that do not apply to this summary are errors, not ignored."""
  if args.workdir:
    model_options = [f"--{k.replace('_', '-')}" for k in ("width", "dataset", "input_shape",
                                                           "num_classes")
                     if getattr(args, k) is not None] + (["--model-arg"] if args.model_arg else [])
    if model_options:
      raise ValueError(f"{model_options[0]} describes a --model; with --workdir the run "
                       "gives the model")
  elif args.pipeline:
    raise ValueError("--pipeline needs --workdir")
  elif args.checkpoint != "latest":
    raise ValueError("--checkpoint needs --workdir")
  if args.data_dir is not None and not args.pipeline and not (
      args.dataset and data.is_tfds(args.dataset)):
    raise ValueError("--data-dir is read by --pipeline only (its evaluations), or with a "
                     "tfds --dataset")
  if args.dataset is not None and args.input_shape is not None:
    raise ValueError("--input-shape and --dataset both set the input shape: give one")
  if args.pipeline and args.checkpoint != "latest":
    raise ValueError("--pipeline measures each run's latest checkpoint: drop --checkpoint")


def _eval(args) -> int:
  if args.runtime in ("stablehlo", "onnxruntime"):
    return _eval_stablehlo(args)
  if bool(args.workdir) == bool(args.exported):
    raise ValueError("give --workdir DIR or --exported FILE (one of them; with --runtime "
                     "stablehlo, --workdir is the run the file is compared with)")
  if args.exported and os.path.exists(f"{args.exported}{stablehlo.SIDECAR}"):
    with open(f"{args.exported}{stablehlo.SIDECAR}", encoding="utf-8") as f:
      onnx_file = '"format": "onnx"' in f.read()
    raise ValueError(f"{args.exported} is an ONNX model (export --format onnx): add --runtime "
                     "onnxruntime" if onnx_file else f"{args.exported} is a StableHLO module "
                     "(export --format stablehlo): add --runtime stablehlo")
  if args.exported and args.checkpoint != "latest":
    raise ValueError("--checkpoint needs --workdir: an exported file holds one checkpoint")
  if args.exported and args.execution != "float":
    raise ValueError(f"--execution {args.execution} needs --workdir: an exported file holds "
                     "decompressed tensors and runs float")
  loaded = (load_exported(args.exported) if args.exported else
            load_workdir(args.workdir, args.checkpoint))
  result = measure_loaded(*loaded, data_dir=args.data_dir, batch_size=args.batch_size,
                          execution_name=args.execution, exported=bool(args.exported))
  print(report.key_values(result))
  if args.json:
    print(json.dumps(result))
  return 0


def _eval_stablehlo(args) -> int:
  """``eval --runtime stablehlo`` and ``--runtime onnxruntime``."""
  fmt = "onnx" if args.runtime == "onnxruntime" else "stablehlo"
  if not args.exported:
    raise ValueError(f"--runtime {args.runtime} runs --exported FILE (export --format {fmt})")
  if args.execution != "float":
    raise ValueError(f"--execution {args.execution} is jcompress's: --runtime {args.runtime} "
                     "runs the file as it was exported")
  if args.checkpoint != "latest" and not args.workdir:
    raise ValueError("--checkpoint needs --workdir: an exported file holds one checkpoint")
  if fmt == "onnx":
    from jcompress import onnx_export  # pylint: disable=import-outside-toplevel
  result = (onnx_export if fmt == "onnx" else stablehlo).evaluate(args.exported, data_dir=args.data_dir, batch_size=args.batch_size,
                              workdir=args.workdir, checkpoint=args.checkpoint)
  print(report.key_values(result))
  if args.json:
    print(json.dumps(result))
  return 0


_RUNTIME_ONLY = ("threads", "batch_sizes", "min_time", "activations", "calibration_batches",
                 "calibration_percentile", "data_dir")


def _bench(args) -> int:
  given = [o for o in _RUNTIME_ONLY if getattr(args, o) is not None] + (
      ["profile"] if args.profile else [])
  if args.runtime is None and given:
    raise ValueError(f"--{given[0].replace('_', '-')} is for bench --runtime")
  if args.runtime is not None:
    return _bench_runtime(args)
  if args.cpus is not None:
    bench.pin_cpus(args.cpus)
  table = bench.from_workdirs(args.workdir, args.baseline, checkpoint=args.checkpoint,
                              execution_name=args.execution, batch_size=args.batch_size,
                              repeats=args.repeats)
  cpus = bench.cpu_count()
  print(f"{args.workdir} against {args.baseline}: {table.execution} execution, batch "
        f"{table.batch_size}, median of {table.repeats} on {jax.devices()[0].device_kind} "
        f"({cpus} CPU{'s' if cpus != 1 else ''})")
  print(bench.render(table, "markdown" if args.format == "md" else "text"))
  print(f"measured speed-up {table.measured_speedup:.2f}x, theoretical (FLOPs) "
        f"{table.theoretical_speedup:.2f}x: measured is "
        f"{table.measured_speedup / table.theoretical_speedup:.0%} of theoretical")
  if args.json:
    print(json.dumps(table.to_dict()))
  return 0


def _bench_runtime(args) -> int:
  clash = [o for o, default in (("execution", None), ("cpus", None), ("batch_size", 128),
                                ("checkpoint", "latest"), ("format", "table"))
           if getattr(args, o) != default]
  if clash:
    raise ValueError(f"--{clash[0].replace('_', '-')} is for the per-layer table, not "
                     "--runtime (which takes --threads and --batch-sizes)")
  runtimes = args.runtime
  result = runtime_bench.run(
      args.workdir, args.baseline, runtimes, threads=args.threads or (1, 2),
      batch_sizes=args.batch_sizes or (1, 128),
      repeats=args.repeats, min_time=0.2 if args.min_time is None else args.min_time,
      activations=args.activations or "static",
      calibration_batches=args.calibration_batches or 8,
      calibration_percentile=args.calibration_percentile, with_profile=args.profile,
      data_dir=args.data_dir)
  print(f"{args.workdir} in {', '.join(runtimes)} against {args.baseline} in XLA float32 "
        f"({jax.devices()[0].device_kind}); best of {args.repeats}; load average "
        f"{result['load_average']:.2f}")
  print("files: " + ", ".join(f"{k} {v:,} B" for k, v in result["file_bytes"].items())
        + (f"; int8 kernels ONNX Runtime runs: {result['int8_ops']}"
           if "onnxruntime" in runtimes else ""))
  print(runtime_bench.render(result))
  for name, ops in result["profile"].items():
    print(f"{name} profile (one thread): " + ", ".join(f"{op} {share:.0%}"
                                                     for op, share in ops if share >= 0.01))
  if args.json:
    print(json.dumps(result))
  return 0


def _demo(args) -> int:
  with tempfile.TemporaryDirectory(prefix="jcompress-demo-") as tmp:
    workdir = args.workdir or tmp
    print(f"demo: LeNet-300-100 on the embedded MNIST sample, trained, compressed four ways, "
          f"exported, and evaluated from the exported files (workdir {workdir})")
    rows = demo.run(workdir, epochs=args.epochs)
  print("\n" + demo.render(rows))
  return 0


COMMANDS = {"train": _train, "compress": _compress, "summary": _summary, "export": _export,
            "eval": _eval, "bench": _bench, "demo": _demo}
