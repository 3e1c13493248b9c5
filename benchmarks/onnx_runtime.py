"""ONNX Runtime int8 vs ONNX Runtime float32 vs jcompress's XLA float32, side by side.

    .venv/bin/python benchmarks/onnx_runtime.py --workdir FLOAT_RUN --quantized INT8_RUN \
        [--threads 1,2] [--batch-sizes 1,128] [--repeats 7] [--min-time 0.2]

``FLOAT_RUN`` is a trained run, ``INT8_RUN`` the same model compressed with
``quantize``/``qat`` (8 bits). Both are exported here (``export --format onnx``:
the float run as float32, the quantized one with static uint8 activations) and
timed, in one process per thread count (pinned to that many CPUs, as ``bench
--cpus``; ORT's intra-op pool set to it), the variants taking turns so they share
the machine's load:

* ``xla fp32``: the jitted forward pass of ``FLOAT_RUN`` (what ``jcompress eval`` runs);
* ``ort fp32``: ONNX Runtime on the float32 export;
* ``ort int8``: ONNX Runtime on the int8 export (its int8 kernels are listed).

Batch 1 is reported as latency (ms per call), larger batches as throughput
(images/s); each number is the best of ``--repeats`` loops of about ``--min-time``
seconds. The files' sizes are printed too. ``--profile`` adds ONNX Runtime's
profile of each export at the largest batch on one thread: the share of time per
op type (where int8 is not faster, it says which float ops between the int8
kernels cost the time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _loop(fn, min_time: float, repeats: int) -> float:
  """Seconds per call: the best of ``repeats`` loops of at least ``min_time``."""
  fn()
  n, t = 1, 0.0
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


def profile(path: str, shape, batch: int, runs: int = 20) -> list[tuple[str, float]]:
  """``[(op type, share of the node time)]`` of ORT's profile of ``path``, one thread."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
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
      op = e["args"]["op_name"]
      total[op] = total.get(op, 0.0) + e["dur"]
  whole = sum(total.values()) or 1.0
  return sorted(((k, v / whole) for k, v in total.items()), key=lambda kv: -kv[1])


def child(args) -> None:
  from jcompress import bench  # pylint: disable=import-outside-toplevel
  bench.pin_cpus(args.threads)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from jcompress import onnx_export, stablehlo  # pylint: disable=import-outside-toplevel
  from jcompress.train.loop import load_workdir  # pylint: disable=import-outside-toplevel
  model, state, meta, method = load_workdir(args.workdir)
  xla = jax.jit(stablehlo.forward(model, state, method))
  sessions = {"ort fp32": onnx_export.session(args.float_file, args.threads),
              "ort int8": onnx_export.session(args.int8_file, args.threads)}
  rows = []
  for batch in args.batch_sizes:
    x = np.random.default_rng(0).standard_normal((batch, *meta["input_shape"])).astype(
        np.float32)
    fns = {"xla fp32": lambda x=x: xla(x).block_until_ready()}
    fns |= {k: (lambda s=s, x=x: s.run(None, {"images": x})) for k, s in sessions.items()}
    times = {k: [] for k in fns}
    for _ in range(args.repeats):  # take turns
      for k, fn in fns.items():
        times[k].append(_loop(fn, args.min_time, 1))
    for k, ts in times.items():
      rows.append({"threads": args.threads, "batch": batch, "variant": k,
                   "seconds": min(ts)})
  print(json.dumps(rows))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="the float32 run")
  p.add_argument("--quantized", required=True, help="the same model quantized to 8 bits")
  p.add_argument("--threads", default="1,2", help="thread counts (default %(default)s)")
  p.add_argument("--batch-sizes", default="1,128", help="(default %(default)s)")
  p.add_argument("--repeats", type=int, default=7, help="(default %(default)s)")
  p.add_argument("--min-time", type=float, default=0.2, help="seconds per loop (default "
                 "%(default)s)")
  p.add_argument("--calibration-batches", type=int, default=8, help="(default %(default)s)")
  p.add_argument("--profile", action="store_true", help="print ORT's time per op type")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--float-file", help=argparse.SUPPRESS)
  p.add_argument("--int8-file", help=argparse.SUPPRESS)
  args = p.parse_args()
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  if args.child:
    args.threads = int(args.threads)
    child(args)
    return
  from jcompress import onnx_export  # pylint: disable=import-outside-toplevel
  from jcompress.train.loop import load_workdir  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    files = {"float": os.path.join(tmp, "float.onnx"), "int8": os.path.join(tmp, "int8.onnx")}
    onnx_export.export(files["float"], *load_workdir(args.workdir), activations="float")
    sizes = onnx_export.export(files["int8"], *load_workdir(args.quantized),
                               activations="static",
                               calibration_batches=args.calibration_batches)
    print(f"ort fp32 file {os.path.getsize(files['float']):,} B, ort int8 file "
          f"{sizes['file_bytes']:,} B; int8 kernels ORT runs: "
          f"{onnx_export.int8_ops(files['int8'])}")
    rows = []
    for threads in args.threads.split(","):
      out = subprocess.run([sys.executable, __file__, "--child", "--threads", threads,
                            "--workdir", args.workdir, "--quantized", args.quantized,
                            "--float-file", files["float"], "--int8-file", files["int8"],
                            "--batch-sizes", ",".join(map(str, args.batch_sizes)),
                            "--repeats", str(args.repeats), "--min-time", str(args.min_time)],
                           check=True, capture_output=True, text=True)
      rows += json.loads(out.stdout.strip().splitlines()[-1])
    if args.profile:
      shape = load_workdir(args.workdir)[2]["input_shape"]
      for name, path in files.items():
        ops = profile(path, shape, max(args.batch_sizes))
        print(f"ort {name} profile, batch {max(args.batch_sizes)}, 1 thread: " + ", ".join(
            f"{op} {share:.0%}" for op, share in ops if share >= 0.01))
  print(f"load average {os.getloadavg()[0]:.2f}")
  print("| threads | batch | xla fp32 | ort fp32 | ort int8 | ort fp32 time / ort int8 time |")
  print("|---|---|---|---|---|---|")
  for threads in args.threads.split(","):
    for batch in args.batch_sizes:
      t = {r["variant"]: r["seconds"] for r in rows
           if r["threads"] == int(threads) and r["batch"] == batch}
      cell = ((lambda s: f"{s * 1e3:.3f} ms") if batch == 1 else
              (lambda s, b=batch: f"{b / s:,.0f} img/s"))
      print(f"| {threads} | {batch} | {cell(t['xla fp32'])} | {cell(t['ort fp32'])} | "
            f"{cell(t['ort int8'])} | {t['ort fp32'] / t['ort int8']:.2f}x |")
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
