"""A compressed model in deployment runtimes against jcompress's XLA float32, side by
side (``jcompress bench --runtime onnxruntime[,stablehlo]``).

``workdir`` is the compressed run (8-bit ``quantize``/``qat`` for ONNX Runtime's int8
kernels), ``baseline`` the float run it came from. Both are exported into a temporary
folder (:mod:`jcompress.onnx_export`: the baseline as float32, the compressed run
with ``activations`` quantized, static by default; :mod:`jcompress.stablehlo`: the
compressed run) and timed in one child process per thread count, pinned to that many
CPUs (as ``bench --cpus``) with ONNX Runtime's intra-op pool set to it, the variants
taking turns within each repeat so they share the machine's load:

* ``xla fp32``: the jitted forward pass of ``baseline`` (what ``jcompress eval`` runs);
* ``ort fp32`` / ``ort int8``: ONNX Runtime on the baseline's float32 export and on
  the compressed run's export (``onnxruntime``);
* ``stablehlo``: the compressed run's ``jax.export`` module, deserialized and called
  (``stablehlo``; XLA dequantizes its int8 constants in the graph).

Batch 1 is reported as latency (ms per call), larger batches as throughput
(images/s); each number is the best of ``repeats`` loops of about ``min_time``
seconds. ``profile`` adds ONNX Runtime's time per op type for each ONNX file at the
largest batch on one thread (where int8 is not faster, which float ops between the
int8 kernels cost the time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

RUNTIMES = ("onnxruntime", "stablehlo")


def best_time(fn: Callable[[], Any], min_time: float, repeats: int) -> float:
  """Seconds per call of ``fn``: the best of ``repeats`` loops of at least ``min_time``
  / 4 seconds each (the loop length found by doubling, after one warm-up call)."""
  fn()
  n = 1
  while True:
    start = time.perf_counter()
    for _ in range(n):
      fn()
    t = time.perf_counter() - start
    if t >= min_time / 4 or n > 1 << 16:
      break
    n *= 2
  best = t / n
  for _ in range(repeats - 1):
    start = time.perf_counter()
    for _ in range(n):
      fn()
    best = min(best, (time.perf_counter() - start) / n)
  return best


def profile(path: str, shape: Sequence[int], batch: int, runs: int = 20
            ) -> list[tuple[str, float]]:
  """``[(op type, share of node time)]`` of ONNX Runtime's profile of ``path`` run
  ``runs`` times at ``batch`` on one thread, largest share first."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jcompress import onnx_export  # pylint: disable=import-outside-toplevel
  _, ort = onnx_export.require()
  opts = ort.SessionOptions()
  opts.enable_profiling, opts.intra_op_num_threads, opts.log_severity_level = True, 1, 3
  opts.profile_file_prefix = os.path.join(os.path.dirname(path), "profile")
  sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
  x = np.zeros((batch, *shape), np.float32)
  for _ in range(runs):
    sess.run(None, {"images": x})
  with open(sess.end_profiling(), encoding="utf-8") as f:
    events = json.load(f)
  total: dict[str, float] = {}
  for e in events:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
      total[e["args"]["op_name"]] = total.get(e["args"]["op_name"], 0.0) + e["dur"]
  whole = sum(total.values()) or 1.0
  return sorted(((k, v / whole) for k, v in total.items()), key=lambda kv: -kv[1])


def _child(spec: dict) -> list[dict]:
  """Times every variant of ``spec`` on ``spec['threads']`` pinned CPUs."""
  from jcompress import bench  # pylint: disable=import-outside-toplevel
  bench.pin_cpus(spec["threads"])
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jcompress import onnx_export, stablehlo  # pylint: disable=import-outside-toplevel
  from jcompress.train.loop import load_workdir  # pylint: disable=import-outside-toplevel
  model, state, meta, method = load_workdir(spec["baseline"])
  xla = jax.jit(stablehlo.forward(model, state, method))
  files = spec["files"]
  sessions = {k: onnx_export.session(files[k], spec["threads"])
              for k in ("ort fp32", "ort int8") if k in files}
  hlo = jax.jit(stablehlo.load(files["stablehlo"])[0].call) if "stablehlo" in files else None
  rows = []
  for batch in spec["batch_sizes"]:
    x = np.random.default_rng(0).standard_normal((batch, *meta["input_shape"])).astype(
        np.float32)
    fns = {"xla fp32": lambda x=x: xla(x).block_until_ready()}
    fns |= {k: (lambda s=s, x=x: s.run(None, {"images": x})) for k, s in sessions.items()}
    if hlo is not None:
      fns["stablehlo"] = lambda x=x: hlo(x).block_until_ready()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(spec["repeats"]):  # take turns
      for k, fn in fns.items():
        times[k].append(best_time(fn, spec["min_time"], 1))
    rows += [{"threads": spec["threads"], "batch": batch, "variant": k, "seconds": min(ts)}
             for k, ts in times.items()]
  return rows


def run(workdir: str, baseline: str, runtimes: Sequence[str], *,
        threads: Sequence[int] = (1, 2), batch_sizes: Sequence[int] = (1, 128),
        repeats: int = 7, min_time: float = 0.2, activations: str = "static",
        calibration_batches: int = 8, calibration_percentile: float | None = None,
        with_profile: bool = False, data_dir: str | None = None) -> dict[str, Any]:
  """Exports ``workdir`` and ``baseline`` and times them (module docstring).

  Returns:
    ``{"rows": [{"threads", "batch", "variant", "seconds"}], "file_bytes": {variant:
    bytes}, "int8_ops": {op: count}, "profile": {variant: [(op, share)]},
    "load_average"}``.

  Raises:
    ValueError: a bad option, runs of different models, or a missing ``[deploy]`` extra.
  """
  from jcompress import bench  # pylint: disable=import-outside-toplevel
  from jcompress import onnx_export, stablehlo  # pylint: disable=import-outside-toplevel
  from jcompress.train.loop import load_workdir  # pylint: disable=import-outside-toplevel
  bad = [r for r in runtimes if r not in RUNTIMES]
  if bad or not runtimes:
    raise ValueError(f"--runtime takes {' or '.join(RUNTIMES)} (comma-separated), got "
                     f"{','.join(runtimes) or 'nothing'}")
  if repeats < 1 or min_time <= 0:
    raise ValueError(f"--repeats must be >= 1 and --min-time > 0, got {repeats}, {min_time}")
  available = bench.cpu_count()
  if max(threads) > available:
    raise ValueError(f"--threads {max(threads)} is more than the {available} CPUs this "
                     "process may use")
  loaded = load_workdir(workdir)
  base = load_workdir(baseline)
  if (base[2]["model"], base[2]["dataset"]) != (loaded[2]["model"], loaded[2]["dataset"]):
    raise ValueError(f"--baseline {baseline} is {base[2]['model']} on {base[2]['dataset']}, "
                     f"--workdir {workdir} {loaded[2]['model']} on {loaded[2]['dataset']}: "
                     "give the run it was compressed from")
  out: dict[str, Any] = {"file_bytes": {}, "int8_ops": {}, "profile": {}}
  with tempfile.TemporaryDirectory(prefix="jcompress-bench-") as tmp:
    files = {}
    if "onnxruntime" in runtimes:
      files = {"ort fp32": os.path.join(tmp, "fp32.onnx"), "ort int8": os.path.join(tmp,
                                                                                   "int8.onnx")}
      onnx_export.export(files["ort fp32"], *base, activations="float", data_dir=data_dir)
      onnx_export.export(files["ort int8"], *loaded, activations=activations,
                         calibration_batches=calibration_batches,
                         calibration_percentile=calibration_percentile, data_dir=data_dir)
      out["int8_ops"] = onnx_export.int8_ops(files["ort int8"])
    if "stablehlo" in runtimes:
      files["stablehlo"] = os.path.join(tmp, "model.stablehlo")
      stablehlo.export(files["stablehlo"], *loaded)
    out["file_bytes"] = {k: os.path.getsize(v) for k, v in files.items()}
    shape = base[2]["input_shape"]
    del loaded, base
    out["rows"] = []
    for n in threads:
      spec = {"threads": n, "baseline": str(baseline), "files": files,
              "batch_sizes": list(batch_sizes), "repeats": repeats, "min_time": min_time}
      proc = subprocess.run([sys.executable, "-m", "jcompress.runtime_bench", json.dumps(spec)],
                            capture_output=True, text=True, check=False)
      if proc.returncode:
        raise RuntimeError(f"bench --runtime: the {n}-thread timing process failed:\n"
                           f"{proc.stderr[-2000:]}")
      out["rows"] += json.loads(proc.stdout.strip().splitlines()[-1])
    if with_profile:
      out["profile"] = {k: profile(v, shape, max(batch_sizes)) for k, v in files.items()
                        if k.startswith("ort")}
  out["load_average"] = os.getloadavg()[0]
  return out


def render(result: dict[str, Any]) -> str:
  """A markdown table: one row per thread count and batch, one column per variant,
  then ONNX Runtime float32 time / int8 time and XLA float32 time / int8 time."""
  rows = result["rows"]
  variants = list(dict.fromkeys(r["variant"] for r in rows))
  ratios = [("ort fp32", "ort fp32 / int8"), ("xla fp32", "xla fp32 / ort int8")]
  ratios = [(k, title) for k, title in ratios if "ort int8" in variants and k in variants]
  lines = ["| threads | batch | " + " | ".join(variants + [t for _, t in ratios]) + " |",
           "|---" * (2 + len(variants) + len(ratios)) + "|"]
  for threads, batch in dict.fromkeys((r["threads"], r["batch"]) for r in rows):
    t = {r["variant"]: r["seconds"] for r in rows
         if (r["threads"], r["batch"]) == (threads, batch)}
    cells = [f"{t[v] * 1e3:.3f} ms" if batch == 1 else f"{batch / t[v]:,.0f} img/s"
             for v in variants]
    cells += [f"{t[k] / t['ort int8']:.2f}x" for k, _ in ratios]
    lines.append(f"| {threads} | {batch} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  print(json.dumps(_child(json.loads(sys.argv[1]))))
