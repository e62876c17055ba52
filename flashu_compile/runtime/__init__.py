"""Per-request step state read by the compiled program's guards (step index, phase, skip set, head cache)."""

from .flops import FlopTally, counted
from .request import Request, current_request, request
from .schedule import StepRules, guidance_scales

__all__ = ["FlopTally", "Request", "counted", "StepRules", "current_request", "guidance_scales", "request"]
