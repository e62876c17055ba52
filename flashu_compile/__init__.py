"""flashu-compile: a task-aware torch.compile backend for unified multimodal models.

Importing the package loads the compiler only (options, passes, runtime); the Show-o2 model and
transformers load when a name that needs them is first used, so dynamo's loading of the
``flashu`` backend stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

# Importing the passes declares them into options.PASSES, which every option check reads.
from . import passes as passes
from .graph.rewrite import StrictModeError
from .runtime.request import auto_request as request
from .runtime.summary import summary

# Public names whose modules import transformers or the backend, by the module that defines them.
_LAZY = {"Showo2": "flashu_compile.models.showo2", "Showo2Config": "flashu_compile.models.showo2",
         "calibrate_lm": "flashu_compile.calibrate.lm", "PlanError": "flashu_compile.calibrate.plan",
         "compile_tasks": "flashu_compile.tasks", "sampler_rules": "flashu_compile.backend"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flashu_compile' has no attribute {name!r}")


__all__ = ["PlanError", "Showo2", "Showo2Config", "StrictModeError", "calibrate_lm", "compile_tasks", "request",
           "sampler_rules", "summary"]
__version__ = "0.1.0"
