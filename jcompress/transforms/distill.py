"""Knowledge distillation: Hinton's logit loss and intermediate-feature matching.

Pure functions over arrays and the ``distill`` method's pytree bookkeeping; the
teacher (a trained checkpoint) is loaded and run by ``jcompress.train.distill``.

* Logits (Hinton et al. 2015): ``(1 - alpha) CE(y, s) + alpha T^2 KL(p_t || p_s)``
  with ``p = softmax(logits / T)``; ``T^2`` keeps the soft term's gradient scale
  independent of the temperature.
* Features (seed 003, FitNets): the output of chosen student layers matched to
  the teacher's at the same spatial size, through a learned 1x1 adapter
  (``features @ W``, ``W`` of shape ``(c_student, c_teacher)``) where the widths
  differ; ``mse`` (mean squared difference) or ``cosine`` (1 - cosine similarity
  per example, over the flattened features).

The ``distill`` method's trainable tree is the model's params plus the adapters
under ``ADAPTERS`` (``{student_layer: {"kernel": W}}``); ``apply`` drops them,
so evaluation, costs and export see the student alone.

>>> s = jnp.array([[2.0, 0.0]]); t = jnp.array([[0.0, 2.0]])
>>> float(kd_loss(s, s, jnp.array([0]), temperature=2.0, alpha=1.0)[0])
0.0
>>> bool(kd_loss(s, t, jnp.array([0]), temperature=2.0, alpha=1.0)[0] > 0)
True
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jcompress.transforms import base

ADAPTERS = "distill_adapters"
FEATURE_LOSSES = ("mse", "cosine")


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, *,
            temperature: float, alpha: float, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example Hinton loss: ``(1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher || student)``.

  Args:
    student_logits, teacher_logits: ``(batch, classes)``; the teacher's are
      treated as constants (``stop_gradient``).
    labels: ``(batch,)`` integer classes.
    temperature: ``T > 0``, softens both distributions.
    alpha: weight of the soft term, in ``[0, 1]``.
    label_smoothing: of the hard term's targets.
  """
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  targets = jax.nn.one_hot(labels, student_logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  hard = optax.softmax_cross_entropy(student_logits, targets)
  p_teacher = jax.nn.softmax(teacher_logits / temperature)
  soft = jnp.sum(p_teacher * (jax.nn.log_softmax(teacher_logits / temperature)
                              - jax.nn.log_softmax(student_logits / temperature)), axis=-1)
  return (1 - alpha) * hard + alpha * temperature ** 2 * soft


def feature_loss(student: jax.Array, teacher: jax.Array, kind: str = "mse") -> jax.Array:
  """Per-example distance between (adapted) student and teacher features of equal shape."""
  if student.shape != teacher.shape:
    raise ValueError(f"feature shapes differ: student {student.shape}, teacher {teacher.shape}")
  teacher = jax.lax.stop_gradient(teacher)
  s, t = student.reshape(len(student), -1), teacher.reshape(len(teacher), -1)
  if kind == "mse":
    return jnp.mean((s - t) ** 2, axis=-1)
  if kind == "cosine":
    return 1 - optax.cosine_similarity(s, t, epsilon=1e-8)
  raise ValueError(f"unknown --feature-loss {kind!r}; valid: {', '.join(FEATURE_LOSSES)}")


def adapt(adapter: dict | None, features: jax.Array) -> jax.Array:
  """Student features mapped to the teacher's width (a 1x1 conv over the last axis)."""
  return features if adapter is None else features @ adapter["kernel"]


def parse_features(spec: str) -> list[tuple[str, str]]:
  """``"block3,fc1=fc2"`` -> ``[("block3", "block3"), ("fc1", "fc2")]``: student layer
  (a "/"-joined module path) and the teacher layer it is matched to."""
  pairs = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    student, _, teacher = part.partition("=")
    student, teacher = student.strip(), (teacher.strip() or student.strip())
    if not student or not teacher:
      raise ValueError(f"--features: expected LAYER or STUDENT_LAYER=TEACHER_LAYER, got {part!r}")
    pairs.append((student, teacher))
  return pairs


def init_adapters(adapters: dict[str, list[int]]) -> dict[str, dict[str, jax.Array]]:
  """LeCun-normal ``(c_student, c_teacher)`` kernels, seeded by the layer's name so
  that every process and every restore builds the same tree."""
  out = {}
  for layer, (c_in, c_out) in sorted(adapters.items()):
    key = jax.random.PRNGKey(zlib.crc32(layer.encode()))
    out[layer] = {"kernel": jax.random.normal(key, (c_in, c_out)) / jnp.sqrt(c_in)}
  return out


def check_options(temperature: float, alpha: float, feature_loss: str, feature_weight: float,
                  features: str) -> None:
  """Raises ValueError naming the first bad option."""
  if not temperature > 0:
    raise ValueError(f"--temperature must be positive, got {temperature}")
  if not 0 <= alpha <= 1:
    raise ValueError(f"--alpha must be in [0, 1], got {alpha}")
  if feature_loss not in FEATURE_LOSSES:
    raise ValueError(f"unknown --feature-loss {feature_loss!r}; valid: {', '.join(FEATURE_LOSSES)}")
  if feature_weight < 0:
    raise ValueError(f"--feature-weight must be >= 0, got {feature_weight}")
  parse_features(features)


OPTIONS = (
    base.Option("teacher", str, None, "workdir of the trained teacher (its latest checkpoint, "
                "frozen); the same dataset as the student"),
    base.Option("temperature", float, 4.0, "softmax temperature T of the soft targets"),
    base.Option("alpha", float, 0.9, "weight of the soft (teacher) term; 1 - alpha weighs "
                "the labels' cross-entropy"),
    base.Option("features", str, "", "intermediate layers to match, LAYER or "
                "STUDENT_LAYER=TEACHER_LAYER, comma-separated (module paths such as block3 "
                "or conv2); a 1x1 adapter maps the student's width to the teacher's"),
    base.Option("feature-loss", str, "mse", "distance of matched features", FEATURE_LOSSES),
    base.Option("feature-weight", float, 1.0, "weight of the summed feature losses"),
    base.Option("adapters", dict, None, "student layer -> [its width, the teacher's]",
                hidden=True),
)


def method(paths: list[str], *, teacher: str | None, temperature: float, alpha: float,
           features: str, feature_loss: str, feature_weight: float,
           adapters: dict[str, list[int]] | None) -> base.Method:
  """Distillation from ``--teacher``: the params train as they are, with the adapters beside."""
  if not teacher:
    raise ValueError("--method distill needs --teacher WORKDIR (a trained model)")
  check_options(temperature, alpha, feature_loss, feature_weight, features)
  if paths:
    raise ValueError("--method distill selects no tensors (drop --select / --min-size)")
  adapters = adapters or {}

  def init(params):
    return ({**params, ADAPTERS: init_adapters(adapters)} if adapters else params), {}

  def apply(trainable, cstate):
    return {k: v for k, v in trainable.items() if k != ADAPTERS}

  return base.Method("distill", init, apply)


def adapters_of(trainable: Any) -> dict[str, Any]:
  """The adapter kernels in a trainable tree (``{}`` without any)."""
  return trainable.get(ADAPTERS, {}) if isinstance(trainable, dict) else {}
