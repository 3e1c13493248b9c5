"""QuantizeLinear/DequantizeLinear placement for ``export --format onnx --activations
static`` (:mod:`jcompress.onnx_export`).

:func:`float_outputs` picks the int8 layers whose output reaches the graph output
with no other int8 layer in between (the logits layer): their output stays float32
(no QuantizeLinear clipping it to its calibrated range); ORT runs such a MatMul as
MatMulIntegerToFloat (uint8 input, int8 weight, float output). :func:`insert_qdq` puts
a uint8 Q/DQ pair with a per-tensor scale on a tensor.
"""

from __future__ import annotations

import collections

import numpy as np


def float_outputs(proto, targets) -> set[str]:
  """The outputs of ``targets`` (Conv/MatMul nodes with int8 weights) from which a
  graph output is reached without passing through another of ``targets``."""
  users = collections.defaultdict(list)
  for n in proto.graph.node:
    for i in n.input:
      users[i].append(n)
  outputs = {o.name for o in proto.graph.output}
  stop = {id(n) for n in targets}
  found = set()
  for t in targets:
    seen, todo = set(), [t.output[0]]
    while todo:
      name = todo.pop()
      if name in outputs:
        found.add(t.output[0])
        break
      for n in users[name]:
        if id(n) not in stop and id(n) not in seen:
          seen.add(id(n))
          todo.extend(n.output)
  return found


def insert_qdq(proto, name: str, lo: float, hi: float) -> np.float32:
  """A uint8 QuantizeLinear/DequantizeLinear pair on tensor ``name`` (range ``lo..hi``,
  which includes 0) right after the node making it; its consumers read the
  dequantized tensor. Returns the scale."""
  from jcompress.onnx_export import require  # pylint: disable=import-outside-toplevel
  onnx, _ = require()
  scale = np.float32(max(hi - lo, 1e-8) / 255)
  zero = np.uint8(np.clip(np.round(-lo / scale), 0, 255))
  s, z, q, d = (f"{name}_qscale", f"{name}_qzero", f"{name}_q", f"{name}_dq")
  proto.graph.initializer.extend([onnx.numpy_helper.from_array(np.asarray(scale), s),
                                  onnx.numpy_helper.from_array(np.asarray(zero), z)])
  for node in proto.graph.node:
    for i, inp in enumerate(node.input):
      if inp == name:
        node.input[i] = d
  for out in proto.graph.output:
    if out.name == name:
      raise ValueError(f"ONNX export: cannot quantize the graph output {name}")
  pos = next((i for i, n in enumerate(proto.graph.node) if name in n.output), -1) + 1
  new = [onnx.helper.make_node("QuantizeLinear", [name, s, z], [q], name=f"{name}_Q"),
         onnx.helper.make_node("DequantizeLinear", [q, s, z], [d], name=f"{name}_DQ")]
  nodes = list(proto.graph.node)
  del proto.graph.node[:]
  proto.graph.node.extend(nodes[:pos] + new + nodes[pos:])
  return scale
