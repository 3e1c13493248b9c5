"""Knowledge distillation: Hinton's logit loss and intermediate-feature matching.

``--method distill --teacher WORKDIR`` (``jcompress compress``, or ``jcompress
train --teacher`` for a student trained from scratch) adds a plan step whose
loss replaces the cross-entropy while that step trains: the teacher's latest
checkpoint (loaded by the training layer through ``Context.load_model``, the
method's ``extra``) runs in inference mode beside the student, frozen (its
variables are arguments of the step, never differentiated), and the student
learns from its logits and, optionally, its intermediate features through
learned 1x1 adapters. Later steps of a plan (``--method ttq --method distill``)
train under the same loss, so a ternary or pruned student learns directly.

* Logits (Hinton et al. 2015): ``(1 - alpha) CE(y, s) + alpha T^2 KL(p_t || p_s)``
  with ``p = softmax(logits / T)``; ``T^2`` keeps the soft term's gradient scale
  independent of the temperature.
* Features (FitNets, Romero et al. 2015): the output of chosen student layers matched to
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

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from jcompress.transforms import base, registry

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
                "frozen) or a file jcompress export wrote; the same dataset as the student"),
    base.Option("temperature", float, 4.0, "softmax temperature T of the soft targets",
                range="(0, inf)"),
    base.Option("alpha", float, 0.9, "weight of the soft (teacher) term; 1 - alpha weighs "
                "the labels' cross-entropy", range="[0, 1]"),
    base.Option("features", str, "", "intermediate layers to match, LAYER or "
                "STUDENT_LAYER=TEACHER_LAYER, comma-separated (module paths such as block3 "
                "or conv2); a 1x1 adapter maps the student's width to the teacher's"),
    base.Option("feature-loss", str, "mse", "distance of matched features", FEATURE_LOSSES),
    base.Option("feature-weight", float, 1.0, "weight of the summed feature losses",
                range="[0, inf)"),
    base.Option("adapters", dict, None, "student layer -> [its width, the teacher's]",
                hidden=True),
)


@flax.struct.dataclass
class Teacher:
  """The frozen teacher as the train step gets it: its variables are arrays (a jit
  argument), its module is static."""
  variables: Any
  module: nn.Module = flax.struct.field(pytree_node=False)


def capture(layers: tuple[str, ...]):
  """A ``capture_intermediates`` filter keeping the outputs of the modules at ``layers``."""
  wanted = frozenset(layers)
  return lambda module, method_name: (method_name == "__call__"
                                      and "/".join(module.path) in wanted)


def run(model: nn.Module, variables: dict, images: jax.Array, layers: tuple[str, ...]):
  """``(logits, intermediates)`` of ``model`` in inference mode, capturing ``layers``."""
  if not layers:
    return model.apply(variables, images, train=False), {}
  logits, state = model.apply(variables, images, train=False, capture_intermediates=capture(layers),
                              mutable=["intermediates"])
  return logits, state["intermediates"]


def feature(intermediates: Any, layer: str) -> jax.Array:
  """The captured output of the module at ``layer`` ("/"-joined path)."""
  node = intermediates
  for name in layer.split("/"):
    node = node[name]
  return node["__call__"][0]


_feature_loss = feature_loss  # the factory's keyword of the same name shadows it


def method(paths: list[str], *, teacher: str | None, temperature: float, alpha: float,
           features: str, feature_loss: str, feature_weight: float,
           adapters: dict[str, list[int]] | None) -> base.Method:
  """Distillation from ``--teacher``: the params train as they are, with the adapters
  beside; the loss is :func:`kd_loss` plus the weighted feature losses."""
  if not teacher:
    raise ValueError("--method distill needs --teacher WORKDIR (a trained model)")
  check_options(temperature, alpha, feature_loss, feature_weight, features)
  if paths:
    raise ValueError("--method distill selects no tensors (drop --select / --min-size)")
  adapters = adapters or {}
  pairs = tuple(parse_features(features))
  teacher_layers = tuple(t for _, t in pairs)

  def init(params):
    return ({**params, ADAPTERS: init_adapters(adapters)} if adapters else params), {}

  def apply(trainable, cstate):
    return {k: v for k, v in trainable.items() if k != ADAPTERS}

  def extra(context: base.Context) -> Teacher:
    module, variables, _ = _load_teacher(context, teacher)
    return Teacher(variables, module)

  def loss(inputs: base.LossInputs, extra: Teacher) -> jax.Array:
    t_logits, t_inter = run(extra.module, extra.variables, inputs.images, teacher_layers)
    value = kd_loss(inputs.logits, t_logits, inputs.labels, temperature=temperature,
                    alpha=alpha, label_smoothing=inputs.label_smoothing)
    kernels = adapters_of(inputs.trainable)
    for student, teacher_layer in pairs:
      s = adapt(kernels.get(student), feature(inputs.intermediates, student))
      value = value + feature_weight * _feature_loss(s, feature(t_inter, teacher_layer),
                                                       feature_loss)
    return value.mean()

  return base.Method("distill", init, apply, loss=loss, extra=extra,
                     captures=tuple(s for s, _ in pairs))


def adapters_of(trainable: Any) -> dict[str, Any]:
  """The adapter kernels in a trainable tree (``{}`` without any)."""
  return trainable.get(ADAPTERS, {}) if isinstance(trainable, dict) else {}


def _layer_names(model: nn.Module, variables: dict, input_shape: tuple[int, ...]) -> list[str]:
  _, state = jax.eval_shape(lambda v: model.apply(
      v, jnp.zeros((1, *input_shape)), train=False, capture_intermediates=True,
      mutable=["intermediates"]), variables)
  names = []

  def walk(node, prefix):
    for key, value in node.items():
      if key == "__call__":
        names.append(prefix)
      elif isinstance(value, dict):
        walk(value, f"{prefix}/{key}" if prefix else key)
  walk(state["intermediates"], "")
  return [n for n in names if n]


def _feature_shapes(model, variables, input_shape, layers, role):
  known = _layer_names(model, variables, input_shape)
  missing = [layer for layer in layers if layer not in known]
  if missing:
    raise ValueError(f"--features: the {role} has no layer {', '.join(missing)}; its layers: "
                     f"{', '.join(known)}")
  logits, inter = jax.eval_shape(lambda v: run(model, v, jnp.zeros((2, *input_shape)),
                                                tuple(layers)), variables)
  return logits.shape, {layer: feature(inter, layer).shape for layer in layers}


def _load_teacher(context: base.Context, source: str):
  if context is None or context.load_model is None:
    raise ValueError("--method distill loads its --teacher: pass a Context with load_model")
  try:
    return context.load_model(source)
  except FileNotFoundError as e:
    raise ValueError(f"--teacher: {e}") from None


def prepare(paths: list[str], options: dict[str, Any], model: nn.Module, variables: dict,
            input_shape: tuple[int, ...], context: base.Context) -> dict[str, Any]:
  """Checks the teacher against the student and sizes the feature adapters.

  Raises:
    ValueError: no or an unusable ``--teacher``, another input shape or number of
      classes, a ``--features`` layer either model lacks, or matched features of
      different spatial shapes.
  """
  check_options(options["temperature"], options["alpha"], options["feature_loss"],
                        options["feature_weight"], options["features"])
  if not options["teacher"]:
    raise ValueError("--method distill needs --teacher WORKDIR (a trained model)")
  teacher, t_vars, t_meta = _load_teacher(context, options["teacher"])
  if tuple(t_meta["input_shape"]) != tuple(input_shape):
    raise ValueError(f"--teacher {options['teacher']} takes inputs {tuple(t_meta['input_shape'])}, "
                     f"the student {tuple(input_shape)}")
  pairs = parse_features(options["features"])
  s_logits, s_feats = _feature_shapes(model, variables, input_shape, [s for s, _ in pairs],
                                      "student")
  t_logits, t_feats = _feature_shapes(teacher, t_vars, input_shape, [t for _, t in pairs],
                                      "teacher")
  if s_logits[-1] != t_logits[-1]:
    raise ValueError(f"--teacher {options['teacher']} has {t_logits[-1]} classes, the student "
                     f"{s_logits[-1]}")
  adapters = {}
  for student, teacher_layer in pairs:
    s, t = s_feats[student], t_feats[teacher_layer]
    if s[:-1] != t[:-1]:
      raise ValueError(f"--features {student}={teacher_layer}: student output {s[1:]} and "
                       f"teacher output {t[1:]} differ in more than the channel width")
    if s[-1] != t[-1]:
      adapters[student] = [int(s[-1]), int(t[-1])]
  return options | {"adapters": adapters}


registry.register("distill", *OPTIONS, prepare=prepare, selects=False,
                  help="knowledge distillation from a trained --teacher (Hinton et al. 2015; "
                  "FitNets feature matching)")(method)
