"""Model registry: a name -> constructor map over Flax linen modules.

Every model is called as ``model.apply(variables, x, train=bool)`` on NHWC float
images and returns logits. Submodules carry explicit names (``conv1``, ``fc2``):
parameter paths are public API that selectors match against.

>>> from jcompress import models
>>> m = models.create("lenet300", num_classes=10, input_shape=(28, 28, 1))
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import flax.linen as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_DEFAULTS: dict[str, dict[str, Any]] = {}
_RECIPES: dict[str, dict[str, Any]] = {}

# The training options a recipe may set (``jcompress train``'s flags, as TrainConfig fields).
RECIPE_KEYS = ("epochs", "lr", "optimizer", "momentum", "weight_decay", "schedule",
               "warmup_epochs")


def register(name: str, *, recipe: dict[str, Any] | None = None, **defaults: Any):
  """Registers a constructor ``f(num_classes, input_shape, **config) -> Module``.

  Args:
    name: the model's public name (``jcompress train --model NAME``).
    recipe: the training options (``RECIPE_KEYS``: ``epochs``, ``lr``, ...) that
      ``jcompress train`` uses for this model where they are not given; options it
      leaves out take the generic defaults (``TrainConfig``). None: no recipe.
    **defaults: preset configuration merged under the caller's options, so one
      constructor can serve several presets (``fcn-small``, ``fcn-large``).

  Raises:
    ValueError: ``name`` is taken, or ``recipe`` sets an option not in ``RECIPE_KEYS``.
  """
  unknown = sorted(set(recipe or {}) - set(RECIPE_KEYS))
  if unknown:
    raise ValueError(f"model {name!r}: a recipe sets only {', '.join(RECIPE_KEYS)}, not "
                     f"{', '.join(unknown)}")

  def wrap(fn):
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = fn
    _DEFAULTS[name] = dict(defaults)
    _RECIPES[name] = dict(recipe or {})
    return fn

  return wrap


def names() -> list[str]:
  return sorted(_REGISTRY)


def recipe(name: str) -> dict[str, Any]:
  """The training options model ``name`` was registered with (``{}``: none).

  >>> recipe("lenet5")
  {'epochs': 15, 'lr': 0.01, 'weight_decay': 0.0005}
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(names())}")
  return dict(_RECIPES[name])


def resolve_config(name: str, **config: Any) -> dict[str, Any]:
  """The preset defaults of ``name`` overridden by the non-None ``config``."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(names())}")
  accepted = [p for p in inspect.signature(_REGISTRY[name]).parameters
              if p not in ("num_classes", "input_shape")]
  unknown = sorted(set(config) - set(accepted))
  if unknown:
    raise ValueError(f"model {name!r} has no option {', '.join(unknown)}; its options: "
                     f"{', '.join(accepted) or 'none'}")
  merged = dict(_DEFAULTS[name])
  merged.update({k: v for k, v in config.items() if v is not None})
  return merged


def create(name: str, *, num_classes: int, input_shape: tuple[int, ...],
           **config: Any) -> nn.Module:
  """Builds model ``name`` for inputs of ``input_shape`` (no batch) and classes."""
  return _REGISTRY[name](num_classes=num_classes, input_shape=tuple(input_shape),
                         **resolve_config(name, **config))


from jcompress.models import lenet  # noqa: E402,F401  (registers its models)
from jcompress.models import (  # noqa: E402,F401  (registers the families)
    c3d, cnn, dsc, fcn, maxout, microbotnet, mobilenetv2, squeezenet)
