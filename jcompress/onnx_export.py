"""ONNX export of a (compressed) model and its evaluation through ONNX Runtime:
``jcompress export --format onnx`` and ``jcompress eval --runtime onnxruntime``.

``FILE`` is an ONNX model (opset 21) of the inference forward pass ``images ->
logits`` (:mod:`jcompress.onnx_graph`): normalised float32 NHWC images ``[batch,
*input_shape]``, any batch. Batch-norm statistics and everything computed from
params alone are folded to constants. Tensors a method's ``onnx`` hook gives at
their integer width (quantize/qat: the trained codes and scales; ttq: trits as int8
codes; binary: signs; share: indices into the codebook) are stored as integer
initializers behind a ``DequantizeLinear`` (a ``Gather`` for codebooks); the rest
are float32. Pruned zeros stay zeros; Tucker layers are their factor sequence.

``activations``: ``static`` (default) puts a QuantizeLinear/DequantizeLinear pair
(uint8, per-tensor scale from the ranges over ``calibration_batches`` training
batches, clipped to their ``calibration_percentile``: 100 is min-max) on the
input and output of every Conv/MatMul whose weight is int8, which
ONNX Runtime fuses into QLinearConv and QLinearMatMul (int8 x uint8, int32
accumulation; an input reached from such an output through pooling or reshapes
takes its scale, so ORT runs those in uint8 too), except the logits layer (an int8 layer
whose output reaches the graph output with no other int8 layer in between,
:mod:`jcompress.onnx_qdq`): its output and input stay float32 (ORT: a Gemm on its
dequantized int8 weights), so the logits are not clipped to a calibrated range;
``dynamic`` quantizes those MatMuls' inputs
at run time (DynamicQuantizeLinear + MatMulInteger; convolutions run float on
the dequantized weights); ``float`` keeps activations float32 (weights stored as
int8, computed float). :func:`int8_ops` lists the int8 kernels ORT runs.

``FILE.json`` is the sidecar ``export --format stablehlo`` writes (``dataset``,
``input_shape``, ``num_classes``, ``mean``, ``std``, ...) plus ``activations`` and
``int8_weights``. Running it needs ``onnxruntime`` and numpy alone::

    sess = onnxruntime.InferenceSession(FILE)
    logits = sess.run(None, {"images": (pixels / 255 - mean) / std})[0]
"""

from __future__ import annotations

import collections
import json
import logging
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import atomic, data, onnx_graph, onnx_qdq, stablehlo
from jcompress.transforms import registry
from jcompress.transforms.select import flatten, unflatten

ACTIVATIONS = ("static", "dynamic", "float")
INT8_OPS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
            "MatMulInteger", "ConvInteger", "QGemm")
_LOG = logging.getLogger(__name__)
_EXTRA = "pip install 'jcompress[deploy]'"
CALIBRATION_PERCENTILE = onnx_qdq.CALIBRATION_PERCENTILE


def require():
  """``(onnx, onnxruntime)``; ValueError naming the pip extra when missing."""
  try:
    import onnx  # pylint: disable=import-outside-toplevel
    import onnxruntime  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError(f"ONNX export and --runtime onnxruntime need onnx and onnxruntime "
                     f"({e.name} is missing): {_EXTRA}") from None
  return onnx, onnxruntime


def int_weights(meta: dict, state, method) -> dict[str, registry.IntWeight]:
  """``{path: IntWeight}`` from the plan's methods' ``onnx`` hooks (a later method's
  replaces an earlier one's; a later method without one drops the path), each kept
  only where it rebuilds the tensor the model runs with (within half a step)."""
  out: dict[str, registry.IntWeight] = stablehlo.hook_outputs(meta, state, "onnx")
  runs = flatten(jax.device_get(method.apply(state.params, state.cstate)))
  for path, q in list(out.items()):
    got = _dequantized(q)
    tol = 1e-6 if q.codebook is not None else float(np.max(q.scale)) * 0.51 + 1e-6
    if (path not in runs or got.shape != runs[path].shape
        or not np.all(np.abs(got - runs[path]) <= tol)):
      stablehlo._LOG.warning("export: %s's integer form is not what the model runs with (a "
                             "later method changed it); stored as float32", path)
      del out[path]
  return out


def _dequantized(q: registry.IntWeight) -> np.ndarray:
  if q.codebook is not None:
    return np.asarray(q.codebook)[np.asarray(q.codes).astype(np.int64)]
  return ((np.asarray(q.codes, np.int32) - np.asarray(q.zero_point, np.int32))
          * np.asarray(q.scale, np.float32)).astype(np.float32)


def trace(model, state, method, input_shape):
  """``(closed_jaxpr, params)`` of the inference forward pass with the params the model
  runs with as inputs (a symbolic batch; depthwise convolutions as XLA's grouped conv,
  one ONNX Conv)."""
  return _trace(model, method.apply(state.params, state.cstate), state.batch_stats,
                input_shape)


def _trace(model, params, batch_stats, input_shape):
  params = flatten(jax.device_get(params))
  stats = {"batch_stats": jax.device_get(batch_stats)} if batch_stats else {}

  def fn(p, x):
    return model.apply({"params": unflatten(p)} | stats, x, train=False)
  batch = jax.export.symbolic_shape("batch")[0]
  from jcompress import layers  # pylint: disable=import-outside-toplevel
  before = os.environ.get(layers.IMPL_ENV)
  os.environ[layers.IMPL_ENV] = "xla"
  try:
    closed = jax.make_jaxpr(fn)(params, jax.ShapeDtypeStruct((batch, *input_shape),
                                                             jnp.float32))
  finally:
    if before is None:
      os.environ.pop(layers.IMPL_ENV, None)
    else:
      os.environ[layers.IMPL_ENV] = before
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  ordered = {k[0].key: np.asarray(v) for k, v in leaves}
  return closed, ordered


def export(out: str | os.PathLike, model, state, meta: dict, method, *,
           activations: str = "static", calibration_batches: int = 8,
           calibration_percentile: float | None = None,
           data_dir: str | None = None) -> dict[str, Any]:
  """Writes ``out`` (the ONNX model) and ``out.json`` (its sidecar), atomically.

  Returns:
    ``{"format", "file_bytes", "activations", "int8_weights", "quantized_inputs"}``.

  Raises:
    ValueError: a bad option, a primitive with no ONNX mapping, or onnx missing.
  """
  onnx, _ = require()
  if os.path.isdir(out):
    raise ValueError(f"--out {out} is a directory")
  if activations not in ACTIVATIONS:
    raise ValueError(f"--activations must be one of {', '.join(ACTIVATIONS)}, "
                     f"got {activations!r}")
  if calibration_batches < 1:
    raise ValueError(f"--calibration-batches must be at least 1, got {calibration_batches}")
  if calibration_percentile is None:
    calibration_percentile = CALIBRATION_PERCENTILE
  if not 50 < calibration_percentile <= 100:
    raise ValueError(f"--calibration-percentile must be in (50, 100], got "
                     f"{calibration_percentile}")
  weights = int_weights(meta, state, method)
  activations = activations if weights else "float"  # nothing to quantize
  proto, int_paths = _graph(trace(model, state, method, tuple(meta["input_shape"])), weights)
  info = stablehlo.sidecar("onnx", meta, batch=None, activations=activations,
                           int8_weights=int_paths)
  quantized: list[str] = []
  ranges = trained_ranges(meta)
  if activations == "static" and int_paths and ranges:
    info["activation_ranges"] = "trained"
    quantized = onnx_qdq.place_trained(proto, ranges)
  elif activations == "static" and int_paths:
    ds = data.load(meta["dataset"], data_dir)
    quantized = onnx_qdq.static(proto, _calibration(ds.train_images, info, calibration_batches),
                        calibration_percentile)
  elif activations == "dynamic" and int_paths:
    quantized = _dynamic(proto)
  onnx_qdq.compact(proto)
  onnx.checker.check_model(proto)
  blob = proto.SerializeToString()
  atomic.write_bytes(out, blob)
  atomic.write_text(f"{out}{stablehlo.SIDECAR}", json.dumps(info, indent=1) + "\n")
  return {"format": "onnx", "file_bytes": len(blob), "activations": activations,
          "int8_weights": int_paths, "quantized_inputs": len(quantized)}


def _graph(traced, weights: dict[str, registry.IntWeight]):
  """``(proto, int_paths)``: the ONNX model of ``trace``'s output, batch norm folded,
  activation chains fused."""
  onnx, _ = require()
  graph, int_paths = onnx_graph.convert(*traced, weights)
  proto = onnx.helper.make_model(graph, producer_name="jcompress", opset_imports=[
      onnx.helper.make_opsetid("", onnx_graph.OPSET)])
  proto.ir_version = 10
  fold_affine(proto)
  onnx_qdq.fuse_activations(proto)
  return proto, int_paths


def activation_grids(model, variables: dict, input_shape, paths: list[str], images,
                     percentile: float) -> dict[str, tuple]:
  """``{kernel path: (in scale, in zero point, out scale, out zero point)}``: the uint8
  grids ``export --activations static`` gives the inputs and outputs of the layers of
  ``paths`` (as int8 layers; ranges calibrated on ``images`` at ``percentile``, the
  placement rules of :func:`_static`), for the layers whose activations it quantizes
  (not the logits layer): what ``act_quant`` trains with."""
  numpy_helper = require()[0].numpy_helper
  flat = flatten(jax.device_get(variables["params"]))
  weights = {}
  for p in paths:
    scale = np.float32(max(float(np.max(np.abs(flat[p]))), 1e-12) / 127)
    weights[p] = registry.IntWeight(np.clip(np.round(flat[p] / scale), -127, 127).astype(
        np.int8), scale, np.int8(0))
  proto, _ = _graph(_trace(model, variables["params"], variables.get("batch_stats"),
                           tuple(input_shape)), weights)
  images = np.asarray(images, np.float32)
  onnx_qdq.static(proto, (images[i:i + 64] for i in range(0, len(images), 64)), percentile)
  inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
  made = {n.output[0]: n for n in proto.graph.node}
  users = collections.defaultdict(list)
  for n in proto.graph.node:
    for i in n.input:
      users[i].append(n)
  out = {}
  for node in proto.graph.node:
    w = made.get(node.input[1]) if node.op_type in ("Conv", "MatMul") else None
    if w is None or not w.name.endswith(onnx_graph.WEIGHT_NODE):
      continue
    dq, q = made.get(node.input[0]), [u for u in users[node.output[0]]
                                      if u.op_type == "QuantizeLinear"]
    if dq is None or dq.op_type != "DequantizeLinear" or not q:
      continue  # float in and out: the logits layer
    out[w.name.removesuffix(onnx_graph.WEIGHT_NODE)] = tuple(
        float(inits[n.input[k]]) for n in (dq, q[0]) for k in (1, 2))
  return out


def fold_affine(proto) -> int:
  """Folds the per-channel Add/Mul chains after each Conv (batch norm in inference,
  biases) into its weights (a DequantizeLinear's per-channel scales, signs into the
  int8 codes) and bias; returns the Convs folded. ORT folds them itself for float
  weights, not behind a DequantizeLinear, where they ran as float ops per element."""
  onnx, _ = require()
  numpy_helper, inits = onnx.numpy_helper, {i.name: i for i in proto.graph.initializer}
  nodes = list(proto.graph.node)
  users = collections.defaultdict(list)
  for n, i in ((n, i) for n in nodes for i in n.input):
    users[i].append(n)
  made = {n.output[0]: n for n in nodes}
  outputs = {o.name for o in proto.graph.output}
  dropped, added, folded = set(), [], 0
  for conv in [n for n in nodes if n.op_type == "Conv" and len(n.input) == 2]:
    w = made.get(conv.input[1])
    t = users[conv.output[0]]
    if len(t) != 1 or t[0].op_type != "Transpose" or conv.output[0] in outputs:
      continue
    codes = w is not None and w.op_type == "DequantizeLinear" and w.input[0] in inits
    if not codes and conv.input[1] not in inits:
      continue
    kernel = inits[w.input[0]] if codes else inits[conv.input[1]]
    channels = kernel.dims[0]  # ONNX Conv weights: output channels first
    a, b, chain, cur = np.ones(channels, np.float32), np.zeros(channels, np.float32), [], t[0]
    while len(users[cur.output[0]]) == 1 and cur.output[0] not in outputs:
      nxt = users[cur.output[0]][0]
      const = [i for i in nxt.input if i in inits]
      if nxt.op_type not in ("Add", "Mul") or len(const) != 1 or len(nxt.input) != 2:
        break
      c = numpy_helper.to_array(inits[const[0]])
      if c.size != channels or c.shape[-1] != channels:
        break
      c = c.reshape(-1).astype(np.float32)
      a, b = (a, b + c) if nxt.op_type == "Add" else (a * c, b * c)
      chain.append(nxt)
      cur = nxt
    if not chain or (codes and numpy_helper.to_array(inits[w.input[0]]).dtype != np.int8):
      continue
    shape = (-1,) + (1,) * (len(kernel.dims) - 1)
    if codes:
      q = numpy_helper.to_array(inits[w.input[0]])
      scale = np.broadcast_to(numpy_helper.to_array(inits[w.input[1]]), (channels,))
      if np.any(np.asarray(numpy_helper.to_array(inits[w.input[2]])) != 0):
        continue
      names = [f"{w.input[0]}_folded", f"{w.input[1]}_folded", f"{w.input[2]}_folded"]
      added += [numpy_helper.from_array((q * np.sign(a + (a == 0)).astype(np.int8).reshape(
                    shape)).astype(np.int8), names[0]),
                numpy_helper.from_array((scale * np.abs(a)).astype(np.float32), names[1])]
      w.input[:] = names[:2]  # zero point 0
      del w.attribute[:]
      w.attribute.append(onnx.helper.make_attribute("axis", 0))
    else:
      name = f"{conv.input[1]}_folded"
      weight = numpy_helper.to_array(inits[conv.input[1]])
      added.append(numpy_helper.from_array((weight * a.reshape(shape)).astype(np.float32),
                                           name))
      conv.input[1] = name
    bias = f"{chain[-1].output[0]}_bias"
    added.append(numpy_helper.from_array(b, bias))
    conv.input.append(bias)  # float32: ORT (>= 1.21) quantizes it to int32 for QLinearConv
    chain[-1].op_type, chain[-1].input[:] = "Identity", [t[0].output[0]]
    dropped.update(id(n) for n in chain[:-1])
    folded += 1
  del proto.graph.node[:]
  proto.graph.node.extend(n for n in nodes if id(n) not in dropped)
  proto.graph.initializer.extend(added)
  onnx_qdq.drop_unused(proto)
  return folded


def trained_ranges(meta: dict) -> dict[str, tuple]:
  """The plan's trained activation grids (methods' ``onnx_ranges``), by kernel path."""
  out: dict[str, tuple] = {}
  for step in meta.get("compression") or []:
    spec = registry.METHODS.get(step["method"])
    if spec is not None and spec.onnx_ranges is not None:
      out.update(spec.onnx_ranges(registry.current_keys(spec, step["options"])))
  return out


def _calibration(images: np.ndarray, info: dict, batches: int, batch_size: int = 64):
  n = min(len(images), batches * batch_size)
  labels = np.zeros(n, np.int32)
  for b in data.batches(images[:n], labels, batch_size, mean=info["mean"], std=info["std"],
                        pad=False, prefetch=0):
    yield np.asarray(b["image"], np.float32)


def _dynamic(proto) -> list[str]:
  """Each int8 MatMul as DynamicQuantizeLinear + MatMulInteger (int32) + scales."""
  onnx, _ = require()
  dq = onnx_qdq.int_dq(proto)
  inits = {i.name: i for i in proto.graph.initializer}
  done, nodes = [], []
  for node in proto.graph.node:
    w = dq.get(node.input[1]) if node.op_type == "MatMul" else None
    if w is None or inits[w.input[0]].data_type != 3:  # int8 weights only
      nodes.append(node)
      continue
    x, y = node.input[0], node.output[0]
    xq, xs, xz, acc, accf, sc = (f"{y}_xq", f"{y}_xs", f"{y}_xz", f"{y}_acc", f"{y}_accf",
                                 f"{y}_scale")
    nodes += [onnx.helper.make_node("DynamicQuantizeLinear", [x], [xq, xs, xz]),
              onnx.helper.make_node("MatMulInteger", [xq, w.input[0], xz, w.input[2]], [acc]),
              onnx.helper.make_node("Cast", [acc], [accf], to=onnx.TensorProto.FLOAT),
              onnx.helper.make_node("Mul", [xs, w.input[1]], [sc]),
              onnx.helper.make_node("Mul", [accf, sc], [y])]
    done.append(x)
  used = {i for n in nodes for i in n.input}
  nodes = [n for n in nodes if not (n.op_type == "DequantizeLinear" and n.output[0] not in used)]
  del proto.graph.node[:]
  proto.graph.node.extend(nodes)
  return done


def _options(ort, threads: int | None = None, optimized: str | None = None):
  opts = ort.SessionOptions()
  opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  opts.log_severity_level = 3
  if threads:
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
  if optimized:
    opts.optimized_model_filepath = optimized
  return opts


def session(path: str | os.PathLike, threads: int | None = None):
  """An ONNX Runtime CPU session of ``path`` (all graph optimizations)."""
  _, ort = require()
  return ort.InferenceSession(str(path), _options(ort, threads),
                              providers=["CPUExecutionProvider"])


def int8_ops(path: str | os.PathLike) -> dict[str, int]:
  """``{op type: count}`` of the int8 kernels in ORT's optimized graph of ``path``."""
  onnx, ort = require()
  with tempfile.TemporaryDirectory() as tmp:
    opt = os.path.join(tmp, "optimized.onnx")
    ort.InferenceSession(str(path), _options(ort, optimized=opt),
                         providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
  return {k: v for k, v in sorted(ops.items()) if k in INT8_OPS}


def load(path: str | os.PathLike) -> tuple[Any, dict]:
  """``(session, info)``: an ORT session of ``path`` and its sidecar."""
  info = stablehlo.read_sidecar(path, "onnx")
  require()
  try:
    sess = session(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} is not an ONNX model ONNX Runtime loads "
                     f"({str(e).splitlines()[0][:200]})") from None
  return sess, info


def evaluate(path: str | os.PathLike, *, data_dir: str | None = None, batch_size: int = 1000,
             workdir: str | os.PathLike | None = None, checkpoint: str | int = "latest"
             ) -> dict[str, Any]:
  """Test accuracy, error and loss of ``path`` run by ONNX Runtime (``eval --runtime
  onnxruntime``); with ``workdir``, ``agreement`` (the fraction of identical argmax)
  and ``max_logit_diff`` with that run's model."""
  if batch_size < 1:
    raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
  sess, info = load(path)
  ds = data.load(info["dataset"], data_dir)
  run = lambda x: sess.run(None, {"images": np.asarray(x, np.float32)})[0]  # noqa: E731
  logits = stablehlo._logits(run, ds.test_images, ds.test_labels, info, batch_size)
  labels = np.asarray(ds.test_labels)
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)))
  accuracy = float(np.mean(np.argmax(logits, -1) == labels))
  result = {"model": info.get("model"), "dataset": info["dataset"], "epoch": info.get("epoch"),
            "runtime": "onnxruntime", "accuracy": accuracy, "error": 1 - accuracy,
            "loss": float(-np.mean(logp[np.arange(len(labels)), labels])),
            "file_bytes": os.path.getsize(path), "activations": info.get("activations")}
  if workdir is not None:
    from jcompress.train.loop import load_workdir  # pylint: disable=import-outside-toplevel
    model, state, meta, method = load_workdir(workdir, checkpoint)
    if meta["dataset"] != info["dataset"]:
      raise ValueError(f"--workdir {workdir} runs on {meta['dataset']}, {path} on "
                       f"{info['dataset']}")
    theirs = stablehlo._logits(jax.jit(stablehlo.forward(model, state, method)),
                               ds.test_images, ds.test_labels, info, batch_size)
    result |= {"agreement": float(np.mean(np.argmax(logits, -1) == np.argmax(theirs, -1))),
               "max_logit_diff": float(np.max(np.abs(logits - theirs)))}
  return result
