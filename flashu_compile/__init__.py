"""flashu-compile: a task-aware torch.compile backend for unified multimodal models."""

from .models.showo2 import Showo2, Showo2Config

__all__ = ["Showo2", "Showo2Config"]
__version__ = "0.1.0"
