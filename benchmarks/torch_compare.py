"""jcompress vs PyTorch on CPU: train-step and inference throughput, side by side.

    .venv/bin/python benchmarks/torch_compare.py --models lenet300,lenet5,microbotnet \\
        --threads 1 --batch-size 128 --seconds 2 --repeats 3 --rounds 1

Needs PyTorch (CPU build): ``.venv/bin/pip install torch==2.13.0`` (the ``bench`` extra).

For each model (``lenet300`` and ``lenet5`` on 28x28x1, ``microbotnet`` at width 0.32 on
32x32x3, 10 classes) it measures, in images/s:

* the train step at ``--batch-size``: jcompress's
  ``jax.jit(partial(train_step, model=model, tx=optax.sgd(0.01, momentum=0.9)),
  donate_argnums=0)`` against an eager ``torch.nn`` mirror of the same architecture
  (``torch.optim.SGD(lr=0.01, momentum=0.9)``, ``F.cross_entropy``, fp32, train mode,
  so batch norm updates its statistics and dropout is on in both), both on one
  resident random batch;
* inference at batch 1 and at ``--batch-size``: ``jax.jit(lambda v, x:
  model.apply(v, x, train=False))`` against the torch model in ``eval()`` under
  ``torch.inference_mode()``.

It prints ``jcompress / torch`` ratios (> 1 means jcompress is faster) and both
parameter counts (the torch mirror must have exactly as many parameters as the
jcompress model, or the run stops).

Isolation: every (model, framework) pair runs in its own fresh subprocess, so the
two runtimes never share a process: no idle OpenMP threads of torch spin next to
XLA's pool, no allocator or import state carries over, and each side gets the
whole (pinned) CPU set. ``--rounds R`` runs the jcompress/torch pair R times,
alternating, and reports the median over all rounds and repeats, which evens
out drift of a machine shared with other jobs.

Threads (``--threads N``, default 1), pinned the
same way for both sides: each worker restricts itself with
``os.sched_setaffinity`` to the first N allowed CPUs before importing either
framework (XLA's CPU client sizes its intra-op thread pool from the schedulable
CPUs, and OpenMP does too), and the environment gets ``OMP_NUM_THREADS``,
``MKL_NUM_THREADS`` = N. Torch then calls ``torch.set_num_threads(N)`` and
``torch.set_num_interop_threads(1)``; XLA gets
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=true`` (``false`` when N = 1). XLA has
no intra-op thread-count flag in this jaxlib (``intra_op_parallelism_threads`` is
a TensorFlow session option), so the affinity mask is what bounds it.

Why the default is 1: on a machine shared with other jobs (more runnable threads
than cores), PyTorch's OpenMP parallel regions stall at their barriers whenever
one of their threads is descheduled, while XLA's work-stealing pool degrades
gracefully; with 2 threads on a 2-core machine at load ~9 torch's LeNet-300 train
step fell from ~18,000 to ~1,650 img/s, which would flatter jcompress tenfold.
One thread per side is the comparison that stays fair under load; pass
``--threads N`` (N = physical cores) on a dedicated machine.

Timing: compile and warm up, calibrate the number of steps to about
``--seconds``, then time that many steps ``--repeats`` times (synchronising with
``jax.block_until_ready`` at the end; torch on CPU is synchronous) and take the
median.

Architecture notes for the torch mirror (NCHW): same layer sizes, no conv bias
where jcompress has none, BatchNorm2d(momentum=0.1, eps=1e-5) for flax's
momentum 0.9, ``nn.Hardswish``/``nn.Hardsigmoid`` (the same ``x*relu6(x+3)/6``
formulas), SE = mean, fc (no bias), ReLU, fc (no bias), h-sigmoid, scale. Convs
pad symmetrically (``k // 2``) as the original PyTorch MicroBotNet does; flax's
``SAME`` pads stride-2 convs on even inputs asymmetrically (one pixel less on the
top/left), which gives the same output shapes and FLOPs but not bit-identical
outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = {  # name -> (input shape HWC, expected parameter count)
    "lenet300": ((28, 28, 1), 266_610),
    "lenet5": ((28, 28, 1), 431_080),
    "microbotnet": ((32, 32, 3), 236_658),
}
NUM_CLASSES = 10
LR = 0.01


# ---------------------------------------------------------------- timing helpers

def _measure(run, batch: int, seconds: float, repeats: int) -> dict:
  """Images/s of ``run(n)`` (n steps, synchronised at the end); median of repeats."""
  for _ in range(3):  # compile / warm up
    run(1)
  n, elapsed = 1, 0.0
  while True:  # calibrate: double n until a chunk takes >= 0.1 s
    t = time.perf_counter()
    run(n)
    elapsed = time.perf_counter() - t
    if elapsed >= 0.1 or n >= 1 << 20:
      break
    n *= 2
  steps = max(1, int(round(seconds * n / elapsed)))
  rates = []
  for _ in range(repeats):
    t = time.perf_counter()
    run(steps)
    rates.append(steps * batch / (time.perf_counter() - t))
  return {"median": statistics.median(rates), "all": rates, "steps": steps}


# ---------------------------------------------------------------- jcompress side

def _dist_version(dist: str) -> str:
  from importlib import metadata
  try:
    return metadata.version(dist)
  except metadata.PackageNotFoundError:
    return "?"


def _jax_worker(name: str, args) -> dict:
  import functools

  import jax
  import numpy as np
  import optax

  from jcompress import models
  from jcompress.train import step as step_lib

  shape = MODELS[name][0]
  model = models.create(name, num_classes=NUM_CLASSES, input_shape=shape)
  tx = optax.sgd(LR, momentum=0.9)
  state = step_lib.init_state(model, tx, shape, 0)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  rng = np.random.default_rng(0)
  bs = args.batch_size
  batch = {"image": jax.device_put(rng.standard_normal((bs, *shape), np.float32)),
           "label": jax.device_put(rng.integers(0, NUM_CLASSES, bs).astype(np.int32))}
  train = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx),
                  donate_argnums=0)
  box = {"state": state}

  def run_train(n):
    s, m = box["state"], None
    for _ in range(n):
      s, m = train(s, batch)
    jax.block_until_ready((s, m))
    box["state"] = s

  out = {"params": n_params, "train": _measure(run_train, bs, args.seconds, args.repeats)}
  s = box["state"]
  variables = {"params": s.params, "batch_stats": s.batch_stats} if s.batch_stats \
      else {"params": s.params}
  infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
  for b in (1, bs):
    x = jax.device_put(rng.standard_normal((b, *shape), np.float32))

    def run_infer(n, x=x):
      y = None
      for _ in range(n):
        y = infer(variables, x)
      jax.block_until_ready(y)

    out[f"infer_b{b}"] = _measure(run_infer, b, args.seconds, args.repeats)
  import jaxlib
  out["version"] = (f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
                    f"jcompress {_dist_version('jcompress')}, "
                    f"backend {jax.devices()[0].platform}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  return out


# ---------------------------------------------------------------- torch side

def _ensure_divisible(value: float, divisor: int = 8) -> int:
  """Same rounding as jcompress.models.blocks.ensure_divisible (copied: no jax import)."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


def _torch_model(name: str):
  import torch
  from torch import nn

  if name == "lenet300":
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100),
                         nn.ReLU(), nn.Linear(100, NUM_CLASSES))
  if name == "lenet5":  # Caffe LeNet-5: no activation after the convs
    return nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2, 2), nn.Conv2d(20, 50, 5),
                         nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(800, 500), nn.ReLU(),
                         nn.Linear(500, NUM_CLASSES))
  if name != "microbotnet":
    raise ValueError(name)

  def bn(c):
    return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)

  def act(kind):
    return nn.ReLU() if kind == "relu" else nn.Hardswish()

  class SE(nn.Module):
    def __init__(self, c, reduction=4):
      super().__init__()
      self.fc1 = nn.Linear(c, c // reduction, bias=False)
      self.fc2 = nn.Linear(c // reduction, c, bias=False)
      self.relu, self.gate = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x):
      y = x.mean((2, 3))
      y = self.gate(self.fc2(self.relu(self.fc1(y))))
      return x * y[:, :, None, None]

  class Block(nn.Module):
    def __init__(self, cin, expansion, cout, kernel, stride, se, kind):
      super().__init__()
      self.residual = stride == 1 and cin == cout
      self.expand = None
      if expansion != cin:
        self.expand = nn.Sequential(nn.Conv2d(cin, expansion, 1, bias=False), bn(expansion),
                                    act(kind))
      self.dw = nn.Conv2d(expansion, expansion, kernel, stride, kernel // 2, groups=expansion,
                          bias=False)
      self.dw_bn = bn(expansion)
      self.se = SE(expansion) if se else None
      self.act = act(kind)
      self.project = nn.Conv2d(expansion, cout, 1, bias=False)
      self.project_bn = bn(cout)  # "lastBN" in residual blocks

    def forward(self, x):
      y = self.expand(x) if self.expand is not None else x
      y = self.dw_bn(self.dw(y))
      if self.se is not None:
        y = self.se(y)
      y = self.project_bn(self.project(self.act(y)))
      return x + y if self.residual else y

  from jcompress_small_config import SMALL_CONFIG  # noqa: see _load_small_config
  w = 0.32
  stem = _ensure_divisible(16 * w)
  layers = [nn.Conv2d(3, stem, 3, 2, 1, bias=False), bn(stem), nn.Hardswish()]
  cin, expansion = stem, 0
  for kernel, exp, out, se, kind, stride in SMALL_CONFIG:
    expansion, cout = _ensure_divisible(exp * w), _ensure_divisible(out * w)
    layers.append(Block(cin, expansion, cout, kernel, stride, se, kind))
    cin = cout
  head = _ensure_divisible(expansion * w)
  features = 1024
  layers += [nn.Conv2d(cin, head, 1, bias=False), bn(head), nn.Hardswish(),
             nn.AdaptiveAvgPool2d(1), nn.Conv2d(head, features, 1, bias=False), nn.Hardswish(),
             nn.Flatten(), nn.Dropout(0.2), nn.Linear(features, NUM_CLASSES)]
  del torch
  return nn.Sequential(*layers)


def _load_small_config():
  """Makes jcompress's MicroBotNet table importable without importing jax.

  The table is parsed from jcompress/models/microbotnet.py's source (a literal), so
  the torch worker mirrors the exact config without loading JAX into its process.
  """
  import ast
  import types
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "jcompress",
                      "models", "microbotnet.py")
  tree = ast.parse(open(path).read())
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "SMALL_CONFIG"
                                            for t in node.targets):
      mod = types.ModuleType("jcompress_small_config")
      mod.SMALL_CONFIG = ast.literal_eval(node.value)
      sys.modules["jcompress_small_config"] = mod
      return
  raise RuntimeError(f"SMALL_CONFIG not found in {path}")


def _torch_worker(name: str, args) -> dict:
  import torch
  import torch.nn.functional as F

  torch.set_num_threads(args.threads)
  try:
    torch.set_num_interop_threads(1)
  except RuntimeError:
    pass
  _load_small_config()
  torch.manual_seed(0)
  shape = MODELS[name][0]
  model = _torch_model(name).float()
  n_params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
  bs = args.batch_size
  h, w, c = shape
  x = torch.randn(bs, c, h, w)
  y = torch.randint(0, NUM_CLASSES, (bs,))
  model.train()

  def run_train(n):
    for _ in range(n):
      opt.zero_grad(set_to_none=True)
      logits = model(x)
      loss = F.cross_entropy(logits, y)
      loss.backward()
      opt.step()
      correct = (logits.detach().argmax(-1) == y).sum()
    del correct

  out = {"params": n_params, "train": _measure(run_train, bs, args.seconds, args.repeats)}
  model.eval()
  for b in (1, bs):
    xb = torch.randn(b, c, h, w)

    def run_infer(n, xb=xb):
      with torch.inference_mode():
        for _ in range(n):
          model(xb)

    out[f"infer_b{b}"] = _measure(run_infer, b, args.seconds, args.repeats)
  out["version"] = (f"torch {torch.__version__}, num_threads {torch.get_num_threads()}, "
                    f"interop {torch.get_num_interop_threads()}, "
                    f"mkldnn {torch.backends.mkldnn.is_available()}")
  return out


# ---------------------------------------------------------------- orchestration

def _pin(threads: int) -> list[int]:
  cpus = sorted(os.sched_getaffinity(0))[:threads]
  os.sched_setaffinity(0, cpus)
  return cpus


def _worker_env(threads: int) -> dict:
  env = dict(os.environ)
  eigen = "true" if threads > 1 else "false"
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_cpu_multi_thread_eigen" not in f]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_cpu_multi_thread_eigen={eigen}"])
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    env[var] = str(threads)
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


def _run_worker(framework: str, name: str, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--models", name,
         "--threads", str(args.threads), "--batch-size", str(args.batch_size),
         "--seconds", str(args.seconds), "--repeats", str(args.repeats)]
  proc = subprocess.run(cmd, env=_worker_env(args.threads), capture_output=True, text=True)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  sys.stderr.write(proc.stdout + proc.stderr)
  raise RuntimeError(f"{framework} worker for {name} failed (exit {proc.returncode})")


def _fmt(v: float) -> str:
  return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="lenet300,lenet5,microbotnet",
                 help=f"comma-separated, of {', '.join(MODELS)}")
  p.add_argument("--threads", type=int, default=1,
                 help="CPU threads for both frameworks (default 1: see the docstring on "
                      "shared machines)")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--seconds", type=float, default=2.0, help="wall time of each timed repeat")
  p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement")
  p.add_argument("--rounds", type=int, default=1,
                 help="alternating jcompress/torch subprocess pairs per model")
  p.add_argument("--json", help="also write all raw numbers to this file")
  p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = p.parse_args()
  names = args.models.split(",")
  for name in names:
    if name not in MODELS:
      p.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
  if not 1 <= args.threads <= len(os.sched_getaffinity(0)):
    p.error(f"--threads must be in 1..{len(os.sched_getaffinity(0))}")

  if args.worker:
    cpus = _pin(args.threads)
    fn = _jax_worker if args.worker == "jax" else _torch_worker
    res = fn(names[0], args)
    res["cpus"] = cpus
    print("RESULT " + json.dumps(res), flush=True)
    return

  load = os.getloadavg()
  print(f"python {sys.version.split()[0]}; {os.cpu_count()} CPUs on the machine, "
        f"{args.threads} thread(s) pinned per worker; load average {load[0]:.2f} "
        f"(other jobs share the machine: absolute numbers are noisy, ratios less so)")
  print(f"batch {args.batch_size}, {args.seconds:g} s x {args.repeats} repeats x "
        f"{args.rounds} round(s), one subprocess per (model, framework); "
        f"env {' '.join(f'{k}={v}' for k, v in _worker_env(args.threads).items() if k in ('XLA_FLAGS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'))}")
  rows, raw, versions = [], {}, {}
  for name in names:
    per = {"jax": [], "torch": []}
    for _ in range(args.rounds):
      for fw in ("jax", "torch"):
        per[fw].append(_run_worker(fw, name, args))
    raw[name] = per
    versions = {fw: per[fw][0]["version"] for fw in per}
    counts = {fw: per[fw][0]["params"] for fw in per}
    expected = MODELS[name][1]
    print(f"{name}: parameters jcompress {counts['jax']:,}, torch {counts['torch']:,} "
          f"(expected {expected:,})")
    if counts["jax"] != counts["torch"]:
      raise SystemExit(f"{name}: the torch mirror's parameter count differs from jcompress's")

    def med(fw, key):
      return statistics.median(r for res in per[fw] for r in res[key]["all"])

    cells = [name]
    for key in ("train", "infer_b1", f"infer_b{args.batch_size}"):
      j, t = med("jax", key), med("torch", key)
      cells += [_fmt(j), _fmt(t), f"{j / t:.2f}"]
    rows.append(cells)
    print(f"  {name}: train {cells[1]} vs {cells[2]} ({cells[3]}x), infer b1 {cells[4]} vs "
          f"{cells[5]} ({cells[6]}x), infer b{args.batch_size} {cells[7]} vs {cells[8]} "
          f"({cells[9]}x)", flush=True)
  print()
  print("versions: " + versions["jax"] + "; " + versions["torch"])
  print()
  b = args.batch_size
  print(f"| model | jcompress train b{b} img/s | torch train b{b} img/s | ratio | "
        f"jcompress infer b1 img/s | torch infer b1 img/s | ratio | "
        f"jcompress infer b{b} img/s | torch infer b{b} img/s | ratio |")
  print("|---|" + "---:|" * 9)
  for cells in rows:
    print("| " + " | ".join(cells) + " |")
  print()
  print("ratio = jcompress / torch (> 1: jcompress faster); medians over repeats and rounds.")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "results": raw}, f, indent=1)


if __name__ == "__main__":
  main()
