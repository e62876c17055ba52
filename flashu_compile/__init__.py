"""flashu-compile: a task-aware torch.compile backend for unified multimodal models."""

# Importing the passes declares them into options.PASSES, which every option check reads.
from . import passes as passes
from .calibrate.lm import calibrate_lm
from .calibrate.plan import PlanError
from .graph.rewrite import StrictModeError
from .models.showo2 import Showo2, Showo2Config
from .runtime.request import auto_request as request

__all__ = ["PlanError", "Showo2", "Showo2Config", "StrictModeError", "calibrate_lm", "request"]
__version__ = "0.1.0"
