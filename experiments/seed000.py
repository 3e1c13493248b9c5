"""Seed 000 on MNIST: baselines, bit widths (post-training and QAT), trained ternary
quantization (32-bit vs ternary ends), and the sparsity sweep at 4 and 8 bits with
best-score selection. Error, Mults, Params, Bytesize and Score as the notes
define them (score = log10(error * bytes * mults), bytes at the stored bit width,
mults = nonzero MACs); ``Exported`` is the real size of ``jcompress export``'s
packed parameters.

Command (all parts; about 75 minutes on a 2-core CPU shared with other jobs):

  python experiments/seed000.py

One part: ``--parts bits`` (baselines, bits, ttq, sparsity; comma-separated).
Seconds-long check: ``--smoke``.
"""

from __future__ import annotations

import optax

import common
from jcompress import cost, models
from jcompress.train.step import init_state

MODELS = ("lenet300", "lenet5", "fcn-small", "fcn-large", "cnn", "lcn")
NAMES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5", "fcn-small": "FCN, Small",
         "fcn-large": "FCN, Large", "cnn": "CNN", "lcn": "LCN"}
RECIPES = {"lenet300": {"epochs": 20, "lr": 0.1, "weight_decay": 1e-4},
           "lenet5": {"epochs": 15, "lr": 0.01, "weight_decay": 5e-4}}
DEFAULT_RECIPE = {"epochs": 10, "lr": 0.05, "weight_decay": 1e-4}
BITS = (16, 8, 4)
QAT = {"epochs": 2, "lr": 0.005, "schedule": "cosine"}
TTQ_MODELS = ("fcn-large", "cnn", "lenet5")
TTQ = {"epochs": 4, "optimizer": "adam", "lr": 1e-4, "schedule": "cosine"}
SPARSITY_MODELS = ("fcn-large", "cnn")
SPARSITIES = (0, 0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.15, 0.25, 0.5)
RETRAIN = {"epochs": 1, "lr": 0.005, "schedule": "cosine"}
PARTS = ("baselines", "bits", "ttq", "sparsity")

COLUMNS = (common.Column("name", "Model"), common.Column("error", "Error", common.error),
           common.Column("nonzero_macs", "Mults", common.report.thousands),
           common.Column("params", "Params", common.report.thousands),
           common.Column("bytes", "Bytesize", common.report.byte_size),
           common.Column("exported_bytes", "Exported", common.report.byte_size),
           common.Column("score", "Score", common.score),
           common.Column("baseline", "Baseline", common.score))


def _options(p):
  p.add_argument("--sparsity-models", default=",".join(SPARSITY_MODELS),
                 help="models of the sparsity sweep (default %(default)s)")


def _row(study, workdir, name, baseline=None, **extra):
  return {"name": name, **study.measure(workdir), "baseline": baseline, **extra}


def baselines(study, models_):
  """Trains (or reuses) the baselines; returns ``{model: (workdir, row)}``."""
  out = {}
  for m in models_:
    workdir = study.train(m, "mnist", **RECIPES.get(m, DEFAULT_RECIPE))
    out[m] = workdir, _row(study, workdir, NAMES[m])
  return out


def preset_costs():
  """Seed 000's FCN presets at input 1000 / 255 classes: the cost columns alone."""
  rows = []
  for m in ("fcn-small", "fcn-large"):
    model = models.create(m, num_classes=255, input_shape=(1000,))
    state = init_state(model, optax.identity(), (1000,), 0)
    summary = cost.summarize(model, {"params": state.params, "batch_stats": state.batch_stats},
                             (1000,))
    rows.append({"name": NAMES[m] + " (1000 in, 255 out)", "params": summary.params,
                 "macs": summary.macs, "mults": summary.mults("macs_bn"),
                 "bytes": summary.bytes})
  return rows


def bit_widths(study, base):
  rows = []
  for m, (workdir, row) in base.items():
    rows.append(row | {"name": f"{NAMES[m]} (32-bit)", "bits": 32, "mode": "float"})
    for bits in study.pick(BITS, (4,)):
      ptq = study.compress(workdir, f"ptq{bits}", "quantize",
                           {"bits": bits, "granularity": "channel"})
      rows.append(_row(study, ptq, f"{NAMES[m]} ({bits}-bit PTQ)", row["score"],
                       bits=bits, mode="ptq"))
      qat = study.compress(workdir, f"qat{bits}", "qat", {"bits": bits, "granularity": "channel"},
                           **QAT)
      rows.append(_row(study, qat, f"{NAMES[m]} ({bits}-bit QAT)", row["score"],
                       bits=bits, mode="qat"))
  return rows


def ternary(study, base):
  rows = []
  for m in study.pick(TTQ_MODELS, ("lenet300",)):
    workdir, row = base[m]
    for ends, keep in study.pick((("32-Bit Ends", True), ("Tern Ends", False))):
      tag = "ttq-ends32" if keep else "ttq-ternends"
      out = study.compress(workdir, tag, "ttq", {"scale_init": "mean"}, keep_ends=keep, **TTQ)
      rows.append(_row(study, out, f"{NAMES[m]} ({ends})", row["score"], ends=ends,
                       baseline_error=row["error"]))
  return rows


def sparsity(study, base):
  """Every (model, bits, retrained?, sparsity) point, and the best score of each curve."""
  points = []
  for m in study.pick(study.args.sparsity_models.split(","), ("lenet300",)):
    workdir, row = base[m]
    for s in study.pick(SPARSITIES, (0.5,)):
      pruned = study.compress(workdir, f"prune{s:g}", "prune",
                              {"sparsity": str(s), "scope": "global"})
      retrained = study.compress(workdir, f"prune{s:g}-rt", "prune",
                                 {"sparsity": str(s), "scope": "global"}, **RETRAIN)
      for bits in study.pick((4, 8)):
        for label, src in (("one-shot", pruned), ("retrained", retrained)):
          q = study.compress(src, f"q{bits}", "quantize", {"bits": bits, "granularity": "channel"})
          points.append(_row(study, q, f"{NAMES[m]} ({bits}-bit, {label})", row["score"],
                             model=m, bits=bits, retrained=label == "retrained",
                             target_sparsity=s))
  best = {}
  for p in points:
    key = p["name"]
    if p.get("score") is not None and (key not in best or p["score"] < best[key]["score"]):
      best[key] = p
  return points, list(best.values())


def main(argv=None):
  study = common.Study("seed000", __doc__, argv, _options, PARTS)
  parts = study.parts
  unknown = sorted(set(study.args.sparsity_models.split(",")) - set(models.names()))
  if unknown:
    raise SystemExit(f"--sparsity-models: unknown {', '.join(unknown)}; valid: "
                     f"{', '.join(models.names())}")
  needed = (study.pick(MODELS) if {"baselines", "bits"} & set(parts) else ()) + (
      study.pick(TTQ_MODELS, ("lenet300",)) if "ttq" in parts else ()) + (
      study.pick(study.args.sparsity_models.split(","), ("lenet300",))
      if "sparsity" in parts else ())
  needed = tuple(dict.fromkeys(needed))
  base = baselines(study, needed)
  if "baselines" in parts:
    study.table("baselines", "Baselines (32-bit, MNIST)", COLUMNS[:-1],
                [row for _, row in base.values()])
    study.table("presets", "Seed 000's FCN presets at 1000 inputs / 255 classes (costs only)",
                (common.Column("name", "Model"), common.Column("params", "Params", "{:,}".format),
                 common.Column("mults", "Mults (seed 000)", "{:,}".format),
                 common.Column("macs", "MACs", "{:,}".format),
                 common.Column("bytes", "Bytesize", common.report.byte_size)), preset_costs())
  if "bits" in parts:
    rows = bit_widths(study, {m: base[m] for m in study.pick(MODELS)})
    study.table("bits", "Bit widths: post-training (PTQ) and quantization-aware (QAT), "
                "per-channel symmetric", COLUMNS, rows,
                f"QAT: {common.report.plural(study.epochs(QAT['epochs']), 'epoch')} at lr "
                f"{QAT['lr']}")
    for mode in ("ptq", "qat"):
      series = {}
      for m in study.pick(MODELS):
        pts = [r for r in rows if r["name"].startswith(NAMES[m] + " (") and
               r.get("mode") in (mode, "float")]
        series[NAMES[m]] = ([r["exported_bytes"] for r in pts], [r["error"] for r in pts])
      common.report.plot(str(study.out / f"bits_{mode}.png"), series, xlabel="exported bytes",
                         ylabel="test error", title=f"Error vs bytes, {mode.upper()} 32/16/8/4 bits",
                         logx=True, logy=True)
  if "ttq" in parts:
    study.table("ttq", "Trained ternary quantization: 32-bit ends vs ternary ends",
                COLUMNS, ternary(study, base),
                f"{common.report.plural(study.epochs(TTQ['epochs']), 'epoch')} of "
                f"fine-tuning, Adam lr {TTQ['lr']}")
  if "sparsity" in parts:
    points, best = sparsity(study, base)
    extra = (common.Column("sparsity", "Sparsity", lambda v: f"{100 * v:.1f}%"),)
    study.table("sparsity_sweep", "Sparsity sweep (global magnitude pruning, then per-channel "
                "k-bit)", COLUMNS[:1] + extra + COLUMNS[1:], points,
                f"retrained: {common.report.plural(study.epochs(RETRAIN['epochs']), 'epoch')} "
                "with the mask held")
    study.table("sparsity_best", "Best score per curve", COLUMNS[:1] + extra + COLUMNS[1:], best)
    series = {p["name"]: ([], []) for p in points}
    for p in points:
      series[p["name"]][0].append(100 * p["target_sparsity"] or 0.01)
      series[p["name"]][1].append(p["error"])
    common.report.plot(str(study.out / "sparsity_error.png"), series, xlabel="sparsity (%; 0 drawn at 0.01)",
                       ylabel="test error", title="Error vs sparsity", logx=True, logy=True)
    front = {}
    for p in points:
      front.setdefault(f"{p['model']} {p['bits']}-bit", ([], []))
      front[f"{p['model']} {p['bits']}-bit"][0].append(p["bytes"])
      front[f"{p['model']} {p['bits']}-bit"][1].append(p["error"])
    common.report.plot(str(study.out / "pareto_bytes.png"), front, xlabel="bytes (seed 000)",
                       ylabel="test error", title="Error vs bytes", lines=False, logx=True,
                       logy=True)
  study.finish()


if __name__ == "__main__":
  main()
