"""A compact jaxpr -> ONNX converter for the inference forward pass of jcompress's
models (``export --format onnx``, :mod:`jcompress.onnx_export`).

:func:`convert` walks a jaxpr ``(params..., images) -> logits`` once. Values known on
the host (params, batch-norm statistics, everything computed from them alone) are
folded to numpy constants by running the primitive itself, so only the ops that
touch the images become ONNX nodes. Calls (``jit``, ``custom_jvp_call``,
``custom_vjp_call``, ``closed_call``, ``remat``) are inlined. Images stay NHWC: a
convolution or pooling transposes to NCHW and back, and ONNX Runtime's transpose
optimizer cancels the pairs between layers.

A param given as :class:`registry.IntWeight` (a method's ``onnx`` hook) that feeds
a ``dot_general`` or ``conv_general_dilated`` directly is stored as its integer
codes with a ``DequantizeLinear`` (per-tensor or per-output-channel scale), or as
``Gather(codebook, indices)`` for codebook weights; anywhere else it is folded to
float32. A primitive with no mapping is a one-line ValueError naming it and the
layer (name stack) and nearest param path.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.extend
import numpy as np

from jcompress.transforms.registry import IntWeight

WEIGHT_NODE = "/DequantizeLinear"  # an int8 weight's DequantizeLinear: "<param path>" + this
OPSET = 21  # DequantizeLinear with int4/int16 and blocked axes; ReduceMax axes as input

_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max",
           "min": "Min", "pow": "Pow", "eq": "Equal", "gt": "Greater", "lt": "Less",
           "ge": "GreaterOrEqual", "le": "LessOrEqual", "and": "And", "or": "Or",
           "rem": "Mod"}
_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "logistic": "Sigmoid", "tanh": "Tanh",
          "sqrt": "Sqrt", "abs": "Abs", "erf": "Erf", "not": "Not", "floor": "Floor",
          "ceil": "Ceil", "sign": "Sign", "sin": "Sin", "cos": "Cos",
          "stop_gradient": "Identity", "copy": "Identity", "copy_p": "Identity",
          "optimization_barrier": "Identity", "reduce_precision": "Identity"}
_REDUCE = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin",
           "reduce_prod": "ReduceProd"}


class Quant(NamedTuple):
  """A param with an integer (or codebook) form and its float value."""
  path: str
  weight: IntWeight
  value: np.ndarray


def _onnx():
  from jcompress.onnx_export import require  # pylint: disable=import-outside-toplevel
  return require()


class Converter:
  """Builds the ONNX graph of one jaxpr (:func:`convert`)."""

  def __init__(self):
    self.onnx, _ = _onnx()
    self.nodes: list[Any] = []
    self.inits: list[Any] = []
    self.int_paths: list[str] = []  # params stored as integer codes
    self._count = 0
    self._const_names: dict[int, str] = {}
    self.near: dict[str, str] = {}  # tensor name -> nearest param path upstream
    self.origin: dict[int, str] = {}  # id of a host constant -> the param it comes from
    self._keep: list[Any] = []  # the constants whose ids are keys above
    self._where = ""

  def name(self, hint: str) -> str:
    self._count += 1
    return f"{hint}_{self._count}"

  def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
    outs = [self.name(op.lower()) for _ in range(n_out)]
    self.nodes.append(self.onnx.helper.make_node(op, inputs, outs, name=self.name(op), **attrs))
    near = next((self.near[i] for i in inputs if i in self.near), self._where)
    for o in outs:
      self.near[o] = near
    return outs

  def one(self, op: str, inputs: list[str], **attrs) -> str:
    return self.node(op, inputs, **attrs)[0]

  def init(self, value: np.ndarray, hint: str = "c") -> str:
    value = np.asarray(value)
    key = id(value)
    if key in self._const_names:
      return self._const_names[key]
    name = self.name(hint)
    self.inits.append(self.onnx.numpy_helper.from_array(value, name))
    self._const_names[key] = name
    self._keep.append(value)  # ids stay unique while cached
    if key in self.origin:
      self.near[name] = self.origin[key]
    return name

  def track(self, value, path: str | None):  # host constant ``value`` is from ``path``
    if path and not isinstance(value, str):
      self.origin[id(value)] = path
      self._keep.append(value)
    return value

  def ints(self, values) -> str:
    return self.init(np.asarray(list(values), np.int64), "shape")

  def tensor(self, v) -> str:  # the ONNX name of a value; constants become initializers
    return v if isinstance(v, str) else self.init(v.value if isinstance(v, Quant) else v)

  def fail(self, what: str, eqn) -> ValueError:
    layer = "/".join(str(eqn.source_info.name_stack).split("/")[1:]) or "the top level"
    names = [self.near.get(x) for x in self._in_names if isinstance(x, str)]
    path = next((n for n in names if n), self._where) or "no param yet"
    return ValueError(f"ONNX export: {what} (layer {layer}, near param {path})")

  # --- walking -------------------------------------------------------------------

  def run(self, jaxpr, consts: list, args: list) -> list:
    env: dict[Any, Any] = {}

    def read(v):
      if isinstance(v, jax.extend.core.Literal):
        return np.asarray(v.val, v.aval.dtype)
      return env[v]

    for var, val in zip(jaxpr.constvars, consts):
      env[var] = np.asarray(val) if not isinstance(val, (str, Quant)) else val
    for var, val in zip(jaxpr.invars, args):
      env[var] = val
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      self._in_names = ins
      paths = [v.path if isinstance(v, Quant) else self.origin.get(id(v)) for v in ins]
      self._where = next((p for p in paths if p), self._where)
      outs = self.eqn(eqn, ins)
      if not any(isinstance(o, str) for o in outs):
        outs = [self.track(o, next((p for p in paths if p), None)) for o in outs]
      for var, val in zip(eqn.outvars, outs):
        env[var] = val
    return [read(v) for v in jaxpr.outvars]

  def eqn(self, eqn, ins: list) -> list:
    prim, params = eqn.primitive.name, eqn.params
    if prim not in _BROADCASTS:  # constants left at their broadcastable shape (as
      # broadcast_in_dim leaves them, to keep the file small) take their full one here
      ins = [_full(v, var.aval) for v, var in zip(ins, eqn.invars)]
    if "call_jaxpr" in params or "jaxpr" in params:  # jit, custom_jvp/vjp, remat: inline
      closed = params.get("call_jaxpr", params.get("jaxpr"))
      inner, consts = ((closed.jaxpr, closed.consts) if hasattr(closed, "consts")
                       else (closed, []))
      return self.run(inner, list(consts), ins)
    if all(not isinstance(v, (str, Quant)) for v in ins) and not _symbolic(eqn):
      vals = [np.asarray(v) for v in ins]
      if prim in _BROADCASTS and len({v.shape for v in vals}) > 1:
        common = np.broadcast_shapes(*[v.shape for v in vals])
        vals = [np.broadcast_to(v, common) for v in vals]
      try:  # everything known on the host: fold
        out = eqn.primitive.bind(*vals, **params)
      except Exception as e:  # pylint: disable=broad-except
        raise self.fail(f"folding {prim} failed ({type(e).__name__}: {e})", eqn) from None
      outs = out if eqn.primitive.multiple_results else [out]
      return [np.asarray(o) for o in outs]
    if prim == "convert_element_type" and isinstance(ins[0], Quant) and params[
        "new_dtype"] == ins[0].value.dtype:
      return [ins[0]]
    rule = _RULES.get(prim)
    if rule is None:
      raise self.fail(f"no mapping for primitive {prim!r}", eqn)
    out = rule(self, eqn, ins, **{k: v for k, v in params.items()})
    return out if isinstance(out, list) else [out]


def _full(v, aval):
  if isinstance(v, (str, Quant)) or not hasattr(aval, "shape") or np.shape(v) == aval.shape:
    return v
  shape = [int(d) if isinstance(d, (int, np.integer)) else 1 for d in aval.shape]
  return np.broadcast_to(v, shape) if np.shape(v) != tuple(shape) else v


def _symbolic(eqn) -> bool:
  """An output shape with a symbolic (batch) dimension cannot be folded."""
  return any(not isinstance(d, (int, np.integer)) for v in eqn.outvars
             for d in getattr(v.aval, "shape", ()))


def _dims(shape) -> list[int]:
  """A shape for Reshape: a symbolic dimension becomes -1 (at most one)."""
  dims = [int(d) if isinstance(d, (int, np.integer)) else -1 for d in shape]
  if dims.count(-1) > 1:
    raise ValueError(f"ONNX export: shape {tuple(shape)} has two symbolic dimensions")
  return dims


def _dtype(c: Converter, dtype) -> int:
  return c.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


# --- rules: (converter, eqn, inputs, **params) -> output(s) --------------------------

def _binary(op):
  def rule(c, eqn, ins, **_):
    a, b = ins
    if op == "Sub" and not isinstance(b, (str, Quant)):  # x - const = x + (-const):
      return c.one("Add", [c.tensor(a), c.tensor(-np.asarray(b))])  # conv+add fusion
    if op in ("Max", "Min") and isinstance(a, str) and not isinstance(b, (str, Quant)) \
        and np.ndim(b) == 0:
      if op == "Max" and float(b) == 0.0:
        return c.one("Relu", [a])
      return c.one("Clip", [a, c.tensor(b)] if op == "Max" else [a, "", c.tensor(b)])
    if op in ("Max", "Min") and isinstance(b, str) and not isinstance(a, (str, Quant)) \
        and np.ndim(a) == 0:
      return rule(c, eqn, [b, a])
    return c.one(op, [c.tensor(a), c.tensor(b)])
  return rule


def _unary(op):
  return lambda c, eqn, ins, **_: c.one(op, [c.tensor(ins[0])])


def _rsqrt(c, eqn, ins, **_):
  return c.one("Reciprocal", [c.one("Sqrt", [c.tensor(ins[0])])])


def _integer_pow(c, eqn, ins, y, **_):
  x = c.tensor(ins[0])
  if y == 2:
    return c.one("Mul", [x, x])
  return c.one("Pow", [x, c.tensor(np.asarray(y, eqn.invars[0].aval.dtype))])


def _convert(c, eqn, ins, new_dtype, **_):
  if np.dtype(new_dtype) == np.dtype(eqn.invars[0].aval.dtype):
    return c.tensor(ins[0])
  return c.one("Cast", [c.tensor(ins[0])], to=_dtype(c, new_dtype))


def _reshape(c, eqn, ins, new_sizes, dimensions=None, **_):
  if dimensions is not None:
    raise c.fail("reshape with dimensions", eqn)
  return c.one("Reshape", [c.tensor(ins[0]), c.ints(_dims(new_sizes))])


def _broadcast(c, eqn, ins, shape, broadcast_dimensions, **_):
  x = ins[0]
  src = eqn.invars[0].aval.shape
  keep = [1] * len(shape)
  for i, d in enumerate(broadcast_dimensions):
    keep[d] = src[i]
  static = all(isinstance(d, (int, np.integer)) for d in shape)
  if not isinstance(x, (str, Quant)):  # a constant: its dimensions in place, the new
    # ones 1 (the consumer broadcasts; anything else expands it, Converter.eqn)
    return np.asarray(x).reshape([int(d) if isinstance(d, (int, np.integer)) else 1
                                  for d in keep])
  y = c.one("Reshape", [c.tensor(x), c.ints(_dims(keep))])
  if static and tuple(keep) != tuple(shape):
    y = c.one("Expand", [y, c.ints(shape)])
  return y


def _transpose(c, eqn, ins, permutation, **_):
  return c.one("Transpose", [c.tensor(ins[0])], perm=list(permutation))


def _squeeze(c, eqn, ins, dimensions, **_):
  return c.one("Squeeze", [c.tensor(ins[0]), c.ints(dimensions)])


def _concatenate(c, eqn, ins, dimension, **_):
  return c.one("Concat", [c.tensor(v) for v in ins], axis=int(dimension))


def _select_n(c, eqn, ins, **_):
  if len(ins) != 3:
    raise c.fail(f"select_n with {len(ins) - 1} cases", eqn)
  pred = c.tensor(ins[0])
  if np.dtype(eqn.invars[0].aval.dtype) != np.bool_:
    pred = c.one("Cast", [pred], to=c.onnx.TensorProto.BOOL)
  return c.one("Where", [pred, c.tensor(ins[2]), c.tensor(ins[1])])


def _clamp(c, eqn, ins, **_):
  lo, x, hi = ins
  if np.ndim(lo) == 0 and np.ndim(hi) == 0:
    return c.one("Clip", [c.tensor(x), c.tensor(lo), c.tensor(hi)])
  return c.one("Min", [c.one("Max", [c.tensor(x), c.tensor(lo)]), c.tensor(hi)])


def _reduce(op):
  def rule(c, eqn, ins, axes, **_):
    return c.one(op, [c.tensor(ins[0]), c.ints(axes)], keepdims=0)
  return rule


def _argmax(c, eqn, ins, axes, index_dtype, **_):
  y = c.one("ArgMax", [c.tensor(ins[0])], axis=int(axes[0]), keepdims=0)
  return c.one("Cast", [y], to=_dtype(c, index_dtype))


def _slice(c, eqn, ins, start_indices, limit_indices, strides=None, **_):
  axes = list(range(len(start_indices)))
  return c.one("Slice", [c.tensor(ins[0]), c.ints(start_indices), c.ints(limit_indices),
                         c.ints(axes), c.ints(strides or [1] * len(axes))])


def _pad(c, eqn, ins, padding_config, **_):
  if any(i != 0 for _, _, i in padding_config) or any(lo < 0 or hi < 0
                                                     for lo, hi, _ in padding_config):
    raise c.fail("pad with interior or negative padding", eqn)
  pads = [lo for lo, _, _ in padding_config] + [hi for _, hi, _ in padding_config]
  return c.one("Pad", [c.tensor(ins[0]), c.ints(pads), c.tensor(ins[1])])


def _split(c, eqn, ins, sizes, axis, **_):
  return c.node("Split", [c.tensor(ins[0]), c.ints(sizes)], n_out=len(sizes), axis=int(axis))


def _nchw(c, x: str, spec) -> str:
  """``x`` with its dimensions in ``spec`` order (batch, feature, spatial...)."""
  perm = list(spec)
  return x if perm == sorted(perm) else c.one("Transpose", [x], perm=perm)


def _from_nchw(c, y: str, spec) -> str:
  inverse = [0] * len(spec)
  for k, axis in enumerate(spec):
    inverse[axis] = k
  return y if list(spec) == sorted(spec) else c.one("Transpose", [y], perm=inverse)


def _weight(c, w, perm: list[int] | None, channel_axis: int) -> str:
  """The name of a kernel in the layout the op wants (``perm`` of its axes): a
  :class:`Quant` as its codes and a DequantizeLinear (or Gather of a codebook), a
  constant as float32, a tensor through a Transpose."""
  if isinstance(w, str):
    return w if perm is None else c.one("Transpose", [w], perm=perm)
  if not isinstance(w, Quant):
    return c.init(np.asarray(w) if perm is None else np.ascontiguousarray(
        np.transpose(w, perm)), "w")
  q = w.weight
  codes = np.asarray(q.codes) if perm is None else np.ascontiguousarray(
      np.transpose(q.codes, perm))
  c.int_paths.append(w.path)
  if q.codebook is not None:
    table = c.init(np.asarray(q.codebook, np.float32), "codebook")
    indices = c.one("Cast", [c.init(codes, "indices")], to=c.onnx.TensorProto.INT32)
    return c.one("Gather", [table, indices], axis=0)
  scale = np.asarray(q.scale, np.float32)
  zero = np.asarray(q.zero_point).astype(codes.dtype)
  axis = {} if scale.ndim == 0 else {"axis": channel_axis}
  out = c.one("DequantizeLinear", [c.init(codes, "codes"), c.init(scale, "scale"),
                                   c.init(zero, "zero_point")], **axis)
  c.nodes[-1].name = f"{w.path}{WEIGHT_NODE}"  # which param (export's trained ranges)
  return out


def _dot_general(c, eqn, ins, dimension_numbers, **_):
  (lc, rc), (lb, rb) = dimension_numbers
  a, b = ins
  la, ra = eqn.invars[0].aval.ndim, eqn.invars[1].aval.ndim
  if not lb and not rb and len(lc) == 1 and lc[0] == la - 1 and len(rc) == 1 and ra == 2:
    perm = None if rc[0] == 0 else [1, 0]
    return c.one("MatMul", [c.tensor(a), _weight(c, b, perm, 1)])
  letters = iter("abcdefghijklmnopqrstuvwxyz")
  ls = [next(letters) for _ in range(la)]
  rs = [next(letters) for _ in range(ra)]
  for i, j in zip(list(lc) + list(lb), list(rc) + list(rb)):
    rs[j] = ls[i]
  out = ([ls[i] for i in lb] + [ls[i] for i in range(la) if i not in lc and i not in lb]
         + [rs[j] for j in range(ra) if j not in rc and j not in rb])
  eq = f"{''.join(ls)},{''.join(rs)}->{''.join(out)}"
  return c.one("Einsum", [c.tensor(a), c.tensor(b)], equation=eq)


def _conv(c, eqn, ins, window_strides, padding, lhs_dilation, rhs_dilation,
          dimension_numbers, feature_group_count, batch_group_count, **_):
  if batch_group_count != 1 or any(d != 1 for d in lhs_dilation):
    raise c.fail("conv_general_dilated with lhs_dilation or batch_group_count", eqn)
  if any(lo < 0 or hi < 0 for lo, hi in padding):
    raise c.fail("conv_general_dilated with negative padding", eqn)
  lhs, rhs, out = dimension_numbers
  x = _nchw(c, c.tensor(ins[0]), lhs)
  w = _weight(c, ins[1], list(rhs), 0)
  y = c.one("Conv", [x, w], strides=list(window_strides), dilations=list(rhs_dilation),
            group=int(feature_group_count),
            pads=[lo for lo, _ in padding] + [hi for _, hi in padding])
  return _from_nchw(c, y, out)


def _pool(op):
  def rule(c, eqn, ins, window_dimensions, window_strides, padding, base_dilation,
           window_dilation, **_):
    rank = len(window_dimensions)
    spatial = [i for i in range(rank) if window_dimensions[i] != 1 or window_strides[i] != 1
               or tuple(padding[i]) != (0, 0)]
    if (any(d != 1 for d in base_dilation) or any(d != 1 for d in window_dilation)
        or rank < 3 or any(i in (0, rank - 1) for i in spatial)):
      raise c.fail(f"{eqn.primitive.name} other than pooling over the inner axes of "
                   "NHWC", eqn)
    spec = [0, rank - 1] + list(range(1, rank - 1))
    x = _nchw(c, c.tensor(ins[0]), spec)
    inner = range(1, rank - 1)
    attrs = {"kernel_shape": [window_dimensions[i] for i in inner],
             "strides": [window_strides[i] for i in inner],
             "pads": [padding[i][0] for i in inner] + [padding[i][1] for i in inner]}
    if op == "MaxPool":
      y = c.one("MaxPool", [x], **attrs)
    else:
      y = c.one("AveragePool", [x], count_include_pad=1, **attrs)
      size = np.asarray(np.prod(attrs["kernel_shape"]), eqn.invars[0].aval.dtype)
      y = c.one("Mul", [y, c.tensor(size)])
    return _from_nchw(c, y, spec)
  return rule


# Elementwise ops: their constant inputs may stay at a broadcastable shape.
_BROADCASTS = set(_BINARY) | set(_UNARY) | {"rsqrt", "integer_pow", "square", "select_n",
                                            "clamp", "convert_element_type"}
_RULES = {**{p: _binary(op) for p, op in _BINARY.items()},
          **{p: _unary(op) for p, op in _UNARY.items()},
          **{p: _reduce(op) for p, op in _REDUCE.items()},
          "rsqrt": _rsqrt, "integer_pow": _integer_pow, "square": lambda c, eqn, ins, **_: _integer_pow(c, eqn, ins, 2),
          "convert_element_type": _convert, "reshape": _reshape,
          "broadcast_in_dim": _broadcast, "transpose": _transpose, "squeeze": _squeeze,
          "concatenate": _concatenate, "select_n": _select_n,
          "clamp": _clamp, "argmax": _argmax, "slice": _slice, "pad": _pad, "split": _split,
          "dot_general": _dot_general, "conv_general_dilated": _conv,
          "reduce_window_max": _pool("MaxPool"), "reduce_window_sum": _pool("AveragePool")}


def convert(closed_jaxpr, params: dict[str, np.ndarray], quantized: dict[str, IntWeight],
            input_name: str = "images", output_name: str = "logits"):
  """``(graph, int_paths)``: the ``onnx.GraphProto`` of ``closed_jaxpr`` (``jax.make_jaxpr
  (f)(params, images)``, ``params`` a flat dict in the jaxpr's input order) and the
  params stored as integer codes (those of ``quantized`` that feed a dot or conv).
  ValueError: a primitive (or a form of one) with no ONNX mapping."""
  onnx, _ = _onnx()
  c = Converter()
  jaxpr = closed_jaxpr.jaxpr
  args: list[Any] = [Quant(p, quantized[p], np.asarray(v)) if p in quantized
                     else c.track(np.asarray(v), p) for p, v in params.items()]
  image = jaxpr.invars[-1]
  args.append(input_name)
  (out,) = c.run(jaxpr, list(closed_jaxpr.consts), args)
  c.nodes.append(onnx.helper.make_node("Identity", [c.tensor(out)], [output_name]))
  info = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [
      int(d) if isinstance(d, (int, np.integer)) else "batch" for d in var.aval.shape])
      for name, var in ((input_name, image), (output_name, jaxpr.outvars[0]))]
  graph = onnx.helper.make_graph(c.nodes, "jcompress", info[:1], info[1:], initializer=c.inits)
  return graph, sorted(set(c.int_paths))
