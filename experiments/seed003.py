"""Seed 003 on MNIST: 8-bit weights vs 8-bit ops, pruned FC layers run sparse vs
dense, and distillation into a narrow network.

Parts (``--parts``, comma-separated):
  int8      LeNet-5 and the CNN at 32 bits, with 8-bit weights dequantized at run
            time ("Weights") and with int8 x int8 ops accumulating in int32
            ("Ops"): test error, exported bytes, forward time against the float
            model in the same run (batch 1 and 128).
  pruning   LeNet-300-100 (every layer) and LeNet-5 (its fully connected layers,
            as the notes' model) pruned by magnitude to several sparsities and
            retrained with gradient masking; error run dense and run sparse (CSR),
            exported bytes, and time sparse / dense for the pruned layer and the
            whole network.
  distill   LeNet-5 x``--student-width`` trained from scratch with the same budget
            three ways: labels only, Hinton's logit distillation from LeNet-5, and
            logits + conv2 features through a 1x1 adapter; and LeNet-300-100
            pruned as Han et al. and retrained with and without the dense model as
            its teacher.

Command (about 40 minutes on a 2-core CPU):

  python experiments/seed003.py

Seconds-long check: ``--smoke``.
"""

from __future__ import annotations

import common
from jcompress import bench
from jcompress.measure import measure
from seed000 import DEFAULT_RECIPE, NAMES, RECIPES

PARTS = ("int8", "pruning", "distill")
INT8_MODELS = ("lenet5", "cnn")
SPARSITIES = (0.5, 0.9, 0.95, 0.98)
PRUNED = {"lenet300": None, "lenet5": "fc"}  # model -> --select of the pruned layers
RETRAIN = {"epochs": 1, "lr": 0.01, "schedule": "cosine"}
HAN = {"sparsity": "fc1=0.92,fc2=0.91,fc3=0.74"}
HAN_RETRAIN = {"epochs": 10, "lr": 0.01, "schedule": "cosine", "weight_decay": 1e-4}
STUDENT = {"lr": 0.01, "weight_decay": 5e-4, "schedule": "cosine"}
KD = {"temperature": 4.0, "alpha": 0.9}


def _options(p):
  p.add_argument("--student-width", type=common.fraction, default=0.25,
                 help="width of the LeNet-5 student (default %(default)s)")
  p.add_argument("--student-epochs", type=common.positive, default=8,
                 help="training epochs of each student (default %(default)s)")
  p.add_argument("--repeats", type=common.positive, default=20,
                 help="timed forward passes, median reported (default %(default)s)")


def _times(study, workdir, baseline, execution, batch_size):
  """Forward time of ``workdir`` run by ``execution`` over ``baseline``'s float run
  (medians, one process): ``{layer: ratio}`` with the whole network under ``total``."""
  table = bench.from_workdirs(str(workdir), str(baseline), execution_name=execution,
                              batch_size=batch_size,
                              repeats=3 if study.smoke else study.args.repeats)
  return {r.layer: r.seconds[1] / r.seconds[0] for r in (*table.rows, table.total)}


def int8(study):
  rows = []
  for m in study.pick(INT8_MODELS):
    base = study.train(m, "mnist", **RECIPES.get(m, DEFAULT_RECIPE))
    q8 = study.compress(base, "q8sym", "quantize", {"bits": 8, "scheme": "symmetric",
                                                    "granularity": "channel"})
    for label, workdir, execution in (("Orig (float32)", base, "float"),
                                      ("Weights (8-bit, dequantized)", q8, "float"),
                                      ("Ops (int8 x int8 -> int32)", q8, "int8")):
      row = measure(workdir, data_dir=study.args.data_dir, execution_name=execution)
      rows.append(row | {"name": f"{NAMES[m]}: {label}", **{
          f"time_b{b}": _times(study, workdir, base, execution, b)["total"] for b in (1, 128)}})
  return rows


def pruning(study):
  rows = []
  for m in study.pick(tuple(PRUNED)):
    base = study.train(m, "mnist", **RECIPES[m])
    select = PRUNED[m]
    for s in study.pick(SPARSITIES, (0.9,)):
      out = study.compress(base, f"fcprune{s:g}", "prune", {"sparsity": str(s)},
                           **({"select": select} if select else {}), **RETRAIN)
      dense = study.measure(out)
      sparse = measure(out, data_dir=study.args.data_dir, execution_name="sparse")
      row = {"name": NAMES[m], "target": s, "error": dense["error"],
             "sparse_error": sparse["error"], "sparsity": dense["sparsity"],
             "exported_bytes": dense["exported_bytes"],
             "train_seconds": dense["train_seconds"]}
      for b in (1, 128):
        times = _times(study, out, base, "sparse", b)
        row[f"layer_b{b}"], row[f"time_b{b}"] = times["fc1"], times["total"]
      rows.append(row)
  return rows


def distill(study):
  teacher = study.train("lenet5", "mnist", **RECIPES["lenet5"])
  w, epochs = study.args.student_width, study.epochs(study.args.student_epochs)
  rows = [{"name": "LeNet-5 (teacher)", "how": "labels", **study.measure(teacher)}]
  config = {"model_config": {"width": w}, "epochs": epochs, **STUDENT}
  for tag, how, options in (
      ("", "labels", None),
      ("-kd", f"logits (T={KD['temperature']:g}, alpha={KD['alpha']:g})",
       {"teacher": str(teacher), **KD}),
      ("-kdfeat", "logits + conv2 features (MSE, 1x1 adapter)",
       {"teacher": str(teacher), **KD, "features": "conv2", "feature_weight": 0.1})):
    workdir = study.train("lenet5", "mnist", f"-x{w:g}-e{epochs}{tag}", distill=options,
                          **config)
    rows.append({"name": f"LeNet-5 x{w:g}", "how": how, **study.measure(workdir)})
  base = study.train("lenet300", "mnist", **RECIPES["lenet300"])
  rows.append({"name": "LeNet-300-100 (teacher)", "how": "labels", **study.measure(base)})
  e, lr = study.epochs(HAN_RETRAIN["epochs"]), HAN_RETRAIN["lr"]
  pruned = study.compress(base, f"han-e{e}-lr{lr:g}", "prune", HAN, **HAN_RETRAIN)
  rows.append({"name": "LeNet-300-100 pruned 92%", "how": "labels", **study.measure(pruned)})
  kd = study.compress(base, f"han-e{e}-lr{lr:g}-kd", ["prune", "distill"],
                      HAN | {"teacher": str(base), **KD}, **HAN_RETRAIN)
  rows.append({"name": "LeNet-300-100 pruned 92%", "how": "logits from the dense model",
               **study.measure(kd)})
  return rows


def main(argv=None):
  study = common.Study("seed003", __doc__, argv, _options, PARTS)
  parts = study.parts
  time = lambda v: f"{v:.2f}x"  # noqa: E731
  if "int8" in parts:
    study.table("int8", "8-bit weights vs 8-bit ops (MNIST)", (
        common.Column("name", "Model"), common.Column("error", "Error", common.error),
        common.Column("exported_bytes", "Exported", common.report.byte_size),
        common.Column("time_b1", "Time vs float, batch 1", time),
        common.Column("time_b128", "Time vs float, batch 128", time)), int8(study),
        "time: median forward time over the float32 model's, measured in the same run")
  if "pruning" in parts:
    study.table("pruning", "Pruned fully connected layers, dense vs sparse (MNIST)", (
        common.Column("name", "Model"), common.Column("sparsity", "Zeros",
                                                      lambda v: f"{100 * v:.1f}%"),
        common.Column("error", "Error (dense)", common.error),
        common.Column("sparse_error", "Error (sparse)", common.error),
        common.Column("exported_bytes", "Exported", common.report.byte_size),
        common.Column("layer_b1", "fc1 sparse/dense b1", time),
        common.Column("layer_b128", "fc1 sparse/dense b128", time),
        common.Column("time_b1", "Network sparse/dense b1", time),
        common.Column("time_b128", "Network sparse/dense b128", time),
        common.Column("train_seconds", "Retrain s", lambda v: f"{v:.0f}")),
        pruning(study), f"Zeros: of all weight tensors; retrained "
        f"{common.report.plural(study.epochs(RETRAIN['epochs']), 'epoch')} at lr "
        f"{RETRAIN['lr']} with gradient masking; times against the unpruned "
        "model's float run in the same process (below 1: sparse is faster)")
  if "distill" in parts:
    study.table("distill", "Distillation (MNIST)", (
        common.Column("name", "Model"), common.Column("how", "Trained from"),
        common.Column("error", "Error", common.error),
        common.Column("params", "Params", "{:,}".format),
        common.Column("nonzero_macs", "Nonzero MACs", "{:,}".format),
        common.Column("epoch", "Epochs"),
        common.Column("train_seconds", "Train s", lambda v: f"{v:.0f}")), distill(study),
        f"students: {common.report.plural(study.epochs(study.args.student_epochs), 'epoch')} "
        f"each, SGD lr {STUDENT['lr']} "
        "cosine; the teacher's forward pass is part of the distilled runs' time")
  study.finish()


if __name__ == "__main__":
  main()
