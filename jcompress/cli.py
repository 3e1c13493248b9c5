"""The ``jcompress`` command line: the parser of every command and ``main``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jcompress import cli_config, cli_spec, runtime_bench
from jcompress import cli_types as types


class _Parser(argparse.ArgumentParser):
  """An argument parser whose errors are one line, ``jcompress COMMAND: error: ...``
  (exit status 2), like every other error of the command."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message}\n")


FORMATS = {"table": "text", "md": "markdown", "latex": "latex", "json": "json"}


def _shown(default) -> str:
  return "none" if default in ("", None) else str(default)


def _dataset_help(spec: dict) -> str:
  return (f"one of: {', '.join(spec['datasets'])}; or your own data, npz:PATH (arrays "
          "x_train, y_train, x_test, y_test) or folder:PATH (PATH/{train,test}/<class>/"
          "*.png|jpg); or any tfds image-classification dataset by name (cifar100, "
          "svhn_cropped, imagenette/160px, tfds:mnist, ...) prepared as array_record in "
          "--data-dir or $TFDS_DATA_DIR (see --train-split, --test-split, --image-size)")


def _add_tfds_options(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("tfds datasets (--dataset NAME read through tfds)")
  g.add_argument("--train-split", metavar="SPLIT", help="tfds split to train on, e.g. "
                 "train[:90%%] (default train)")
  g.add_argument("--test-split", metavar="SPLIT", help="tfds split to evaluate on, e.g. "
                 "validation or train[90%%:] (default test)")
  g.add_argument("--image-size", metavar="N|HxW", help="resize (shorter side) and "
                 "center-crop every image to N x N or H x W; needed when sizes vary")


def _add_model_options(p: argparse.ArgumentParser, spec: dict) -> None:
  p.add_argument("--model", required=True, choices=spec["models"], metavar="NAME",
                 help=f"model to train; one of: {', '.join(spec['models'])}")
  p.add_argument("--dataset", required=True, type=types.dataset(spec["datasets"]), metavar="NAME",
                 help=f"dataset; {_dataset_help(spec)}")
  p.add_argument("--width", type=types.finite, help="width multiplier / layer width of models that "
                 "have one (microbotnet, fcn, ...)")
  p.add_argument("--model-arg", type=types.model_arg, action="append", default=[],
                 metavar="KEY=VALUE", help="any other model option (repeatable), e.g. "
                 "--model-arg batch_norm=true")


def _or_recipe(value) -> str:
  """A recipe option's default as ``--help`` shows it: None is the model's recipe."""
  return "default: the model's recipe" if value is None else "default %(default)s"


def _add_train_options(p: argparse.ArgumentParser, d, spec: dict) -> None:
  """The training options; ``d``: their defaults (``cli_spec.defaults``)."""
  p.add_argument("--epochs", type=int, default=d.epochs,
                 help=f"epochs to train ({_or_recipe(d.epochs)})")
  p.add_argument("--batch-size", type=int, default=d.batch_size, help="global training batch "
                 "size, split over all devices of all processes (default %(default)s)")
  p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="evaluation batch size (default %(default)s)")
  p.add_argument("--lr", type=types.finite, default=d.lr,
                 help=f"peak learning rate ({_or_recipe(d.lr)})")
  p.add_argument("--optimizer", choices=spec["optimizers"], default=d.optimizer,
                 help=f"%(choices)s ({_or_recipe(d.optimizer)})")
  p.add_argument("--momentum", type=types.finite, default=d.momentum,
                 help=f"SGD momentum, 0 for none ({_or_recipe(d.momentum)})")
  p.add_argument("--weight-decay", type=types.finite, default=d.weight_decay,
                 help=f"L2 decay of kernels (decoupled for adamw) ({_or_recipe(d.weight_decay)})")
  p.add_argument("--schedule", choices=spec["schedules"], default=d.schedule,
                 help=f"learning-rate schedule: %(choices)s ({_or_recipe(d.schedule)})")
  p.add_argument("--warmup-epochs", type=types.finite, default=d.warmup_epochs,
                 help=f"linear warm-up prepended to the schedule ({_or_recipe(d.warmup_epochs)})")
  p.add_argument("--decay-epochs", type=types.floats, default=d.decay_epochs, metavar="E1,E2",
                 help="epochs where the step schedule multiplies the lr by --decay-factor "
                 "(default: 50%% and 75%% of training)")
  p.add_argument("--decay-factor", type=types.finite, default=d.decay_factor, help="step schedule factor (default %(default)s)")
  p.add_argument("--label-smoothing", type=types.finite, default=d.label_smoothing, help="(default %(default)s)")
  p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                 help="random crop (pad 4) and flip; default: on for cifar10, off otherwise")
  p.add_argument("--train-size", type=int, help="train on N images, each class in proportion (a stratified subset)")
  p.add_argument("--test-size", type=int, help="evaluate each epoch on N test images, a "
                 "stratified subset (eval always uses the whole test split)")
  p.add_argument("--seed", type=types.seed, default=d.seed, help="init, shuffling and dropout seed (default %(default)s)")
  p.add_argument("--keep", type=int, default=d.keep, help="latest checkpoints kept, besides the best (default %(default)s)")
  p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N epochs (default %(default)s)")
  p.add_argument("--overwrite", action="store_true",
                 help="start afresh: remove WORKDIR's earlier checkpoints, metrics.jsonl and "
                 "config.json instead of resuming (or refusing a run with other settings)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype,
                 help="compute dtype of the training steps' forward and backward pass: "
                 "bfloat16 is mixed precision (params, optimizer state, batch-norm statistics, "
                 "loss and evaluation stay float32) (default %(default)s)")
  p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                 help="write TensorBoard event files to WORKDIR/tensorboard (needs the "
                 "'tensorboard' extra, tensorboardX); default: on when tensorboardX is installed")
  p.add_argument("--log-every", type=int, default=d.log_every, metavar="N",
                 help="per-step TensorBoard scalars every N steps (default %(default)s)")


def _metavar(option: cli_spec.Opt) -> str:
  return "{" + ",".join(map(str, option.choices)) + "}" if option.choices else option.name.split(
      "-")[-1].upper()


def _add_method_options(p: argparse.ArgumentParser, spec: dict) -> None:
  """``--NAME`` for every method option (given to each --method that takes it) and
  ``--METHOD.NAME`` for each method's own; values are checked by the method."""
  group = p.add_argument_group(
      "method options (each applies only to the methods named; --METHOD.NAME gives it to "
      "that method alone, e.g. --ttq.threshold)")
  for name, owners in cli_spec.options(spec).items():
    distinct = len({option for _, option in owners}) > 1
    option = owners[0][1]
    text = (f"[{', '.join(m for m, _ in owners)}] {option.help} (default "
            f"{_shown(option.default)})" if not distinct else
            f"[{', '.join(m for m, _ in owners)}] defined differently by these methods: "
            f"{', '.join(f'--{m}.{name}' for m, _ in owners)}")
    group.add_argument(f"--{name}", dest=f"opt.{name}", default=None, metavar=_metavar(option),
                       help=text)
    for method, option in owners:
      group.add_argument(f"--{method}.{name}", dest=f"{method}.{name}", default=None,
                         metavar=_metavar(option),
                         help=(f"{option.help} (default {_shown(option.default)})"
                               if distinct else argparse.SUPPRESS))


def method_option_values(args) -> dict[str, str]:
  """The method options given: ``{"bits": "4", "ttq.threshold": "0.1"}``."""
  return {key.removeprefix("opt."): value for key, value in vars(args).items()
          if value is not None and "." in key}


def _plugin_option(p: argparse.ArgumentParser) -> None:
  p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                 help="import MODULE first: it registers compression methods (repeatable; "
                 "also $JCOMPRESS_PLUGINS=mod1,mod2 and installed packages' "
                 "'jcompress.methods' entry points)")


def _config_option(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", metavar="FILE", help="read options from a JSON, YAML or .py "
                 "file (keys: the options' names, e.g. lr, batch_size, model; a .py file "
                 "defines get_config() returning an ml_collections ConfigDict or a dict), or "
                 "a train or compress run's WORKDIR/config.json to run it again; "
                 "--config.KEY=VALUE overrides one key, flags given here override both")


def _data_dir_option(p: argparse.ArgumentParser) -> None:
  p.add_argument("--data-dir", help="offline dataset folder (default: $JCOMPRESS_DATA_DIR, then "
                 "tfds); for a tfds dataset by name, tfds's data dir (default $TFDS_DATA_DIR, "
                 "then ~/tensorflow_datasets)")


def _process_options(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("multi-process (multi-host) runs; one process uses all its devices")
  g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0, the same "
                 "in every process (default $JAX_COORDINATOR_ADDRESS; unset: one process)")
  g.add_argument("--num-processes", type=int, metavar="N",
                 help="processes in the run (default: detected by JAX on Slurm, Open MPI, ...)")
  g.add_argument("--process-id", type=int, metavar="I", help="this process, 0 to N-1; 0 logs "
                 "and writes metrics (default: detected by JAX)")


def parser(spec: dict | None = None) -> argparse.ArgumentParser:
  """Every command's parser; ``spec``: what it lists (default ``cli_spec.load()``)."""
  spec = cli_spec.load() if spec is None else spec
  top = _Parser(prog="jcompress", description="Train, compress, fine-tune, export, evaluate "
                "and benchmark neural networks in JAX.")
  sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

  p = sub.add_parser("train", help="train a model, resuming from WORKDIR's latest checkpoint",
                     description="Trains --model on --dataset in --workdir, resuming from its "
                     "latest checkpoint. Options whose default is the model's recipe take the "
                     "training recipe the model was registered with (`jcompress summary "
                     "--model NAME` shows it); a model without one trains 10 epochs of SGD "
                     "(lr 0.05, momentum 0.9, cosine schedule).")
  _add_model_options(p, spec)
  _add_tfds_options(p)
  _add_train_options(p, cli_spec.defaults(spec, "train"), spec)
  p.add_argument("--workdir", required=True, help="run folder: checkpoints, metrics.jsonl, "
                 "config.json, tensorboard/")
  p.add_argument("--init-from", metavar="SRC", help="start from this run's latest "
                 "weights (same model and dataset) with a fresh optimizer and schedule: "
                 "training continued in stages, e.g. a warm restart; SRC is a workdir or a "
                 "file jcompress export wrote (its decoded weights)")
  group = p.add_argument_group("distillation: with --teacher, the loss is the distillation "
                               "loss against that trained model (--method distill's options)")
  for option in cli_spec.method_options(spec, "distill"):
    if not option.hidden:
      group.add_argument(f"--{option.name}", default=None, metavar=_metavar(option),
                         help=f"{option.help} (default {_shown(option.default)})")
  _config_option(p)
  _data_dir_option(p)
  _process_options(p)

  p = sub.add_parser("compress", help="compress a trained checkpoint, then fine-tune",
                     description="Loads --from's checkpoint, applies --method, fine-tunes for "
                     "--epochs (0 = one-shot) and saves --workdir with the plan and its state.")
  p.add_argument("--from", dest="source", required=True, metavar="SRC",
                 help="workdir of the trained (possibly already compressed) model, or a file "
                 "jcompress export wrote (its decoded weights, no plan: published weights)")
  p.add_argument("--workdir", required=True, help="output run folder (not SRC)")
  p.add_argument("--method", required=True, action="append", metavar="NAME", help="one of: " + ", ".join(spec["methods"]) +
                 "; repeat it to compose several in one run, applied in order (e.g. "
                 "--method ttq --method distill: a ternary student trained by a teacher)")
  p.add_argument("--select", metavar="REGEX", help="only tensors whose '/'-joined path matches")
  p.add_argument("--min-size", type=int, default=0, help="only tensors with more than N weights (default 0)")
  p.add_argument("--keep-ends", action="store_true",
                 help="leave the first conv/dense and the last dense in full precision")
  _add_method_options(p, spec)
  _add_train_options(p, cli_spec.defaults(spec, "compress"), spec)
  _config_option(p)
  _data_dir_option(p)
  _process_options(p)

  p = sub.add_parser("summary", help="per-layer params, MACs, FLOPs, bits, bytes, sparsity; "
                     "scores and energy")
  p.add_argument("--model", choices=spec["models"], metavar="NAME",
                 help=f"a registered model (or --workdir); one of: {', '.join(spec['models'])}")
  p.add_argument("--width", type=types.finite, help="width multiplier / layer width of models that have one")
  p.add_argument("--model-arg", type=types.model_arg, action="append", default=[], metavar="KEY=VALUE",
                 help="any other model option (repeatable)")
  p.add_argument("--dataset", type=types.dataset(spec["datasets"]), metavar="NAME",
                 help=f"take input shape and classes from this dataset (default mnist); "
                 f"{_dataset_help(spec)}")
  p.add_argument("--input-shape", type=types.ints, metavar="H,W,C", help="input shape of one "
                 "example, instead of --dataset's")
  p.add_argument("--num-classes", type=int, help="classes (default: the dataset's)")
  p.add_argument("--workdir", help="summarise this trained (possibly compressed) checkpoint, "
                 "with its test error, score and exported bytes")
  p.add_argument("--checkpoint", default="latest", help="with --workdir: latest, best or an epoch (default %(default)s)")
  p.add_argument("--format", choices=FORMATS, default="table", help="%(choices)s (default %(default)s)")
  p.add_argument("--pj-per-mac", type=types.finite, default=1.0, help="energy per MAC in picojoules (default %(default)s)")
  p.add_argument("--pipeline", action="store_true", help="with --workdir: one row per run "
                 "of its pipeline (the runs it was compressed from, each --from back to the "
                 "trained model) with test error, params, nonzero MACs, bytes, exported "
                 "bytes and score: each step's effect")
  _data_dir_option(p)

  p = sub.add_parser("export", help="write the (compressed) model in packed form: real bytes")
  p.add_argument("--workdir", required=True, help="run folder written by train or compress")
  p.add_argument("--out", required=True, help="file to write (replaced atomically)")
  p.add_argument("--checkpoint", default="latest", help="latest, best or an epoch number (default %(default)s)")
  p.add_argument("--entropy", choices=("none", "huffman", "ans", "best"),
                 help="entropy coding of the code streams (weight codes, shared-weight "
                 "indices, sparse positions): Huffman (as Deep Compression), ANS, or per "
                 "stream the smaller of raw and ANS (default best; --format jcm only)")
  p.add_argument("--format", choices=("jcm", "stablehlo", "onnx"), default="jcm",
                 help="jcm: the packed file; stablehlo: the forward pass serialized by "
                 "jax.export (FILE, and FILE.json saying its dataset, input shape and "
                 "normalisation), run by jax.export.deserialize alone; onnx: an ONNX model "
                 "(+ FILE.json) that ONNX Runtime runs, quantized weights as int8 "
                 "(needs jcompress[deploy]) (default %(default)s)")
  p.add_argument("--activations", choices=("static", "dynamic", "float"), default=None,
                 help="--format onnx: how layers with int8 weights take their inputs: static "
                 "(uint8, scales calibrated on training images: QLinearConv/"
                 "QLinearMatMul), dynamic (quantized at run time: MatMulInteger; "
                 "convolutions float) or float (default static)")
  p.add_argument("--calibration-batches", type=int, metavar="N", default=None,
                 help="--format onnx --activations static: training batches of 64 whose "
                 "activation ranges set the scales (default 8)")
  p.add_argument("--calibration-percentile", type=float, metavar="P", default=None,
                 help="--format onnx --activations static: each range clipped to the P-th "
                 "percentile of its values (and 100-P below zero; 100: min-max) (default "
                 "99.99)")
  _data_dir_option(p)
  p.add_argument("--batch-size", type=int, metavar="N", help="--format stablehlo: fix the "
                 "batch dimension to N (default: symbolic, any batch)")

  p = sub.add_parser("eval", help="evaluate a checkpoint (or an exported file) on its dataset's test split")
  p.add_argument("--workdir", help="run folder written by train or compress (or --exported; "
                 "with --runtime stablehlo: the run to compare the file with)")
  p.add_argument("--exported", metavar="FILE", help="a file written by jcompress export")
  p.add_argument("--runtime", choices=("jcompress", "stablehlo", "onnxruntime"),
                 default="jcompress",
                 help="stablehlo: run --exported FILE (written by export --format stablehlo) "
                 "through jax.export.deserialize; onnxruntime: run --exported FILE.onnx "
                 "(export --format onnx) through ONNX Runtime; with --workdir, also its "
                 "agreement with that run (default %(default)s)")
  p.add_argument("--checkpoint", default="latest", help="latest, best or an epoch number (default %(default)s)")
  p.add_argument("--batch-size", type=int, default=1000, help="evaluation batch size (default %(default)s)")
  p.add_argument("--json", action="store_true", help="end with one JSON line: accuracy, loss, params, ...")
  p.add_argument("--execution", choices=spec["executions"], default="float",
                 help=f"how the compressed model runs: {spec['executions_help']}; with --workdir "
                 "only (an exported file runs float) (default %(default)s)")
  _data_dir_option(p)

  p = sub.add_parser("bench", help="measured vs theoretical speed-up of a compressed model, "
                     "per layer (Kim et al. 2016 Tucker-2 speed table layout)",
                     description="Times the jitted forward pass of --workdir's compressed "
                     "model and --baseline's original, per conv/dense layer (on the input it "
                     "gets in the network) and whole, medians of --repeats alternating runs "
                     "after a warm-up, and prints params, FLOPs and time original / "
                     "compressed with each layer's share of the network time.")
  p.add_argument("--workdir", required=True, help="the compressed model's run folder")
  p.add_argument("--baseline", required=True, metavar="SRC_WORKDIR",
                 help="the original model's run folder (the same model and dataset)")
  p.add_argument("--checkpoint", default="latest", help="of --workdir: latest, best or an "
                 "epoch number (default %(default)s)")
  p.add_argument("--batch-size", type=int, default=128, help="examples per forward pass (default %(default)s)")
  p.add_argument("--repeats", type=int, default=10, help="timed runs, the median is reported (with --runtime: loops, the best reported) (default %(default)s)")
  p.add_argument("--execution", choices=spec["executions"], help="how the compressed model "
                 "runs: one of %(choices)s (default: the one its last method declares, "
                 "factorized for tucker, else float)")
  p.add_argument("--format", choices=("table", "md"), default="table", help="%(choices)s (default %(default)s)")
  p.add_argument("--cpus", type=int, metavar="N", help="time on the last N of the CPUs this process may "
                 "use (Linux; XLA sizes its thread pools by them; as `taskset`). Default: all")
  p.add_argument("--json", action="store_true", help="end with one JSON line: the table, "
                 "measured_speedup, theoretical_speedup and cpus")
  g = p.add_argument_group("deployment runtimes (--runtime; docs/deploy.md): --workdir "
                           "exported as the runtime runs it, --baseline as ONNX float32, both "
                           "against --baseline in XLA float32, variants taking turns")
  g.add_argument("--runtime", metavar="onnxruntime[,stablehlo]",
                 type=types.choice_list(runtime_bench.RUNTIMES), help="time in these "
                 "runtimes instead of the per-layer table: onnxruntime (float32 and int8 "
                 "ONNX files), stablehlo (jax.export of --workdir), comma-separated")
  g.add_argument("--threads", metavar="N[,N]", type=types.positive_ints, help="thread counts, one pinned process each "
                 "(default 1,2)")
  g.add_argument("--batch-sizes", metavar="B[,B]", type=types.positive_ints, help="batch 1 as latency, larger as "
                 "throughput (default 1,128)")
  g.add_argument("--min-time", type=float, metavar="S", help="seconds per timed loop; --repeats loops "
                 "each, the best reported (default 0.2)")
  g.add_argument("--activations", choices=("static", "dynamic", "float"), help="the int8 ONNX "
                 "file's activations, as export --activations (default static)")
  g.add_argument("--calibration-batches", type=int, metavar="N", help="static activations: training "
                 "batches of 64 for the ranges (default 8)")
  g.add_argument("--calibration-percentile", type=float, metavar="P", help="static activations: "
                 "ranges clipped to the P-th percentile, as export (default 99.99)")
  g.add_argument("--profile", action="store_true", help="add ONNX Runtime's time per op type "
                 "of each ONNX file (largest batch, one thread)")
  _data_dir_option(g)

  p = sub.add_parser("demo", help="train LeNet-300-100 on the embedded MNIST sample, compress "
                     "it four ways, export, evaluate the exported files, print one table")
  p.add_argument("--workdir", help="run folder (default: a temporary one, deleted afterwards)")
  p.add_argument("--epochs", type=int, default=8, help="training epochs; each compression "
                 "fine-tunes a quarter of them, at least 1 (default %(default)s)")
  for command in sub.choices.values():
    _plugin_option(command)
    command.add_argument("--no-compile-cache", dest="compile_cache", action="store_false",
                         help="compile afresh and keep nothing: without it, compiled "
                         "programs are kept for the next command in xla/ of the cache "
                         "folder, ~/.cache/jcompress (also $JCOMPRESS_COMPILE_CACHE=0; "
                         "=DIR keeps them in DIR)")
  return top


def _preload_plugins(argv: Sequence[str]) -> bool:
  """Imports the ``--plugin`` modules before the parser is built: their methods
  bring their own options. Returns whether there were any."""
  argv = list(argv)
  modules = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--plugin"]
  modules += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--plugin=")]
  if modules:
    from jcompress import transforms  # pylint: disable=import-outside-toplevel
    for module in modules:
      transforms.load_plugin(module)
  return bool(modules)


def _expected_errors() -> tuple[type[BaseException], ...]:
  """What ``main`` reports in one line: bad input, the file system and, once the
  training code is loaded, a diverged run."""
  runs = sys.modules.get("jcompress.train.runs")
  return (ValueError, OSError) + ((runs.NonFiniteLossError,) if runs else ())


_COMMANDS = ("train", "compress", "summary", "export", "eval", "bench", "demo")


def _apply_config(top: argparse.ArgumentParser, argv: Sequence[str], command: str | None
                  ) -> list[str]:
  """Makes ``--config FILE``'s options, then its ``--config.KEY=VALUE`` overrides, the
  command's defaults (:mod:`cli_config`); returns ``argv`` without the overrides."""
  if command not in ("train", "compress"):
    return list(argv)
  argv, overrides = cli_config.split_overrides(argv)
  path = cli_config.config_path(argv)
  if path is None and not overrides:
    return argv
  sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
  cli_config.apply(sub.choices[command], cli_config.read(path, command) if path else {},
                   path, overrides)
  return argv


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  command = next((a for a in argv if a in _COMMANDS), None)
  try:
    plugins = _preload_plugins(argv)
    top = parser(cli_spec.load(plugins))
    args = top.parse_args(_apply_config(top, argv, command))
    from jcompress import caches  # pylint: disable=import-outside-toplevel
    caches.enable_compile_cache(disabled=not args.compile_cache)
    from jcompress import commands  # pylint: disable=import-outside-toplevel
    return commands.COMMANDS[args.command](args)
  except _expected_errors() as e:
    # Bad input and the file system (a missing or unreadable file, a full disk): one
    # line naming the option, file or path; anything else is a bug and shows its traceback.
    print(f"jcompress{' ' + command if command else ''}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
