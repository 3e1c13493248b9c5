"""Distillation in training: the ``distill`` method's teacher, loaded and run in the step.

``--method distill --teacher WORKDIR`` (``jcompress compress``, or ``jcompress
train --teacher`` for a student trained from scratch) adds a plan step whose
loss replaces the cross-entropy while that step trains: the teacher's latest
checkpoint runs in inference mode beside the student, frozen (its variables are
arguments of the step, never differentiated: ``stop_gradient`` on its outputs),
and the student learns from its logits and, optionally, its intermediate
features through learned 1x1 adapters (``jcompress.transforms.distill``).
Later steps of a plan (e.g. ``--method ttq --method distill``) train under the
same loss, so a ternary or pruned student learns from the teacher directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jcompress.transforms import base, distill


@dataclasses.dataclass(frozen=True)
class Distiller:
  """The teacher model and the loss's hyperparameters (hashable: a static jit argument)."""
  teacher: nn.Module
  temperature: float
  alpha: float
  pairs: tuple[tuple[str, str], ...] = ()
  feature_loss: str = "mse"
  feature_weight: float = 1.0

  @property
  def student_layers(self) -> tuple[str, ...]:
    return tuple(s for s, _ in self.pairs)

  def loss(self, trainable: Any, logits: jax.Array, intermediates: Any,
           teacher_variables: dict, images: jax.Array, labels: jax.Array,
           label_smoothing: float = 0.0) -> jax.Array:
    """The batch-mean distillation loss of the student's ``logits`` and captured
    ``intermediates`` (``{}`` without feature pairs)."""
    t_logits, t_inter = _run(self.teacher, teacher_variables, images,
                             tuple(t for _, t in self.pairs))
    loss = distill.kd_loss(logits, t_logits, labels, temperature=self.temperature,
                           alpha=self.alpha, label_smoothing=label_smoothing)
    adapters = distill.adapters_of(trainable)
    for student, teacher in self.pairs:
      s = distill.adapt(adapters.get(student), _feature(intermediates, student))
      loss = loss + self.feature_weight * distill.feature_loss(
          s, _feature(t_inter, teacher), self.feature_loss)
    return loss.mean()


def capture(layers: tuple[str, ...]):
  """A ``capture_intermediates`` filter keeping the outputs of the modules at ``layers``."""
  wanted = frozenset(layers)
  return lambda module, method_name: (method_name == "__call__"
                                      and "/".join(module.path) in wanted)


def _run(model: nn.Module, variables: dict, images: jax.Array, layers: tuple[str, ...]):
  if not layers:
    return model.apply(variables, images, train=False), {}
  logits, state = model.apply(variables, images, train=False, capture_intermediates=capture(layers),
                              mutable=["intermediates"])
  return logits, state["intermediates"]


def _feature(intermediates: Any, layer: str) -> jax.Array:
  node = intermediates
  for name in layer.split("/"):
    node = node[name]
  return node["__call__"][0]


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
  logits, inter = jax.eval_shape(lambda v: _run(model, v, jnp.zeros((2, *input_shape)),
                                                tuple(layers)), variables)
  return logits.shape, {layer: _feature(inter, layer).shape for layer in layers}


def _load_teacher(workdir: str, mesh: Mesh | None = None):
  from jcompress.train.loop import load_workdir  # the loop imports this module
  try:
    model, state, meta, method = load_workdir(workdir, mesh=mesh)
  except FileNotFoundError as e:
    raise ValueError(f"--teacher: {e}") from None
  variables = {"params": method.apply(state.params, state.cstate)}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return model, variables, meta


def prepare(paths: list[str], options: dict[str, Any], model: nn.Module, variables: dict,
            input_shape: tuple[int, ...]) -> dict[str, Any]:
  """Checks the teacher against the student and sizes the feature adapters.

  Raises:
    ValueError: no or an unusable ``--teacher``, another input shape or number of
      classes, a ``--features`` layer either model lacks, or matched features of
      different spatial shapes.
  """
  distill.check_options(options["temperature"], options["alpha"], options["feature_loss"],
                        options["feature_weight"], options["features"])
  if not options["teacher"]:
    raise ValueError("--method distill needs --teacher WORKDIR (a trained model)")
  teacher, t_vars, t_meta = _load_teacher(options["teacher"])
  if tuple(t_meta["input_shape"]) != tuple(input_shape):
    raise ValueError(f"--teacher {options['teacher']} takes inputs {tuple(t_meta['input_shape'])}, "
                     f"the student {tuple(input_shape)}")
  pairs = distill.parse_features(options["features"])
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


def load(steps: list[dict], mesh: Mesh | None = None) -> tuple[Distiller | None, dict | None]:
  """The distiller of the last ``distill`` step among ``steps`` (the plan steps this
  run trains) and the teacher's variables, replicated on ``mesh``; ``(None, None)``
  without one."""
  options = next((s["options"] for s in reversed(steps) if s["method"] == "distill"), None)
  if options is None:
    return None, None
  teacher, variables, _ = _load_teacher(options["teacher"], mesh)
  return Distiller(teacher, options["temperature"], options["alpha"],
                   tuple(distill.parse_features(options["features"])),
                   options["feature_loss"], options["feature_weight"]), variables


base.register("distill", *distill.OPTIONS, prepare=prepare, selects=False)(distill.method)
