"""Seed 001: one-shot Tucker compression of LeNet-5 (MNIST) and C3D (moving MNIST),
and Tucker decomposition of the MNIST input.

Parts (``--parts``, comma-separated):
  tucker  LeNet-5 (seed 000's baseline recipe, so runs/mnist/lenet5 is reused)
          Tucker-2 factorized one-shot at a few rank settings (``--energy`` or
          ``--budget-macs``), then fine-tuned: error, params, MACs, and the
          theoretical (FLOPs) vs measured (CPU time of the factorized execution,
          ``jcompress.bench``, on all CPUs and, in a new process, on one) speed-up,
          per network and per layer as seed 001's table.
  cifar   MicroBotNet x0.32 on CIFAR-10 (seed 002's ``-e12`` baseline, reused):
          Tucker on its 1x1 convs and the classifier only, ranks from a MAC budget
          of those layers (``--cifar-budget``), one-shot and fine-tuned; skipped by
          ``--smoke``.
  c3d     the same for C3D (``--c3d-width``; 1.0 has seed 001's 16 and 32 filters)
          on moving MNIST, trained on a cut budget (``--c3d-epochs`` epochs on the
          first ``--c3d-train-size`` clips, tested on the first ``--c3d-test-size``);
          skipped by ``--smoke``.
  input   the MNIST training images as an N x 28 x 28 tensor, Tucker-decomposed
          (HOSVD) with factors on the two pixel modes; train and test images
          projected on them (loadings ``U_h^T X U_w``) and LeNet-300-100 trained on
          the loadings against the same model on the raw pixels, trained the same
          way: error and features per image.

Command (every part; the LeNet-5 and C3D baselines are trained first unless
their workdirs are complete; tucker took 84 s with its baseline reused, c3d 889 s
with its baseline trained):

  python experiments/seed001.py

Seconds-long check: ``--smoke``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
import seed000
import seed002
from jcompress import bench, data, models
from jcompress.measure import costs
from jcompress.report import plural
from jcompress.train.loop import evaluate, load_workdir
from jcompress.train.step import cross_entropy, init_variables
from jcompress.transforms import tucker

PARTS = ("tucker", "input", "c3d", "cifar")
# MicroBotNet's pointwise convs and its classifier (the depthwise ones stay).
CIFAR_SELECT = r"(expand|project|head_conv|feature_conv|classifier)/kernel$"
# (label, tag, tucker options): two energy thresholds and a MAC budget, the budget
# also with every rank a multiple of 8 (the AVX2 lanes of 32-bit floats; compress's
# default, so the exact-rank settings say --rank-multiple 1).
EXACT = {"rank_multiple": 1}
LENET_SETTINGS = (("energy 0.9", "e0.9", {"energy": 0.9} | EXACT),
                  ("energy 0.7", "e0.7", {"energy": 0.7} | EXACT),
                  ("MACs <= 30%", "m0.3", {"budget_macs": 0.3} | EXACT),
                  ("MACs <= 30%, ranks x8", "m0.3-r8", {"budget_macs": 0.3, "rank_multiple": 8}),
                  ("MACs <= 40%, ranks x8", "m0.4-r8", {"budget_macs": 0.4, "rank_multiple": 8}))
# conv1 (one input channel, about a quarter of the MACs) is left alone, so the
# budget is of those MACs too.
C3D_SETTINGS = (("energy 0.9", "e0.9", {"energy": 0.9} | EXACT),
                ("energy 0.7", "e0.7", {"energy": 0.7} | EXACT),
                ("MACs <= 50%, ranks x8", "m0.5-r8", {"budget_macs": 0.5, "rank_multiple": 8}))
C3D_RECIPE = {"lr": 0.01, "weight_decay": 5e-4, "schedule": "cosine"}
# One fine-tuning epoch over the first train_size examples (a cut budget); C3D
# (whose one-shot model loses more) two epochs at a higher rate.
FINE_TUNE = {"epochs": 1, "lr": 1e-3, "schedule": "cosine", "train_size": 10000}
C3D_FINE_TUNE = FINE_TUNE | {"epochs": 2, "lr": 0.005}
# MicroBotNet loses most of its accuracy one-shot: 3 full epochs at the recipe's decay.
CIFAR_FINE_TUNE = {"epochs": 3, "lr": 0.01, "schedule": "cosine", "weight_decay": 5e-4}
SELECT = "kernel$"
BENCH = {"batch_size": 128, "repeats": 20}
INPUT_RANKS = ((8, 8), (12, 12))
INPUT_TRAIN = {"epochs": 5, "batch_size": 128, "lr": 1e-3}

COLUMNS = (common.Column("name", "Model"), common.Column("ranks", "Setting"),
           common.Column("epoch", "FT epochs"),
           common.Column("error", "Error", common.error),
           common.Column("params", "Params", "{:,}".format),
           common.Column("macs", "MACs", "{:,}".format),
           common.Column("theoretical_speedup", "FLOPs speed-up", lambda v: f"{v:.2f}x"),
           common.Column("measured_speedup", "Measured speed-up", lambda v: f"{v:.2f}x"),
           common.Column("measured_1cpu", "Measured, 1 CPU",
                         lambda v: "-" if v is None else f"{v:.2f}x"))
LAYER_COLUMNS = (
    common.Column("setting", "Network"), common.Column("layer", "Layer"),
    common.Column("params_original", "Params orig", "{:,}".format),
    common.Column("params_compressed", "Params comp", "{:,}".format),
    common.Column("flops_original", "FLOPs orig", "{:,}".format),
    common.Column("flops_compressed", "FLOPs comp", "{:,}".format),
    common.Column("flops_speedup", "FLOPs speed-up", lambda v: f"{v:.2f}x"),
    common.Column("seconds_original", "Time orig ms", lambda v: f"{1e3 * v:.3f}"),
    common.Column("seconds_compressed", "Time comp ms", lambda v: f"{1e3 * v:.3f}"),
    common.Column("time_speedup", "Measured speed-up", lambda v: f"{v:.2f}x"),
    common.Column("share_original", "Share orig", lambda v: f"{100 * v:.1f}%"))
INPUT_COLUMNS = (common.Column("name", "Input"), common.Column("features", "Features"),
                 common.Column("input_ratio", "Input size", lambda v: f"{100 * v:.1f}%"),
                 common.Column("fit", "Variance kept", lambda v: f"{100 * v:.2f}%"),
                 common.Column("error", "Error", common.error),
                 common.Column("params", "Params", "{:,}".format),
                 common.Column("train_seconds", "Train s", lambda v: f"{v:.0f}"))


def _options(p):
  p.add_argument("--c3d-width", type=common.fraction, default=1.0, help="C3D width "
                 "multiplier of the filters and dense widths (default %(default)s)")
  p.add_argument("--c3d-epochs", type=common.positive, default=5, help="C3D baseline epochs "
                 "(default %(default)s)")
  p.add_argument("--c3d-train-size", type=common.positive, default=10000,
                 help="C3D baseline training clips (default %(default)s)")
  p.add_argument("--c3d-test-size", type=common.positive, default=2000, help="C3D test clips "
                 "(default %(default)s)")
  p.add_argument("--cifar-budget", type=common.fraction, default=0.5, help="cifar part: MACs of the "
                 "selected layers after factorization, a fraction of theirs (default %(default)s)")


def measure_subset(study, workdir, size):
  """``study.measure``'s numbers on the first ``size`` test examples only."""
  model, state, meta, method = load_workdir(workdir)
  ds = data.load(meta["dataset"], study.args.data_dir, verbose=False)
  result = evaluate(model, state, ds.test_images[:size], ds.test_labels[:size],
                    data.spec(meta["dataset"]), 250, method)
  _, totals = costs(model, state, method, tuple(meta["input_shape"]))
  return {"epoch": meta["epoch"], "accuracy": result["accuracy"],
          "error": 1 - result["accuracy"], "test_size": size} | totals


def one_cpu_speedup(workdir, base):
  """``jcompress bench --cpus 1``'s measured speed-up, run in a new process (XLA
  sizes its thread pools when JAX starts), or None off the CPU backend and where
  this process cannot pin itself or has one CPU only (the all-CPU column is that
  number then)."""
  if (jax.default_backend() != "cpu" or not hasattr(os, "sched_setaffinity")
      or bench.cpu_count() < 2):
    return None
  proc = subprocess.run(
      [sys.executable, "-m", "jcompress.cli", "bench", "--workdir", str(workdir), "--baseline",
       str(base), "--batch-size", str(BENCH["batch_size"]), "--repeats", str(BENCH["repeats"]),
       "--cpus", "1", "--json"], capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"jcompress bench --cpus 1 on {workdir} failed:\n{proc.stderr}")
  return json.loads(proc.stdout.strip().splitlines()[-1])["measured_speedup"]


def compressed_rows(study, name, base, settings, fine_tune, measure, select=SELECT):
  """The baseline row, then per setting the one-shot and fine-tuned rows, and the
  one-shot model's per-layer bench rows (``setting`` names the network). The
  fine-tuned model has the one-shot model's shapes: it shares its timings."""
  rows = [{"name": name, "ranks": "original", **measure(base),
           "theoretical_speedup": 1.0, "measured_speedup": 1.0, "measured_1cpu": 1.0}]
  layers = []
  for label, tag, options in settings:
    one_shot = study.compress(base, f"tucker-{tag}", "tucker", options, select=select, epochs=0)
    tuned = study.compress(base, f"tucker-{tag}-ft", "tucker", options, select=select,
                           **fine_tune)
    table = bench.from_workdirs(str(one_shot), str(base), **BENCH)
    speed = {"theoretical_speedup": table.theoretical_speedup,
             "measured_speedup": table.measured_speedup,
             "measured_1cpu": one_cpu_speedup(one_shot, base)}
    rows += [{"name": name, "ranks": label, **measure(one_shot), **speed,
              "bench": table.to_dict()},
             {"name": name, "ranks": label, **measure(tuned), **speed}]
    layers += [{"setting": f"{name}, {label}", **r.to_dict()}
               for r in table.rows + (table.total,)]
  return rows, layers


def tucker_part(study):
  lenet = study.train("lenet5", "mnist", **seed000.RECIPES["lenet5"])
  return compressed_rows(study, "LeNet-5", lenet, study.pick(LENET_SETTINGS), FINE_TUNE,
                         study.measure)


def c3d_part(study):
  epochs, size = study.args.c3d_epochs, study.args.c3d_train_size
  width = study.args.c3d_width
  c3d = study.train("c3d", "moving_mnist", f"-x{width:g}-e{study.epochs(epochs)}-n{size}",
                    epochs=epochs,
                    train_size=size, test_size=study.args.c3d_test_size,
                    model_config={"width": width}, **C3D_RECIPE)
  return compressed_rows(study, f"C3D x{width:g}", c3d, C3D_SETTINGS,
                         C3D_FINE_TUNE | {"test_size": study.args.c3d_test_size},
                         lambda w: measure_subset(study, w, study.args.c3d_test_size))


def cifar_part(study):
  base = study.train("microbotnet", "cifar10", "-e12", epochs=12, **seed002.RECIPE)
  budget = study.args.cifar_budget
  return compressed_rows(study, "MicroBotNet x0.32", base,
                         ((f"1x1 + dense MACs <= {budget:.0%}",
                           f"pw-m{budget:g}-e{study.epochs(CIFAR_FINE_TUNE['epochs'])}",
                           {"budget_macs": budget} | EXACT),), CIFAR_FINE_TUNE, study.measure,
                         select=CIFAR_SELECT)


def hosvd_pixels(train, ranks):
  """Factors ``(U_h, U_w)`` of the ``N x H x W`` training tensor at pixel ranks ``ranks``
  (no factor on the image mode), and the fraction of its squared norm the core keeps."""
  core, (_, u_h, u_w) = tucker.hosvd(train, (None, *ranks))
  return u_h, u_w, float(jnp.sum(core ** 2) / jnp.sum(train ** 2))


def loadings(images, u_h, u_w):
  """``U_h^T X U_w`` of each ``H x W`` image, flattened: ``(N, R_h R_w)``."""
  return jnp.einsum("nhw,ha,wb->nab", images, u_h, u_w).reshape(len(images), -1)


def fit_classifier(study, train_x, train_y, test_x, test_y, seed=0):
  """LeNet-300-100 on ``(N, features)`` arrays, standardized with the training
  statistics, trained by Adam (``INPUT_TRAIN``): test error, params, seconds."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  model = models.create("lenet300", num_classes=10, input_shape=train_x.shape[1:])
  params = init_variables(model, tuple(train_x.shape[1:]), seed)["params"]
  tx = optax.adam(INPUT_TRAIN["lr"])
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y):
    loss, grads = jax.value_and_grad(
        lambda p: cross_entropy(model.apply({"params": p}, x), y).mean())(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  batch = INPUT_TRAIN["batch_size"]
  rng = np.random.default_rng(seed)
  started = time.perf_counter()
  for _ in range(study.epochs(INPUT_TRAIN["epochs"])):
    order = rng.permutation(len(train_x))
    for i in range(0, len(order) - batch + 1, batch):
      idx = order[i:i + batch]
      params, opt, _ = step(params, opt, train_x[idx], train_y[idx])
  seconds = time.perf_counter() - started
  predict = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x), -1))
  correct = sum(int(jnp.sum(predict(params, test_x[i:i + 1000]) == test_y[i:i + 1000]))
                for i in range(0, len(test_x), 1000))
  count = sum(int(np.size(v)) for v in jax.tree.leaves(params))
  return 1 - correct / len(test_x), count, seconds


def input_part(study):
  ds = data.load(study.dataset("mnist"), study.args.data_dir)
  train = jnp.asarray(ds.train_images[..., 0], jnp.float32) / 255
  test = jnp.asarray(ds.test_images[..., 0], jnp.float32) / 255
  pixels = train.shape[1] * train.shape[2]
  train_y, test_y = jnp.asarray(ds.train_labels), jnp.asarray(ds.test_labels)
  error, params, seconds = fit_classifier(study, train.reshape(len(train), -1), train_y,
                                          test.reshape(len(test), -1), test_y)
  rows = [{"name": "Raw pixels", "features": pixels, "input_ratio": 1.0, "fit": 1.0,
           "error": error, "params": params, "train_seconds": seconds}]
  for ranks in study.pick(INPUT_RANKS):
    u_h, u_w, fit = hosvd_pixels(train, ranks)
    error, params, seconds = fit_classifier(study, loadings(train, u_h, u_w), train_y,
                                            loadings(test, u_h, u_w), test_y)
    features = ranks[0] * ranks[1]
    rows.append({"name": f"Tucker loadings {ranks[0]}x{ranks[1]}", "ranks": list(ranks),
                 "features": features, "input_ratio": features / pixels, "fit": fit,
                 "error": error, "params": params, "train_seconds": seconds})
  return rows


def main(argv=None):
  study = common.Study("seed001", __doc__, argv, _options, PARTS)
  parts = study.parts
  note = (f"Tucker-2 of every kernel (layers whose factorized form is not cheaper, and "
          f"single-input-channel convs, are left alone); speed-ups from jcompress.bench on the "
          f"one-shot model (the fine-tuned one has its shapes), batch {BENCH['batch_size']}, "
          f"median of {BENCH['repeats']} on all {os.cpu_count()} CPUs of the "
          f"{jax.default_backend().upper()} backend and on one (`jcompress bench --cpus 1`)")
  if "tucker" in parts:
    rows, layers = tucker_part(study)
    ran = study.budget(FINE_TUNE)
    study.table("tucker", "LeNet-5 / MNIST: one-shot Tucker, before and after fine-tuning",
                COLUMNS, rows, note + f"; fine-tuning: {plural(ran['epochs'], 'epoch')} over "
                f"the first {ran['train_size']:,} training images, SGD lr {FINE_TUNE['lr']} "
                f"cosine (a cut budget)")
    study.table("tucker_layers", "LeNet-5 per layer, one-shot (seed 001's table)",
                LAYER_COLUMNS, layers, f"times: batch {BENCH['batch_size']}, factorized "
                f"execution; shares of the whole network's time")
  if "c3d" in parts and not study.smoke:  # the smoke run has no moving MNIST sample
    rows, layers = c3d_part(study)
    width = study.args.c3d_width
    study.table("c3d", f"C3D x{width:g} / moving MNIST: one-shot Tucker, before and after "
                "fine-tuning", COLUMNS, rows, note + f"; cut budgets: baseline "
                f"{plural(study.args.c3d_epochs, 'epoch')} on the first "
                f"{study.args.c3d_train_size:,} clips, fine-tuning "
                f"{plural(C3D_FINE_TUNE['epochs'], 'epoch')} (SGD lr {C3D_FINE_TUNE['lr']} "
                f"cosine) on the first {C3D_FINE_TUNE['train_size']:,}, "
                f"error on the first {study.args.c3d_test_size:,} test clips")
    study.table("c3d_layers", f"C3D x{width:g} per layer, one-shot (seed 001's table)",
                LAYER_COLUMNS, layers, f"times: batch {BENCH['batch_size']}, factorized "
                f"execution")
  if "cifar" in parts and not study.smoke:  # CIFAR-10 is seed002's smoke test's
    rows, layers = cifar_part(study)
    study.table("cifar", "MicroBotNet x0.32 / CIFAR-10: Tucker on the 1x1 convs and the "
                "classifier with a MAC budget", COLUMNS, rows, note + "; baseline: seed 002's "
                f"12 epochs; fine-tuning: {plural(CIFAR_FINE_TUNE['epochs'], 'epoch')}, SGD lr "
                f"{CIFAR_FINE_TUNE['lr']} cosine, weight decay {CIFAR_FINE_TUNE['weight_decay']:g}")
    study.table("cifar_layers", "MicroBotNet x0.32 per layer, one-shot", LAYER_COLUMNS, layers,
                f"times: batch {BENCH['batch_size']}, factorized execution")
  if "input" in parts:
    study.table("input", "Tucker-decomposed MNIST input: LeNet-300-100 on the loadings",
                INPUT_COLUMNS, input_part(study),
                f"HOSVD of the N x 28 x 28 training tensor (pixel modes only); test images "
                f"projected on the training factors; "
                f"{plural(study.epochs(INPUT_TRAIN['epochs']), 'epoch')} of Adam "
                f"lr {INPUT_TRAIN['lr']}, batch {INPUT_TRAIN['batch_size']}, features "
                f"standardized")
  study.finish()


if __name__ == "__main__":
  main()
