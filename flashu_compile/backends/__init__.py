"""Lowerings of a rewritten FX graph: eager (debugging, property tests), Inductor, TensorRT."""

from .segmented import lower

__all__ = ["lower"]
