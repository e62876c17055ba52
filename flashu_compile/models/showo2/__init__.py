"""Show-o2 written on transformers parts, loading the official checkpoint layout."""

from .configuration import FlowHeadConfig, Showo2Config, custom_config, preset
from .modeling import Showo2

__all__ = ["FlowHeadConfig", "Showo2", "Showo2Config", "custom_config", "preset"]
