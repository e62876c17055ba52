"""Synthetic coloured-shape scenes: the data the embedded model is trained on, and its scorers."""

from .dataset import Obj, Scene, make_split, render, split_of, to_tensor
from .scoring import Detection, find_objects, geneval_score, score_image, vqa_accuracy

__all__ = ["Detection", "Obj", "Scene", "find_objects", "geneval_score", "make_split", "render", "score_image",
           "split_of", "to_tensor", "vqa_accuracy"]
