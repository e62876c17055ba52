"""Read-only analysis of dynamo FX graphs."""

from .structure import PATTERNS, LayerRef, LinearRef, StructureIndex, build_index, module_path

__all__ = ["PATTERNS", "LayerRef", "LinearRef", "StructureIndex", "build_index", "module_path"]
