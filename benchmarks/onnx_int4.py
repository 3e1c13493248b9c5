"""4-bit weights stored as ONNX INT4 initializers vs as int8, in ONNX Runtime.

    .venv/bin/python benchmarks/onnx_int4.py [--min-time 0.1] [--repeats 7]

A 4-bit conv kernel (codes in [-7, 7]) in the QDQ form ``export --format onnx``
writes, two ways: its codes as an int8 initializer behind a DequantizeLinear (what
the exporter writes), or as an INT4 initializer (opset 21) behind DequantizeLinear
-> QuantizeLinear(int8) -> DequantizeLinear, so that ORT still sees int8 weights
and fuses QLinearConv. The int4 file is smaller; the question is what ORT does
with the extra pair: it runs it at every call (it does not fold DequantizeLinear
of a constant), so each inference re-derives the int8 kernel. For each shape: the
file bytes, the ops ORT runs, whether the outputs are identical, and the time per
call at batch 1 and 128 on one thread (the fastest of ``--repeats`` loops of about
``--min-time`` seconds, the variants taking turns). Needs ``jcompress[deploy]``.
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time

import numpy as np

# (name, in channels, out channels, kernel, spatial size): LeNet-5's conv2, a
# MicroBotNet x0.32 1x1 expansion and a x1.0 one
SHAPES = (("lenet5 conv2", 20, 50, 5, 12), ("microbotnet x0.32 expand", 24, 72, 1, 16),
          ("microbotnet x1.0 expand", 72, 240, 1, 8))


def model(cin: int, cout: int, k: int, size: int, int4: bool, seed: int = 0):
  import onnx  # pylint: disable=import-outside-toplevel
  from onnx import TensorProto, helper, numpy_helper  # pylint: disable=import-outside-toplevel
  codes = np.random.default_rng(seed).integers(-7, 8, (cout, cin, k, k)).astype(np.int8)
  const = lambda v, name: numpy_helper.from_array(np.asarray(v), name)  # noqa: E731
  inits = [const(np.float32(0.01), "ws"), const(np.int8(0), "wz"),
           const(np.float32(0.02), "xs"), const(np.uint8(128), "xz"),
           const(np.float32(0.05), "ys"), const(np.uint8(128), "yz")]
  nodes = []
  if int4:
    inits += [helper.make_tensor("codes", TensorProto.INT4, codes.shape, codes.ravel().tolist()),
              helper.make_tensor("wz4", TensorProto.INT4, [], [0])]
    nodes += [helper.make_node("DequantizeLinear", ["codes", "ws", "wz4"], ["w4"]),
              helper.make_node("QuantizeLinear", ["w4", "ws", "wz"], ["w8"]),
              helper.make_node("DequantizeLinear", ["w8", "ws", "wz"], ["w"])]
  else:
    inits.append(const(codes, "codes"))
    nodes.append(helper.make_node("DequantizeLinear", ["codes", "ws", "wz"], ["w"]))
  nodes += [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
            helper.make_node("Conv", ["xd", "w"], ["y"], pads=[k // 2] * 4),
            helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
            helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"])]
  graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info(
      "x", TensorProto.FLOAT, ["batch", cin, size, size])], [helper.make_tensor_value_info(
          "out", TensorProto.FLOAT, ["batch", cout, size, size])], initializer=inits)
  proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
  proto.ir_version = 10
  onnx.checker.check_model(proto)
  return proto.SerializeToString()


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--min-time", type=float, default=0.1, help="seconds per timed loop (0.1)")
  p.add_argument("--repeats", type=int, default=7, help="timed loops per variant (7)")
  args = p.parse_args(argv)
  import onnx  # pylint: disable=import-outside-toplevel
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  print(f"onnxruntime {ort.__version__}, load average {os.getloadavg()[0]:.1f}")
  for name, cin, cout, k, size in SHAPES:
    sessions, ops, sizes = {}, {}, {}
    for kind in ("int8", "int4"):
      blob = model(cin, cout, k, size, kind == "int4")
      sizes[kind] = len(blob)
      options = ort.SessionOptions()
      options.intra_op_num_threads = 1
      with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        sessions[kind] = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
        ops[kind] = dict(collections.Counter(
            n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node))
    print(f"\n{name}: {cin}->{cout}, {k}x{k}, {size}x{size}; file int8 {sizes['int8']:,} B, "
          f"int4 {sizes['int4']:,} B")
    for kind in ("int8", "int4"):
      print(f"  ORT runs ({kind}): {ops[kind]}")
    for batch in (1, 128):
      x = np.random.default_rng(1).normal(size=(batch, cin, size, size)).astype(np.float32)
      same = np.array_equal(*(sessions[kind].run(None, {"x": x})[0] for kind in ("int8", "int4")))
      calls = {kind: 1 for kind in sessions}
      for kind, sess in sessions.items():  # calls per loop of about --min-time
        start = time.perf_counter()
        while time.perf_counter() - start < args.min_time / 4:
          sess.run(None, {"x": x})
          calls[kind] += 1
        calls[kind] *= 4
      best = dict.fromkeys(sessions, float("inf"))
      for _ in range(args.repeats):
        for kind, sess in sessions.items():
          start = time.perf_counter()
          for _ in range(calls[kind]):
            sess.run(None, {"x": x})
          best[kind] = min(best[kind], (time.perf_counter() - start) / calls[kind])
      print(f"  batch {batch}: int8 {best['int8'] * 1e6:.1f} us, int4 {best['int4'] * 1e6:.1f} "
            f"us, int4 / int8 {best['int4'] / best['int8']:.2f}x, identical outputs: {same}")


if __name__ == "__main__":
  main()
