"""QuantizeLinear/DequantizeLinear placement for ``export --format onnx --activations
static`` (:mod:`jcompress.onnx_export`): :func:`static` calibrates per-tensor uint8
ranges on training images and places them; :func:`place_trained` places the grids a
run trained with (``act_quant``) instead.

:func:`float_outputs` picks the int8 layers whose output reaches the graph output
with no other int8 layer in between (the logits layer): their output stays float32
(no QuantizeLinear clipping it to its calibrated range); ORT runs such a MatMul as
MatMulIntegerToFloat (uint8 input, int8 weight, float output). :func:`insert_qdq` puts
a uint8 Q/DQ pair with a per-tensor scale on a tensor. :func:`fuse_activations`
turns the converter's element-wise chains for hard-swish, hard-sigmoid and means
into single ONNX ops; :func:`compact` shrinks the finished graph's bookkeeping
(names, duplicate constants, zero zero-points).
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import numpy as np

_LOG = logging.getLogger(__name__)
# Static ranges' percentile: MicroBotNet agreement 0.977, min-max 0.964 (docs/deploy.md).
CALIBRATION_PERCENTILE = 99.99


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


def percentile_range(hist: np.ndarray, lo: float, hi: float, percentile: float
                     ) -> tuple[float, float]:
  """``lo..hi`` clipped to the ``percentile`` (and ``100 - percentile`` below zero) of
  the values whose histogram over ``lo..hi`` is ``hist`` (ORT's
  ``CalibrationMethod.Percentile``); always includes 0."""
  bins = len(hist)
  edges = np.linspace(lo, max(hi, lo + 1e-12), bins + 1)
  cdf = np.cumsum(hist) / max(hist.sum(), 1)
  q = percentile / 100
  top = max(float(edges[min(np.searchsorted(cdf, q) + 1, bins)]), 0.0)
  bottom = min(float(edges[np.searchsorted(cdf, 1 - q)]), 0.0) if lo < 0 else lo
  return bottom, top


def insert_qdq(proto, name: str, lo: float, hi: float, *, qparams=None,
               consumer: str | None = None) -> np.float32:
  """A uint8 QuantizeLinear/DequantizeLinear pair on tensor ``name`` (range ``lo..hi``,
  which includes 0, or ``qparams = (scale, zero_point)``) right after the node making
  it; its consumers read the dequantized tensor (only the node whose first output is
  ``consumer``, if given). Returns the scale."""
  from jcompress.onnx_export import require  # pylint: disable=import-outside-toplevel
  onnx, _ = require()
  if qparams is None:
    scale = np.float32(max(hi - lo, 1e-8) / 255)
    qparams = scale, np.clip(np.round(-lo / scale), 0, 255)
  scale, zero = np.float32(qparams[0]), np.uint8(qparams[1])
  base = name if consumer is None else f"{name}_for_{consumer}"
  s, z, q, d = (f"{base}_qscale", f"{base}_qzero", f"{base}_q", f"{base}_dq")
  proto.graph.initializer.extend([onnx.numpy_helper.from_array(np.asarray(scale), s),
                                  onnx.numpy_helper.from_array(np.asarray(zero), z)])
  for node in proto.graph.node:
    if consumer is not None and (not node.output or node.output[0] != consumer):
      continue
    for i, inp in enumerate(node.input):
      if inp == name:
        node.input[i] = d
  for out in proto.graph.output:
    if out.name == name and consumer is None:
      raise ValueError(f"ONNX export: cannot quantize the graph output {name}")
  pos = next((i for i, n in enumerate(proto.graph.node) if name in n.output), -1) + 1
  new = [onnx.helper.make_node("QuantizeLinear", [name, s, z], [q], name=f"{base}_Q"),
         onnx.helper.make_node("DequantizeLinear", [q, s, z], [d], name=f"{base}_DQ")]
  nodes = list(proto.graph.node)
  del proto.graph.node[:]
  proto.graph.node.extend(nodes[:pos] + new + nodes[pos:])
  return scale


def int_dq(proto) -> dict[str, Any]:
  """``{DequantizeLinear output: node}`` of the int8/uint8 weight initializers."""
  inits = {i.name: i for i in proto.graph.initializer}
  small = (2, 3)  # TensorProto.UINT8, INT8
  return {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"
          and n.input[0] in inits and inits[n.input[0]].data_type in small}


def targets(proto) -> list[Any]:
  """The Conv/MatMul nodes whose weight is int8 (behind a DequantizeLinear)."""
  dq = int_dq(proto)
  return [n for n in proto.graph.node if n.op_type in ("Conv", "MatMul") and n.input[1] in dq]


_KEEPS_RANGE = ("Transpose", "Reshape", "MaxPool", "Identity", "Flatten", "Squeeze")


def _source_lo(made, node, lo) -> float | None:
  """The calibrated low end of the quantized tensor ``node``'s input comes from
  (through layout ops and Relus), None if none."""
  while node is not None and (node.op_type in _KEEPS_RANGE or node.op_type == "Relu"):
    if node.input[0] in lo:
      return lo[node.input[0]]
    node = made.get(node.input[0])
  return None


def static(proto, batches, percentile: float = 100.0) -> list[str]:
  """Inserts Q/DQ pairs on the int8 layers' inputs (and Conv outputs) with the
  per-tensor uint8 ranges seen on ``batches`` (clipped to their ``percentile``);
  returns the tensors quantized."""
  from jcompress.onnx_export import _options, require  # pylint: disable=import-outside-toplevel
  onnx, ort = require()
  found = targets(proto)
  floats = float_outputs(proto, found)  # the logits stay float32
  quantized = [n for n in found if n.output[0] not in floats]  # float: DQ weight, Gemm
  names = list(dict.fromkeys([n.input[0] for n in quantized] + [n.output[0] for n in quantized]))
  probe = onnx.ModelProto()
  probe.CopyFrom(proto)
  probe.graph.output.extend([onnx.helper.make_empty_tensor_value_info(n) for n in names])
  sess = ort.InferenceSession(probe.SerializeToString(), _options(ort),
                              providers=["CPUExecutionProvider"])
  lo, hi = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
  batches = list(batches)
  for x in batches:
    for n, v in zip(names, sess.run(names, {"images": x})):
      lo[n], hi[n] = min(lo[n], float(v.min())), max(hi[n], float(v.max()))
  if percentile < 100:
    lo, hi = _clipped(sess, names, batches, lo, hi, percentile)
  made = {n.output[0]: n for n in proto.graph.node}
  users = collections.defaultdict(list)
  for node in proto.graph.node:
    for i in node.input:
      users[i].append(node)

  def relu_only(name: str) -> bool:  # every use of ``name`` is a Relu (past layout ops)
    uses = users[name]
    return bool(uses) and all(u.op_type == "Relu" or (u.op_type in _KEEPS_RANGE
                                                      and relu_only(u.output[0]))
                              for u in uses)
  for n in [q.output[0] for q in quantized]:  # a Relu after a layer clips at 0 as its
    if relu_only(n):  # uint8 output does (TFLite's fused activation): range [0, hi],
      lo[n] = 0.0  # so the Relu is the identity on it and ORT drops it (no requantizing)
  for n in names:  # an input reached from a quantized output through ops that keep
    src = made.get(n)  # values (pooling, layout; a Relu on a [0, hi] output) takes its
    while src is not None and (src.op_type in _KEEPS_RANGE or (  # scale: ORT then runs
        src.op_type == "Relu" and _source_lo(made, src, lo) == 0.0)):  # them in uint8
      src = made.get(src.input[0])
    if src is not None and src.output[0] in lo and src.output[0] != n:
      lo[n], hi[n] = lo[src.output[0]], hi[src.output[0]]
  for n in names:
    insert_qdq(proto, n, lo[n], hi[n])
  drop_unused(proto)
  return names


def _clipped(sess, names: list[str], batches: list, lo: dict, hi: dict, percentile: float,
             bins: int = 2048) -> tuple[dict, dict]:
  """The ranges of ``names`` clipped to their ``percentile`` (and ``100 - percentile``
  below zero), from a histogram of each over the calibration batches between its
  min and max (ORT's own ``CalibrationMethod.Percentile``): a few outliers then do
  not stretch a tensor's 256 levels."""
  hist = {n: np.zeros(bins, np.int64) for n in names}
  for x in batches:
    for n, v in zip(names, sess.run(names, {"images": x})):
      hist[n] += np.histogram(v, bins, (lo[n], max(hi[n], lo[n] + 1e-12)))[0]
  out_lo, out_hi = dict(lo), dict(hi)
  for n in names:
    out_lo[n], out_hi[n] = percentile_range(hist[n], lo[n], hi[n], percentile)
  return out_lo, out_hi


def place_trained(proto, ranges: dict[str, tuple]) -> list[str]:
  """Q/DQ pairs with the grids a method trained with (``ranges``: ``{kernel path: (in
  scale, in zero point, out scale, out zero point)}``, :mod:`jcompress.transforms.
  act_quant`) around the int8 layers whose output is not the logits': the output's
  for all its consumers, then the input's for that layer alone, as the model ran
  them. Warns about layers that ran quantized in the run and float here, or the
  reverse. Returns the tensors quantized."""
  from jcompress import onnx_graph  # pylint: disable=import-outside-toplevel
  dq, found = int_dq(proto), targets(proto)
  paths = {n.output[0]: dq[n.input[1]].name.removesuffix(onnx_graph.WEIGHT_NODE)
           for n in found}
  floats = float_outputs(proto, found)
  placed = [n.output[0] for n in found if paths[n.output[0]] in ranges
            and n.output[0] not in floats]
  for out in placed:
    insert_qdq(proto, out, 0.0, 0.0, qparams=ranges[paths[out]][2:])
  names = list(placed)
  for out in placed:
    live = next(n for n in proto.graph.node if n.output and n.output[0] == out)
    insert_qdq(proto, live.input[0], 0.0, 0.0, qparams=ranges[paths[out]][:2], consumer=out)
    names.append(live.input[0])
  left = sorted(paths[n.output[0]] for n in found
                if n.output[0] not in floats and n.output[0] not in placed)
  if left:
    _LOG.warning("ONNX export: %s took no trained activation grid (not selected by the "
                 "run's act_quant step): their activations stay float32", ", ".join(left))
  extra = sorted(set(ranges) - {paths[n.output[0]] for n in found
                                if n.output[0] not in floats})
  if extra:
    _LOG.warning("ONNX export: the run quantized the activations of %s, which run here "
                 "as float32 layers (weights not int8, or the logits layer)", ", ".join(extra))
  drop_unused(proto)
  return names


def drop_unused(proto) -> None:
  used = {i for n in proto.graph.node for i in n.input}
  kept = [i for i in proto.graph.initializer if i.name in used]
  del proto.graph.initializer[:]
  proto.graph.initializer.extend(kept)


def compact(proto) -> None:
  """Shrinks ``proto`` without changing what it computes: Identity nodes bypassed,
  DequantizeLinear's all-zero zero points of initializers dropped (0 is the
  default), identical initializers stored once, node names dropped and every
  tensor but the graph's inputs and outputs renamed to a short base-36 number.
  (With float biases, 19% of the 8-bit MicroBotNet x0.32 file.)"""
  from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
  g = proto.graph
  inits = {i.name: i for i in g.initializer}
  io = {v.name for v in list(g.input) + list(g.output)}
  alias: dict[str, str] = {}  # name -> the name it is the same tensor as
  first: dict[tuple, str] = {}
  for i in g.initializer:
    a = numpy_helper.to_array(i)
    alias[i.name] = first.setdefault((i.data_type, a.shape, a.tobytes()), i.name)
  nodes = []
  for n in g.node:
    if n.op_type == "Identity" and n.output[0] not in io:
      alias[n.output[0]] = n.input[0]
      continue
    if (n.op_type == "DequantizeLinear" and len(n.input) == 3 and n.input[0] in inits
        and n.input[2] in inits and not numpy_helper.to_array(inits[n.input[2]]).any()):
      del n.input[2]
    nodes.append(n)
  names: dict[str, str] = {}

  def short(x: str) -> str:
    while alias.get(x, x) != x:
      x = alias[x]
    if x in io or not x:
      return x
    return names.setdefault(x, np.base_repr(len(names), 36).lower())
  for n in nodes:
    n.name = ""
    n.input[:] = [short(x) for x in n.input]
    n.output[:] = [short(x) for x in n.output]
  used = {x for n in nodes for x in n.input}
  kept = [i for i in g.initializer if alias[i.name] == i.name and short(i.name) in used]
  for i in kept:
    i.name = short(i.name)
  del g.initializer[:]
  g.initializer.extend(kept)
  del g.node[:]
  g.node.extend(nodes)


def _const(inits, name: str):
  from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
  return numpy_helper.to_array(inits[name]) if name in inits else None


def fuse_activations(proto) -> int:
  """Rewrites the element-wise chains the converter emits for hard-swish and
  hard-sigmoid (``Add(x, 3) -> Relu -> Clip(max 6) -> Div(6)``, then ``Mul(x, .)``
  for hard-swish) as ONNX ``HardSwish`` / ``HardSigmoid(alpha=1/6, beta=1/2)``, and a
  ``ReduceSum`` followed by ``Div`` by the count it summed as ``ReduceMean``: one
  node each instead of two to five, which ONNX Runtime runs as one kernel (at batch
  1 the per-node cost is much of a small network's time). Returns the chains fused."""
  import onnx  # pylint: disable=import-outside-toplevel
  g = proto.graph
  inits = {i.name: i for i in g.initializer}
  users = collections.defaultdict(list)
  for n in g.node:
    for i in n.input:
      users[i].append(n)
  outputs = {o.name for o in g.output}

  def only_user(node, op: str):
    u = users[node.output[0]] if node is not None else []
    return u[0] if len(u) == 1 and u[0].op_type == op and node.output[0] not in outputs else None

  def equals(name: str, value: float) -> bool:
    c = _const(inits, name)
    return c is not None and c.size == 1 and float(c.reshape(())) == value
  drop, fused = set(), 0
  for add in [n for n in g.node if n.op_type == "Add"]:
    x = [i for i in add.input if not equals(i, 3.0)]
    clip = only_user(only_user(add, "Relu"), "Clip")
    div = only_user(clip, "Div")
    if (len(x) != 1 or div is None or len(clip.input) != 3 or clip.input[1]
        or not equals(clip.input[2], 6.0) or div.input[0] != clip.output[0]
        or not equals(div.input[1], 6.0)):
      continue
    chain = [add, users[add.output[0]][0], clip, div]
    mul = only_user(div, "Mul")
    if mul is not None and sorted(mul.input) == sorted([x[0], div.output[0]]):
      new = onnx.helper.make_node("HardSwish", x, [mul.output[0]])
      chain.append(mul)
    else:
      new = onnx.helper.make_node("HardSigmoid", x, [div.output[0]], alpha=1 / 6, beta=0.5)
    drop.update(id(n) for n in chain[1:])
    add.CopyFrom(new)  # in the chain's first place: the order stays topological
    fused += 1
  shapes = None
  for red in [n for n in g.node if n.op_type == "ReduceSum" and len(n.input) == 2]:
    div, axes = only_user(red, "Div"), _const(inits, red.input[1])
    if div is None or axes is None or div.input[0] != red.output[0]:
      continue
    if shapes is None:
      inferred = onnx.shape_inference.infer_shapes(proto).graph
      shapes = {v.name: [d.dim_value or None for d in v.type.tensor_type.shape.dim]
                for v in list(inferred.value_info) + list(inferred.input)}
    shape = shapes.get(red.input[0]) or []
    dims = [shape[a] if -len(shape) <= a < len(shape) else None for a in axes.reshape(-1)]
    if None in dims or not equals(div.input[1], float(np.prod(dims))):
      continue
    keep = next((a.i for a in red.attribute if a.name == "keepdims"), 1)
    red.CopyFrom(onnx.helper.make_node("ReduceMean", list(red.input), [div.output[0]],
                                       keepdims=keep))
    drop.add(id(div))
    fused += 1
  kept = [n for n in g.node if id(n) not in drop]
  del g.node[:]
  g.node.extend(kept)
  return fused
