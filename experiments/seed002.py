"""Seed 002 on CIFAR-10: MicroBotNet widths, TTQ on MicroBotNet x0.32 with ternary
statistics, and energy per inference at 1 pJ per MAC.

Parts (``--parts``, comma-separated):
  widths    params, MACs and energy of x0.25 / x0.32 / x0.5 / x1.0, and test
            accuracy after ``--width-epochs`` epochs of training each.
  ttq       MicroBotNet x0.32 trained for ``--epochs``, then ternarized with the
            notes' selection (tensors of more than 1000 weights, not the first conv
            nor the last dense) and fine-tuned ``--ttq-epochs`` (Adam, cosine decay
            of the latent kernels' and the scales' rate with the rest), with learned
            scales (TTQ) and with one fixed scale per layer (weights {-1, 0, 1}):
            accuracy, counts of +w_p / 0 / -w_n weights per layer, bytes, energy.
  distill   a teacher teaches a fresh x0.32 student with the baseline's budget
            (Hinton, T=4, alpha=0.9), against the baseline trained from labels.
            The teacher is the x0.32 baseline continued ``--restart-epochs``
            epochs from a fresh cosine schedule at half the rate (a warm restart:
            stage 2 of the README's MicroBotNet recipe), or with
            ``--teacher-width W`` the wider MicroBotNet xW of the widths part (its
            ``--width-epochs``, default ``--epochs``; the same workdir, so a
            width run already trained is reused).

Commands (the budget this CPU allows; the notes train for hundreds of epochs):

  python experiments/seed002.py --parts ttq --epochs 90 --ttq-epochs 15,30
  python experiments/seed002.py --parts distill --epochs 12 --restart-epochs 30
  python experiments/seed002.py --parts distill --epochs 90 --teacher-width 1.0
  python experiments/seed002.py --parts distill --epochs 90 --teacher-width 1.0 \
      --kd-restart-epochs 30
  python experiments/seed002.py --parts distill --epochs 90 --teacher-width 1.0 \
      --student-weight-decay 1e-4
  python experiments/seed002.py --parts distill --epochs 150 --teacher-width 1.0 \
      --width-epochs 1.0=90

Seconds-long check: ``--smoke``.
"""

from __future__ import annotations

import argparse

import common
from jcompress.report import plural
from jcompress.train.loop import load_workdir
from jcompress.transforms import ternary

WIDTHS = (0.25, 0.32, 0.5, 1.0)
PARTS = ("widths", "ttq", "distill")
RECIPE = {"lr": 0.1, "weight_decay": 5e-4, "schedule": "cosine", "warmup_epochs": 1}
TTQ = {"optimizer": "adam", "lr": 2e-4, "schedule": "cosine"}
# The run's optimizer and schedule drive the latent kernels and the scales too (the TTQ
# paper decays one rate for all); fixed: one untrained scale per layer, {-1, 0, 1}.
TTQ_OPTIONS = {"scale_init": "mean", "latent_lr": "none", "scale_lr": "none"}
NOTES_ZEROS = 134_124 / 153_792  # the notes' ternary MicroBotNet: 87.2% of weights zero
RESTART = {"lr": 0.05, "weight_decay": 5e-4, "schedule": "cosine"}
KD = {"temperature": 4.0, "alpha": 0.9}
EPOCHS = 90  # the recipe's budget; a distill part at other --epochs has its own table


def _options(p):
  p.add_argument("--epochs", type=common.positive, default=EPOCHS,
                 help="training epochs of the x0.32 baseline and of the distill part's "
                 "students (other than %(default)s: their own table, distill-eN; default "
                 "%(default)s)")
  p.add_argument("--ttq-epochs", type=_epoch_list, default=(15,), help="TTQ fine-tuning epochs, "
                 "comma-separated for several runs each listed (e.g. 15,30; default 15); the "
                 "per-layer table is the longest TTQ run's")
  p.add_argument("--ttq-distill", action="store_true", help="ttq part: also TTQ distilled from "
                 "the float baseline (Hinton, T=4, alpha=0.9) for the longest --ttq-epochs")
  p.add_argument("--restart-epochs", type=common.positive, default=30, help="distill part: epochs of "
                 "the teacher's warm restart from the baseline (default %(default)s)")
  p.add_argument("--kd-restart-epochs", type=common.positive, metavar="N",
                 help="distill part: continue the student from labels and the distilled "
                 "student N more epochs each from a fresh cosine schedule at half the rate "
                 "(the warm restart above), the distilled one still taught; both listed "
                 "(default none)")
  p.add_argument("--student-weight-decay", type=_decay, metavar="WD",
                 help="distill part: both students' weight decay, their own runs (default "
                 f"the baseline's, {RECIPE['weight_decay']:g})")
  p.add_argument("--teacher-width", type=_teacher_width, default=0.32, metavar="W",
                 help="distill part: the teacher's width, one of "
                 f"{', '.join(map(str, WIDTHS))}; 0.32 is the baseline's warm restart, a "
                 "wider one the widths part's run (default %(default)s)")
  p.add_argument("--width-epochs", type=_width_epochs, default={}, metavar="N|W=N[,W=N]",
                 help="widths part: training epochs of every width (N) or of each (W=N; the "
                 "others 3); x0.32 at --epochs is the ttq part's baseline (default 3)")


def _decay(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not 0 <= value < 1:
    raise argparse.ArgumentTypeError(f"expected a weight decay in [0, 1), got {text!r}")
  return value


def _width_epochs(text: str) -> dict[float, int]:
  out = {}
  for item in text.split(","):
    w, _, n = item.rpartition("=")
    widths = [float(w)] if w and w.replace(".", "", 1).isdigit() else [] if w else list(WIDTHS)
    if w and (not widths or widths[0] not in WIDTHS):
      raise argparse.ArgumentTypeError(f"expected N or W=N with W one of "
                                       f"{', '.join(map(str, WIDTHS))}, got {item!r}")
    out |= dict.fromkeys(widths, common.positive(n))
  return out


def _teacher_width(text: str) -> float:
  try:
    w = float(text)
  except ValueError:
    w = None
  if w not in WIDTHS:
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, WIDTHS))}, "
                                     f"got {text!r}")
  return w


def _epoch_list(text: str) -> tuple[int, ...]:
  return tuple(sorted({common.positive(t) for t in text.split(",")}))


COLUMNS = (common.Column("name", "Model"), common.Column("error", "Error", common.error),
           common.Column("params", "Params", "{:,}".format),
           common.Column("nonzero_macs", "Nonzero MACs", "{:,}".format),
           common.Column("exported_bytes", "Exported", common.report.byte_size),
           common.Column("energy_uj", "Energy (uJ at 1 pJ/MAC)", lambda v: f"{v:.3f}"),
           common.Column("epoch", "Epochs"),
           common.Column("train_seconds", "Train s", lambda v: f"{v:.0f}"))


def widths(study):
  return [{"name": f"MicroBotNet x{w:g}",
           **study.measure(_width_run(study, w, study.args.width_epochs.get(w, 3)))}
          for w in study.pick(WIDTHS, (0.25,))]


def _width_run(study, w: float, epochs: int):
  """The MicroBotNet xW run of ``epochs`` (x0.32 at ``--epochs``: the ttq baseline)."""
  if w == 0.32 and epochs == study.args.epochs:
    return study.train("microbotnet", "cifar10", f"-e{study.epochs(epochs)}", epochs=epochs,
                       **RECIPE)
  return study.train("microbotnet", "cifar10", f"-w{w:g}-e{study.epochs(epochs)}",
                     model_config={"width": w}, epochs=epochs, **RECIPE)


def ttq(study):
  base = study.train("microbotnet", "cifar10", f"-e{study.epochs(study.args.epochs)}",
                     epochs=study.args.epochs, **RECIPE)
  rows, stats = [{"name": "MicroBotNet x0.32 (float32)", **study.measure(base)}], []
  for epochs in sorted({study.epochs(e) for e in study.args.ttq_epochs}):
    for scales, name in (("learned", "TTQ"), ("fixed", "fixed ternary {-1, 0, 1}")):
      out = study.compress(base, f"ttq{epochs}-lr{TTQ['lr']:g}" + ("-fixed" * (scales == "fixed")),
                           "ttq", TTQ_OPTIONS | {"scales": scales}, min_size=1000,
                           keep_ends=True, epochs=epochs, **TTQ)
      _, state, _, _ = load_workdir(out)
      layers, total = ternary.ternary_stats(state.params, state.cstate["0"])
      rows.append({"name": f"MicroBotNet x0.32 ({name}, {plural(epochs, 'epoch')})",
                   **study.measure(out), "zeros": total["sparsity"]})
      stats.append((layers, {**total, "path": f"total ({name}, {plural(epochs, 'epoch')})"}))
  if study.args.ttq_distill:
    out = study.compress(base, f"ttq{epochs}-lr{TTQ['lr']:g}-kd", ["ttq", "distill"],
                         TTQ_OPTIONS | {"scales": "learned", "teacher": str(base), **KD},
                         min_size=1000, keep_ends=True, epochs=epochs, **TTQ)
    _, state, _, _ = load_workdir(out)
    layers, total = ternary.ternary_stats(state.params, state.cstate["0"])
    name = f"TTQ distilled from the float model, {plural(epochs, 'epoch')}"
    rows.append({"name": f"MicroBotNet x0.32 ({name})", **study.measure(out),
                 "zeros": total["sparsity"]})
    stats.append((layers, {**total, "path": f"total ({name})"}))
  layers = stats[-2 - study.args.ttq_distill][0]  # the longest TTQ run's layers, then
  # every run's total
  return rows, layers + [total for _, total in stats]


def distill(study):
  # Run and row names give the epochs that run (1 in a smoke run).
  epochs, restart = study.epochs(study.args.epochs), study.epochs(study.args.restart_epochs)
  width, decay = study.args.teacher_width, study.args.student_weight_decay
  if width == 0.32:
    base = study.train("microbotnet", "cifar10", f"-e{epochs}", epochs=epochs, **RECIPE)
    teacher = study.train("microbotnet", "cifar10", f"-e{epochs}-r{restart}",
                          init_from=str(base), epochs=restart, **RESTART)
    name, tag = f"MicroBotNet x0.32, {epochs} + {plural(restart, 'epoch')}", f"r{restart}"
  else:
    wide = study.args.width_epochs.get(width, study.args.epochs)
    teacher = _width_run(study, width, wide)
    name = f"MicroBotNet x{width:g}, {plural(study.epochs(wide), 'epoch')}"
    tag = f"w{width:g}-e{study.epochs(wide)}"
  # The students: the baseline's recipe, at --student-weight-decay when given (its own
  # runs, the distilled one trained first: it is the study's question)
  recipe, suffix, wd = RECIPE, f"-e{epochs}", ""
  if decay is not None:
    recipe, suffix = RECIPE | {"weight_decay": decay}, f"-e{epochs}-wd{decay:g}"
    wd = f"weight decay {decay:g}"
  taught = {"teacher": str(teacher), **KD}
  student = study.train("microbotnet", "cifar10", f"{suffix}-kd-{tag}", epochs=epochs,
                        distill=taught, **recipe)
  labels = study.train("microbotnet", "cifar10", suffix, epochs=epochs, **recipe)
  kd = f"distilled (T={KD['temperature']:g}, alpha={KD['alpha']:g}{', ' + wd if wd else ''})"
  from_labels = "from labels" + (f" ({wd})" if wd else "")
  rows = [{"name": f"{name} (teacher)", **study.measure(teacher)},
          {"name": f"MicroBotNet x0.32, {plural(epochs, 'epoch')} {from_labels}",
           **study.measure(labels)},
          {"name": f"MicroBotNet x0.32, {plural(epochs, 'epoch')} {kd}",
           **study.measure(student)}]
  more = study.args.kd_restart_epochs and study.epochs(study.args.kd_restart_epochs)
  if more:  # the same warm restart for both students; the labels one is the x0.32
    # teacher's run when --restart-epochs is the same
    again = RESTART | {"weight_decay": recipe["weight_decay"]}
    runs = {from_labels: study.train("microbotnet", "cifar10", f"{suffix}-r{more}",
                                     init_from=str(labels), epochs=more, **again),
            kd: study.train("microbotnet", "cifar10", f"{suffix}-kd-{tag}-r{more}",
                            init_from=str(student), epochs=more, distill=taught, **again)}
    rows += [{"name": f"MicroBotNet x0.32, {epochs} + {plural(more, 'epoch')} {how}",
              **study.measure(run)} for how, run in runs.items()]
  return rows


def _distill_table(study) -> tuple[str, str]:
  """The distill part's table name and title (students at other --epochs or at
  --student-weight-decay have their own)."""
  decay, epochs = study.args.student_weight_decay, study.args.epochs
  name = "distill"
  title = "Distillation on CIFAR-10: MicroBotNet x0.32 from " + (
      "its longer-trained self" if study.args.teacher_width == 0.32 else "a wider MicroBotNet")
  if epochs != EPOCHS:  # a smoke run says the 1 epoch it trained
    epochs = study.epochs(epochs)
    name, title = f"{name}-e{epochs}", f"{title}, students trained {plural(epochs, 'epoch')}"
  if decay is not None:
    name, title = f"{name}-wd{decay:g}", f"{title}, students at weight decay {decay:g}"
  return name, title


def _distill_note(study) -> str:
  epochs, decay = study.epochs(study.args.epochs), study.args.student_weight_decay
  note = "Epochs: of that run"
  if study.args.teacher_width == 0.32:
    note += f" (the teacher continues the {epochs}-epoch baseline)"
  note += (f"; students: the baseline's recipe (SGD lr {RECIPE['lr']}, cosine, 1 warm-up "
           f"epoch, weight decay {RECIPE['weight_decay'] if decay is None else decay:g})")
  if study.args.kd_restart_epochs:
    note += (f", continued with a warm restart (SGD lr {RESTART['lr']}, cosine) in the "
             f"{epochs} + N rows")
  return note + "; the teacher's forward pass is part of the distilled run's time"


def main(argv=None):
  study = common.Study("seed002", __doc__, argv, _options, PARTS, ("ttq",),
                       datasets=("cifar10",))
  parts = study.parts
  if "widths" in parts:
    rows = widths(study)
    study.table("widths", "MicroBotNet widths on CIFAR-10", COLUMNS, rows,
                "the recipe of the ttq part's baseline (SGD lr 0.1, cosine, 1 warm-up "
                "epoch) for the epochs listed; fewer than 90 is a cut budget, far from "
                "converged")
    common.report.plot(str(study.out / "widths.png"),
                       {"MicroBotNet": ([r["nonzero_macs"] for r in rows],
                                        [r["error"] for r in rows])},
                       xlabel="MACs", ylabel="test error", title="Error vs MACs by width",
                       logx=True)
  if "ttq" in parts:
    rows, layers = ttq(study)
    study.table("ttq", "TTQ on MicroBotNet x0.32, CIFAR-10",
                COLUMNS[:-2] + (common.Column("zeros", "Zero weights",
                                              lambda v: "-" if v is None else f"{100 * v:.1f}%"),)
                + COLUMNS[-2:], rows,
                f"baseline {plural(study.epochs(study.args.epochs), 'epoch')}, every ternary "
                f"fine-tuning run listed (Adam lr "
                f"{TTQ['lr']:g}, cosine, for the latent kernels and scales too); zero weights: "
                f"of the ternarized tensors (the notes: {100 * NOTES_ZEROS:.1f}%)")
    study.table("ttq_layers", "Ternary weights per layer (MicroBotNet x0.32)",
                (common.Column("path", "Tensor"), common.Column("size", "Weights", "{:,}".format),
                 common.Column("positive", "+w_p", "{:,}".format),
                 common.Column("zero", "0", "{:,}".format),
                 common.Column("negative", "-w_n", "{:,}".format),
                 common.Column("sparsity", "Zeros", lambda v: f"{100 * v:.1f}%"),
                 common.Column("w_p", "w_p", lambda v: "-" if v is None else f"{v:.4f}"),
                 common.Column("w_n", "w_n", lambda v: "-" if v is None else f"{v:.4f}")),
                layers)
  if "distill" in parts:
    study.table(*_distill_table(study), COLUMNS, distill(study), _distill_note(study))
  study.finish()


if __name__ == "__main__":
  main()
