"""Compression methods: pure functions over parameter pytrees, and their registry.

``METHODS`` holds every registered method (built-in, from installed packages'
``jcompress.methods`` entry points, ``$JCOMPRESS_PLUGINS`` and ``--plugin``),
loaded on first use; :func:`build` makes one bound to parameter paths.

>>> import jcompress.transforms as t
>>> {"binary", "distill", "prune", "qat", "quantize", "ttq", "tucker"} <= set(t.METHODS)
True
"""

from jcompress.transforms.base import Context, ExecutionMode, LossInputs, Method, Option, \
    bits_of, stack
from jcompress.transforms.registry import METHODS, MethodSpec, build, cli_options, ensure, \
    from_plan, load_plugin, plan_methods, plan_step, register, with_defaults

__all__ = ["Context", "ExecutionMode", "LossInputs", "METHODS", "Method", "MethodSpec",
           "Option", "bits_of", "build", "cli_options", "ensure", "from_plan", "load_plugin",
           "plan_methods", "plan_step", "register", "stack", "with_defaults"]
