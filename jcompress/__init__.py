"""jcompress: compress neural networks in pure JAX.

``jcompress.build(name, paths, **options)`` makes a compression method for any
Flax param tree (see README); submodules (``jcompress.cost``, ``jcompress.export``,
``jcompress.transforms``...) load on first use.
"""

import importlib
from typing import Any

_LAZY = {"build": ("jcompress.transforms.registry", "build"),
         "stack": ("jcompress.transforms.base", "stack"),
         "METHODS": ("jcompress.transforms.registry", "METHODS")}


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
  try:
    return importlib.import_module(f"jcompress.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"jcompress.{name}":
      raise
    raise AttributeError(f"module 'jcompress' has no attribute {name!r}") from None


__all__ = ["build", "stack", "METHODS"]
