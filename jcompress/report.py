"""Tables of costs: a model's per-layer table and the MNIST baselines study's
model comparisons, as plain text, markdown, LaTeX or JSON.

>>> from jcompress import report
>>> row = report.ModelRow("Fully Connected, Small", 0.093959, mults=519_936,
...                       params=521_215, bytes=521_215 * 4)
>>> print(report.comparison_table([row], "markdown"))
| Model | Error | Mults | Params | Bytesize | Score |
|---|---|---|---|---|---|
| Fully Connected, Small | 0.093959 | 519.936K | 521.215K | 2.08MB | 11.0079 |
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

from jcompress import cost

FORMATS = ("text", "markdown", "latex", "json")
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$",
                  "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def _check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise ValueError(f"report: format must be one of {FORMATS}, got {fmt!r}")


def render(header: Sequence[str], rows: Sequence[Sequence[str]], fmt: str,
           footer: Sequence[Sequence[str]] = ()) -> str:
  """Lays out string cells as a ``text``, ``markdown`` or ``latex`` table.

  Args:
    header: the column names.
    rows: the body, one sequence of cells per row.
    fmt: ``text`` (aligned columns), ``markdown`` or ``latex`` (a tabular
      environment in the MNIST baselines study's ``& ... \\\\ \\hline`` layout).
    footer: rows set apart below the body (totals).

  Returns:
    The table, without a trailing newline.
  """
  table = [list(header), *map(list, rows), *map(list, footer)]
  if fmt == "text":
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    rule = "  ".join("-" * w for w in widths)
    body = [lines[0], rule, *lines[1:len(rows) + 1]]
    return "\n".join(body + ([rule, *lines[len(rows) + 1:]] if footer else []))
  if fmt == "markdown":
    lines = [f"| {' | '.join(row)} |" for row in table]
    return "\n".join([lines[0], "|" + "---|" * len(header), *lines[1:]])
  if fmt == "latex":
    escaped = ["".join(_LATEX_SPECIAL.get(ch, ch) for ch in cell) for row in table
               for cell in row]
    width = len(header)
    lines = [" & ".join(escaped[i:i + width]) + r" \\ \hline"
             for i in range(0, len(escaped), width)]
    spec = "l" * width
    return "\n".join([rf"\begin{{tabular}}{{{spec}}}", r"\hline", *lines, r"\end{tabular}"])
  raise ValueError(f"report: render format must be text, markdown or latex, got {fmt!r}")


def thousands(n: float) -> str:
  """The comparison tables' ``K`` notation, truncated: 519936 -> ``519.936K``."""
  return f"{int(n) / 1000}K"


def byte_size(n: float) -> str:
  """The comparison tables' byte notation: ``2.08MB`` above 1e6 bytes, else
  ``260.607KB``."""
  return f"{int(100 * n / 1e6) / 100}MB" if n > 1e6 else f"{int(n) / 1000}KB"


def plural(n: int, noun: str) -> str:
  """``1 epoch``, ``2 epochs``."""
  return f"{n} {noun}{'' if n == 1 else 's'}"


def bytes_text(n: float) -> str:
  """A byte count as an integer with its binary unit; a fraction (1.6-bit trits)
  rounds up.

  >>> bytes_text(1_066_440), bytes_text(134_740.2), bytes_text(500)
  ('1,066,440 B (1.02 MiB)', '134,741 B (131.6 KiB)', '500 B')
  """
  n = math.ceil(n)
  for unit, size, digits in (("GiB", 2 ** 30, 2), ("MiB", 2 ** 20, 2), ("KiB", 2 ** 10, 1)):
    if n >= size:
      return f"{n:,} B ({n / size:.{digits}f} {unit})"
  return f"{n:,} B"


HEADLINES = {"params": "Params", "macs": "MACs", "nonzero_macs": "Nonzero MACs",
             "bytes": "Bytes", "sparsity": "Sparsity", "energy_uj": "Energy (uJ)",
             "exported_bytes": "Exported bytes", "error": "Error", "score": "Score"}


def value_text(key: str, value: Any) -> str:
  """One headline number of ``eval`` / ``summary`` as text: bytes with units
  (``*bytes``), integers with thousands separators, other numbers to 4 places,
  None as ``-``."""
  if value is None:
    return "-"
  if key.endswith("bytes") and isinstance(value, (int, float)):
    return bytes_text(value)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return str(value)
  return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


def key_values(values: dict[str, Any]) -> str:
  """``key: value`` lines with the keys right-aligned to the longest (:func:`value_text`)."""
  width = max(map(len, values), default=0)
  return "\n".join(f"{k:>{width}}: {value_text(k, v)}" for k, v in values.items())


def headline_table(values: dict[str, Any], fmt: str) -> str:
  """The headline numbers as a one-row table (``render`` formats)."""
  return render([HEADLINES.get(k, k) for k in values],
                [[value_text(k, v) for k, v in values.items()]], fmt)


def _score_text(value: float) -> str:
  return f"{int(10000 * value) / 10000}"


@dataclasses.dataclass(frozen=True)
class ModelRow:
  """One model in a comparison table.

  Attributes:
    name: the model's label.
    error: its test error in (0, 1].
    mults: multiplications per example (under the convention being compared).
    params: its parameters.
    bytes: its storage in bytes.
    baseline: the score of the model it is compared against, if any.
  """
  name: str
  error: float
  mults: float
  params: int
  bytes: float
  baseline: float | None = None

  @property
  def score(self) -> float:
    return cost.score(self.error, self.bytes, self.mults)

  @classmethod
  def from_summary(cls, name: str, error: float, summary: cost.Summary, *,
                   convention: str = "macs", baseline: float | None = None) -> ModelRow:
    """The row of a ``cost.Summary``, counting ``summary.mults(convention)``."""
    return cls(name, error, summary.mults(convention), summary.params, summary.bytes,
               baseline)

  def to_dict(self) -> dict[str, Any]:
    return {"model": self.name, "error": self.error, "mults": self.mults,
            "params": self.params, "bytes": self.bytes, "score": self.score,
            "baseline": self.baseline}


def comparison_table(rows: Sequence[ModelRow], fmt: str = "text") -> str:
  """The MNIST baselines study's comparison table: Model, Error, Mults, Params,
  Bytesize, Score (and Baseline when any row has one).

  Args:
    rows: the models.
    fmt: one of ``FORMATS``; ``json`` gives a list of row dicts.

  Returns:
    The table.
  """
  _check_format(fmt)
  if fmt == "json":
    return json.dumps([row.to_dict() for row in rows], indent=2)
  with_baseline = any(row.baseline is not None for row in rows)
  header = ["Model", "Error", "Mults", "Params", "Bytesize", "Score"]
  header += ["Baseline"] if with_baseline else []
  cells = []
  for row in rows:
    line = [row.name, f"{row.error:g}", thousands(row.mults), thousands(row.params),
            byte_size(row.bytes), _score_text(row.score)]
    if with_baseline:
      line.append("-" if row.baseline is None else _score_text(row.baseline))
    cells.append(line)
  return render(header, cells, fmt)


def _shape(shape: Sequence[int] | None) -> str:
  return "-" if shape is None else "x".join(map(str, shape)) or "scalar"


def _count(n: float) -> str:
  return f"{n:,.0f}"


def layer_table(summary: cost.Summary, fmt: str = "text") -> str:
  """The per-layer table of a summary with a totals row.

  Args:
    summary: from ``cost.summarize``.
    fmt: one of ``FORMATS``; ``json`` gives ``summary.to_dict()`` (totals and a
      ``layers`` list).

  Returns:
    The table.
  """
  _check_format(fmt)
  if fmt == "json":
    return json.dumps(summary.to_dict(), indent=2)
  header = ["Layer", "Kind", "Input", "Output", "Params", "MACs", "Nonzero MACs",
            "FLOPs", "Other ops", "Bits", "Bytes", "Sparsity"]
  rows = []
  for layer in summary.layers:
    rows.append([layer.path or "(top)", layer.kind, _shape(layer.input_shape),
                 _shape(layer.output_shape), _count(layer.params), _count(layer.macs),
                 _count(layer.nonzero_macs), _count(layer.flops), _count(layer.other_ops),
                 "-" if layer.bits is None else f"{layer.bits:g}", _count(layer.bytes),
                 f"{layer.sparsity:.1%}"])
  total = ["total", "", _shape(summary.input_shape), "", _count(summary.params),
           _count(summary.macs), _count(summary.nonzero_macs), _count(summary.flops),
           _count(summary.other_ops), f"{summary.bits:g}", _count(summary.bytes),
           f"{summary.sparsity:.1%}"]
  return render(header, rows, fmt, footer=[total])


def plot(path: str, series: dict[str, tuple[Sequence[float], Sequence[float]]], *,
         xlabel: str, ylabel: str, title: str = "", logx: bool = False, logy: bool = False,
         lines: bool = True, contours: Sequence[float] = ()) -> None:
  """Writes a PNG of one or more ``label -> (xs, ys)`` series.

  Args:
    path: the PNG file.
    series: the curves (or point sets with ``lines=False``).
    xlabel, ylabel, title: the labels.
    logx, logy: logarithmic axes.
    lines: join each series' points (error vs sparsity) or scatter them (Pareto
      plots).
    contours: values ``c`` of ``x * y = c`` drawn as dashed lines: with error on
      y and bytes (or MACs) on x, lines of equal log10(error x bytes x mults)
      score at fixed mults (or bytes).
  """
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for label, (xs, ys) in series.items():
    ax.plot(xs, ys, "o-" if lines else "o", label=label, markersize=4)
  if contours:
    (lo, hi), ylim = ax.get_xlim(), ax.get_ylim()
    xs = [lo + (hi - lo) * i / 100 for i in range(1, 101) if lo + (hi - lo) * i / 100 > 0]
    for c in contours:
      ax.plot(xs, [c / x for x in xs], "--", color="grey", linewidth=0.7)
    ax.set_xlim(lo, hi)
    ax.set_ylim(*ylim)
  ax.set_xscale("log" if logx else "linear")
  ax.set_yscale("log" if logy else "linear")
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
