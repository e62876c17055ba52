"""Calibration: task-specific Wanda scores of the LLM's FFN neurons, saved as a :class:`Plan`.

``calibrate(model)`` runs real generation and understanding batches, scores every FFN neuron of
every decoder layer per task, and returns the keep sets; ``Plan.save`` / ``Plan.load`` store them
with a permutation-invariant fingerprint of the model they belong to. ``calibrate_lm(model, texts)``
does the same for any causal LM (or a vision-language model's LLM) from the caller's batches.
"""

from .lm import calibrate_lm
from .plan import Plan, PlanError, ffn_signature, model_fingerprint, specialization
from .report import draw_specialization, format_specialization
from .scores import calibrate

__all__ = [
    "Plan",
    "PlanError",
    "calibrate",
    "calibrate_lm",
    "draw_specialization",
    "ffn_signature",
    "format_specialization",
    "model_fingerprint",
    "specialization",
]
