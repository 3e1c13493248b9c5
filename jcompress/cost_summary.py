"""The cost records ``jcompress.cost.summarize`` returns (``TensorCost``,
``LayerCost``, ``Summary``) and the scores read off them: ``score``
(``log10(error * bytes * mults)``), ``energy_uj`` and the MicroNet challenge's
``micronet_score``. Import them from ``jcompress.cost``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class TensorCost:
  """One trainable tensor.

  Attributes:
    path: ``/``-joined parameter path (``block3/dw/kernel``).
    shape: the tensor's shape.
    nonzero: entries that are nonzero (under the mask, if one was given).
    bits: bits per stored entry.
  """
  path: str
  shape: tuple[int, ...]
  nonzero: int
  bits: float

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def bytes(self) -> float:
    return self.size * self.bits / 8

  @property
  def sparse_bytes(self) -> float:
    """Nonzeros at ``bits`` plus a 1-bit mask of the full shape."""
    return self.nonzero * self.bits / 8 + self.size / 8

  @property
  def is_weight(self) -> bool:
    """A kernel of a weight layer (not a bias or a normalisation parameter)."""
    return self.path.rsplit("/", 1)[-1] == "kernel" and len(self.shape) >= 2


def _weight_sparsity(tensors) -> float:
  weights = [t for t in tensors if t.is_weight]
  size = sum(t.size for t in weights)
  return 1 - sum(t.nonzero for t in weights) / size if size else 0.0


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """One row of the per-layer table: a module that owns parameters, or the ops a
  module runs outside its submodules (kind ``ops``).

  Attributes:
    path: ``/``-joined module path (``""`` is the top-level module).
    kind: ``dense``, ``conv``, ``grouped_conv``, ``depthwise``, ``local``,
      ``batch_norm``, ``layer_norm``, ``group_norm``, ``ops``, or ``unused`` for
      parameters no traced call touched.
    input_shape: the first call's input shape without the batch axis.
    output_shape: the first call's output shape without the batch axis.
    tensors: the module's own trainable tensors.
    macs: multiply-accumulates of the weight layer.
    nonzero_macs: MACs with a nonzero weight.
    flops: FLOPs of the weight layer, ``outputs * (2 * fan_in - 1)``.
    other_ops: all other arithmetic (see the module docstring).
    weight_bits: bits of the ``kernel`` of weight layers, else None.
  """
  path: str
  kind: str
  input_shape: tuple[int, ...] | None
  output_shape: tuple[int, ...] | None
  tensors: tuple[TensorCost, ...] = ()
  macs: int = 0
  nonzero_macs: int = 0
  flops: int = 0
  other_ops: int = 0
  weight_bits: float | None = None

  @property
  def params(self) -> int:
    return sum(t.size for t in self.tensors)

  @property
  def nonzero_params(self) -> int:
    return sum(t.nonzero for t in self.tensors)

  @property
  def bytes(self) -> float:
    return sum(t.bytes for t in self.tensors)

  @property
  def bits(self) -> float | None:
    """Average bits per parameter; None without parameters."""
    return 8 * self.bytes / self.params if self.params else None

  @property
  def sparsity(self) -> float:
    """Fraction of the layer's weights (kernel entries) that are zero."""
    return _weight_sparsity(self.tensors)

  def to_dict(self) -> dict[str, Any]:
    return {
        "path": self.path, "kind": self.kind,
        "input_shape": None if self.input_shape is None else list(self.input_shape),
        "output_shape": None if self.output_shape is None else list(self.output_shape),
        "params": self.params, "nonzero_params": self.nonzero_params,
        "macs": self.macs, "nonzero_macs": self.nonzero_macs, "flops": self.flops,
        "other_ops": self.other_ops, "weight_bits": self.weight_bits, "bits": self.bits,
        "bytes": self.bytes, "sparsity": self.sparsity,
    }


_MULTS_CONVENTIONS = ("macs", "nonzero_macs", "macs_bn")


@dataclasses.dataclass(frozen=True)
class Summary:
  """The per-layer costs of one model and their totals (per example).

  Attributes:
    input_shape: the input shape without the batch axis.
    layers: the table's rows in call order.
  """
  input_shape: tuple[int, ...]
  layers: tuple[LayerCost, ...]

  @property
  def tensors(self) -> tuple[TensorCost, ...]:
    return tuple(t for layer in self.layers for t in layer.tensors)

  @property
  def params(self) -> int:
    return sum(layer.params for layer in self.layers)

  @property
  def nonzero_params(self) -> int:
    return sum(layer.nonzero_params for layer in self.layers)

  @property
  def norm_params(self) -> int:
    """Trainable batch norm parameters (2 per normalised feature)."""
    return sum(layer.params for layer in self.layers if layer.kind == "batch_norm")

  @property
  def macs(self) -> int:
    return sum(layer.macs for layer in self.layers)

  @property
  def nonzero_macs(self) -> int:
    return sum(layer.nonzero_macs for layer in self.layers)

  @property
  def flops(self) -> int:
    return sum(layer.flops for layer in self.layers)

  @property
  def other_ops(self) -> int:
    return sum(layer.other_ops for layer in self.layers)

  @property
  def bytes(self) -> float:
    return sum(layer.bytes for layer in self.layers)

  @property
  def sparse_bytes(self) -> float:
    return sum(t.sparse_bytes for t in self.tensors)

  @property
  def bits(self) -> float:
    """Average bits per parameter."""
    return 8 * self.bytes / self.params

  @property
  def sparsity(self) -> float:
    """Fraction of zero weights over all weight tensors (kernels)."""
    return _weight_sparsity(self.tensors)

  def mults(self, convention: str = "macs") -> int:
    """The multiplication count under a named convention.

    Args:
      convention: ``macs`` (weight-layer MACs), ``nonzero_macs`` (MACs with a
        nonzero weight) or ``macs_bn`` (MACs plus 2 per batch norm feature: the
        folded scale and shift counted once per feature, as multiplications).

    Returns:
      The count.
    """
    if convention == "macs":
      return self.macs
    if convention == "nonzero_macs":
      return self.nonzero_macs
    if convention == "macs_bn":
      return self.macs + self.norm_params
    raise ValueError(f"mults convention must be one of {_MULTS_CONVENTIONS}, "
                     f"got {convention!r}")

  def to_dict(self) -> dict[str, Any]:
    """Totals and the ``layers`` list, JSON-serialisable."""
    return {
        "input_shape": list(self.input_shape), "params": self.params,
        "nonzero_params": self.nonzero_params, "norm_params": self.norm_params,
        "macs": self.macs, "nonzero_macs": self.nonzero_macs, "flops": self.flops,
        "other_ops": self.other_ops, "bits": self.bits, "bytes": self.bytes,
        "sparse_bytes": self.sparse_bytes, "sparsity": self.sparsity,
        "layers": [layer.to_dict() for layer in self.layers],
    }


# ----------------------------------------------------------------------------
# Scores.


def score(error: float, bytes: float, mults: float) -> float:
  """The score ``log10(error * bytes * mults)``; lower is better.

  Args:
    error: the test error in (0, 1].
    bytes: the model's storage in bytes.
    mults: its multiplications per example (``Summary.mults(...)``).

  Returns:
    The score (tables print it truncated to 4 decimals).

  >>> f"{score(0.093959, 521215 * 4, 519936):.5f}"  # FCN, Small at 32 bits
  '11.00797'
  """
  if not 0 < error <= 1:
    raise ValueError(f"score: error must be in (0, 1], got {error}")
  if bytes <= 0 or mults <= 0:
    raise ValueError(f"score: bytes and mults must be positive, got {bytes}, {mults}")
  return math.log10(error * bytes * mults)


def energy_uj(macs: float, pj_per_mac: float = 1.0) -> float:
  """Energy per inference in microjoules at ``pj_per_mac`` picojoules per MAC.

  About 1 pJ per MAC at low precision in 45 nm (Horowitz, ISSCC 2014).

  >>> energy_uj(782_368)
  0.782368
  """
  if pj_per_mac <= 0:
    raise ValueError(f"energy_uj: pj_per_mac must be positive, got {pj_per_mac}")
  return macs * pj_per_mac * 1e-6


@dataclasses.dataclass(frozen=True)
class MicroNetScore:
  """The MicroNet challenge score and its two terms.

  Attributes:
    params: parameter storage in 32-bit parameter equivalents.
    ops: math operations in 32-bit operation equivalents.
    score: ``params / reference_params + ops / reference_ops``.
  """
  params: float
  ops: float
  score: float


def micronet_score(summary: Summary, *, reference_params: float, reference_ops: float,
                   activation_bits: float = 32, accumulator_bits: float = 32
                   ) -> MicroNetScore:
  """The MicroNet challenge (NeurIPS 2019) score of a summary.

  A b-bit parameter counts b/32; a sparse tensor counts its nonzeros plus a 1-bit
  mask of its full shape when that is smaller than storing it dense. Every nonzero
  MAC is one multiply at ``max(weight bits, activation_bits)`` and one add at
  ``accumulator_bits``; other ops run at ``activation_bits``; each op counts
  bits/32. The score normalises both terms by the track's reference network
  (pass its parameter and op counts; the reference scores 2).

  Args:
    summary: from ``summarize`` with the model's bits and masks.
    reference_params: the reference network's parameters.
    reference_ops: the reference network's math operations.
    activation_bits: bits of activations.
    accumulator_bits: bits of the accumulating adds.

  Returns:
    The two terms and the score.
  """
  if reference_params <= 0 or reference_ops <= 0:
    raise ValueError("micronet_score: reference_params and reference_ops must be positive")
  params = sum(min(t.size * t.bits, t.nonzero * t.bits + t.size) / 32
               for t in summary.tensors)
  ops = 0.0
  for layer in summary.layers:
    if layer.weight_bits is not None:
      multiply_bits = max(layer.weight_bits, activation_bits)
      ops += layer.nonzero_macs * (multiply_bits + accumulator_bits) / 32
    ops += layer.other_ops * activation_bits / 32
  return MicroNetScore(params, ops, params / reference_params + ops / reference_ops)
