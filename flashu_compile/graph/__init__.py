"""Dynamo FX graphs below the passes: analysis (the structure index, module paths, the flow time and
conditioning inputs) and the FX utilities rewrites share (provenance tags, copies, outlining, specializing)."""

from .structure import PATTERNS, LayerRef, LinearRef, StructureIndex, build_index, module_path

__all__ = ["PATTERNS", "LayerRef", "LinearRef", "StructureIndex", "build_index", "module_path"]
