"""Compression transforms: pure functions over parameter pytrees, and the
registry of methods that ``jcompress compress --method NAME`` uses.

Importing this package registers every built-in method.
"""

from jcompress.transforms.base import METHODS, Method, MethodSpec, Option, build, \
    from_plan, plan_methods, register, stack
from jcompress.transforms import prune, quantize, ternary, tucker  # noqa: E402,F401  (register methods)


def all_options() -> dict[Option, list[str]]:
  """Every command-line method option with the methods that take it (``--bits``:
  quantize, qat); hidden options (filled in by ``prepare``) are left out."""
  found: dict[str, Option] = {}
  owners: dict[str, list[str]] = {}
  for spec in METHODS.values():
    for option in spec.options:
      if option.hidden:
        continue
      if option.name in found and found[option.name] != option:
        raise ValueError(f"option --{option.name} is defined differently by "
                         f"{owners[option.name][0]} and {spec.name}")
      found.setdefault(option.name, option)
      owners.setdefault(option.name, []).append(spec.name)
  return {found[name]: owners[name] for name in sorted(found)}


__all__ = ["METHODS", "Method", "MethodSpec", "Option", "all_options", "build", "from_plan",
           "plan_methods", "register", "stack"]
