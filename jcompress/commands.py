"""The bodies of the ``jcompress`` commands, one function per command taking the
parsed arguments; ``cli`` imports this module only once a command runs, so that
``--help`` needs neither JAX nor the data pipeline."""

from __future__ import annotations

import json
import pathlib
import tempfile

import jax
import optax

from jcompress import bench, data, export, models, parallel, report, transforms
from jcompress.cli import FORMATS, method_option_values
from jcompress.measure import costs, load_exported, measure_loaded, pipeline, pipeline_table
from jcompress.train.compress import compress as compress_run, distill_step
from jcompress.train.loop import TrainConfig, evaluate, load_workdir, read_metrics, \
    train_and_evaluate
from jcompress.train.step import init_state


_TRAIN_KEYS = ("data_dir", "epochs", "batch_size", "eval_batch_size", "lr", "optimizer",
               "momentum", "weight_decay", "schedule", "warmup_epochs", "decay_epochs",
               "decay_factor", "label_smoothing", "augment", "train_size", "test_size", "seed",
               "keep", "save_every", "overwrite")


def _train(args) -> int:
  parallel.initialize(args.coordinator, args.num_processes, args.process_id)
  model_config = dict(args.model_arg)
  if args.width is not None:
    model_config["width"] = args.width
  config = TrainConfig(model=args.model, dataset=args.dataset, model_config=model_config,
                       init_from=args.init_from, **{k: getattr(args, k) for k in _TRAIN_KEYS})
  config.compression = distill_plan(args, config)
  record = train_and_evaluate(config, args.workdir)
  if parallel.is_main_process():
    print(f"done: test accuracy {record['test_accuracy']:.4f} after {record['epoch']} epochs "
          f"({args.workdir})")
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
    print(f"done: test accuracy {record['test_accuracy']:.4f} after {record['epoch']} epochs of "
          f"fine-tuning ({args.workdir})")
  return 0


def count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def _export(args) -> int:
  _, state, meta, _ = load_workdir(args.workdir, args.checkpoint)
  sizes = export.export(args.out, meta, transforms.plan_methods(meta["compression"]), state)
  print(f"wrote {args.out}: {sizes['file_bytes']:,} bytes = header {sizes['header_bytes']:,} "
        f"+ params {sizes['param_bytes']:,} + batch-norm statistics "
        f"{sizes['payload_bytes'] - sizes['param_bytes']:,}")
  print(json.dumps(sizes))
  return 0


def _summary(args) -> int:
  if (args.model is None) == (args.workdir is None):
    raise ValueError("give --model NAME or --workdir DIR (one of them)")
  if args.pj_per_mac <= 0:
    raise ValueError(f"--pj-per-mac must be positive, got {args.pj_per_mac}")
  error = None
  if args.steps:
    if not args.workdir:
      raise ValueError("--steps needs --workdir")
    rows = pipeline(args.workdir, data_dir=args.data_dir)
    fmt = FORMATS[args.format]
    print(json.dumps(rows) if fmt == "json" else pipeline_table(rows, fmt))
    return 0
  if args.workdir:
    model, state, meta, method = load_workdir(args.workdir, args.checkpoint)
    input_shape = tuple(meta["input_shape"])
    error = 1 - meta["record"]["test_accuracy"]
    title = f"{meta['model']} on {meta['dataset']} ({args.workdir}, epoch {meta['epoch']})"
  else:
    spec = data.spec(args.dataset or "mnist")
    input_shape = args.input_shape or spec.image_shape
    num_classes = args.num_classes or spec.num_classes
    if num_classes < 1:
      raise ValueError(f"--num-classes must be at least 1, got {num_classes}")
    config = dict(args.model_arg) | ({"width": args.width} if args.width is not None else {})
    model = models.create(args.model, num_classes=num_classes, input_shape=input_shape,
                          **config)
    method, meta = transforms.base.IDENTITY, None
    state = init_state(model, optax.identity(), input_shape, 0)
    title = f"{args.model} for input {input_shape}, {num_classes} classes"
  summary, totals = costs(model, state, method, input_shape, meta, error, args.pj_per_mac)
  if error is not None:
    totals["error"] = error
  fmt = FORMATS[args.format]
  if fmt == "json":
    print(json.dumps(summary.to_dict() | totals))
    return 0
  print(title)
  print(report.layer_table(summary, fmt))
  print("\n".join(f"{k}: {v:,.4f}" if isinstance(v, float) else f"{k}: {v:,}"
                  for k, v in totals.items()))
  return 0


def _eval(args) -> int:
  loaded = (load_exported(args.exported) if args.exported else
            load_workdir(args.workdir, args.checkpoint))
  result = measure_loaded(*loaded, data_dir=args.data_dir, batch_size=args.batch_size,
                          execution_name=args.execution, exported=bool(args.exported))
  for k, v in result.items():
    print(f"{k:>10}: {v:.4f}" if isinstance(v, float) else f"{k:>10}: {v}")
  if args.json:
    print(json.dumps(result))
  return 0


def _bench(args) -> int:
  if args.cpus is not None:
    bench.pin_cpus(args.cpus)
  table = bench.from_workdirs(args.workdir, args.baseline, checkpoint=args.checkpoint,
                              execution_name=args.execution, batch_size=args.batch_size,
                              repeats=args.repeats)
  cpus = bench.cpucount()
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


def _demo(args) -> int:
  if args.epochs < 1:
    raise ValueError(f"--epochs must be at least 1, got {args.epochs}")
  config = TrainConfig(model="lenet300", dataset="mnist_sample", epochs=args.epochs,
                       batch_size=64, lr=1e-3, optimizer="adam", schedule="cosine")
  with tempfile.TemporaryDirectory(prefix="jcompress-demo-") as tmp:
    workdir = args.workdir or tmp
    print(f"demo: LeNet-300-100 on the embedded MNIST sample, {args.epochs} epochs, workdir {workdir}")
    train_and_evaluate(config, workdir)
    rows = read_metrics(pathlib.Path(workdir) / "metrics.jsonl")
    model, state, meta, method = load_workdir(workdir)
    ds = data.load("mnist_sample")
    final = evaluate(model, state, ds.test_images, ds.test_labels, data.spec("mnist_sample"),
                     method=method)
  print("\n| epoch | train loss | train acc | test acc | images/s |")
  print("|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['epoch']} | {r['train_loss']:.4f} | {r['train_accuracy']:.4f} | "
          f"{r['test_accuracy']:.4f} | {r['images_per_sec']:.0f} |")
  print(f"\nrestored from checkpoint: test accuracy {final['accuracy']:.4f} "
        f"({len(ds.test_labels)} images), {count(state.params):,} params")
  return 0


COMMANDS = {"train": _train, "compress": _compress, "summary": _summary, "export": _export,
            "eval": _eval, "bench": _bench, "demo": _demo}
