"""Lowerings of a rewritten FX graph: eager (debugging, property tests), Inductor, TensorRT."""

from .registry import lower

__all__ = ["lower"]
