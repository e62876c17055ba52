"""Scorers: GenEval-like checks of generated scene images by image analysis, and VQA accuracy.

GenEval checks a generated image with an object detector; here the world is simple enough for a
few lines of image analysis to play the detector. Pixels that are bright and saturated enough are
labelled with the nearest palette colour, same-coloured pixels are grouped into 4-connected
components, tiny components are dropped as noise, and each remaining component is classified as
the shape whose ideal outline, drawn in the component's bounding box, overlaps it best.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .dataset import COLOURS, KINDS, NUMBER_WORDS, Scene

# Black is (0, 0, 0) and the palette is fully saturated; these thresholds sit far from both, so
# background noise and dark or greyish smudges are not mistaken for objects.
MIN_BRIGHTNESS = 0.4
MIN_SATURATION = 0.5
MIN_AREA_FRACTION = 8 / 1024  # the smallest rendered object covers about 30 of 1024 pixels
# GenEval's position rule: shrink the centre offset by this fraction of the two boxes' summed
# extent, then require the shrunk offset to point within ~60 degrees of the relation's direction.
POSITION_SHRINK = 0.1
POSITION_COSINE = 0.5
CHECKS = ("colour", "shape", "count", "binding", "position")

_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _NAMES], dtype=np.float64) / 255


@dataclass(frozen=True)
class Detection:
    """A connected component of one palette colour: centroid and box in the scenes' pixel units."""

    colour: str
    shape: str
    cx: float
    cy: float
    width: int
    height: int
    area: int


def to_unit_rgb(image, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Any image layout the project produces as float64 (H, W, 3) in [0, 1].

    Accepts numpy arrays, torch tensors and PIL images, HWC or CHW. uint8 is read as [0, 255];
    floats as ``value_range``, or when that is None as [-1, 1] if any value is negative (the
    models' pixel convention, where black is -1) and as [0, 1] otherwise (a decoder's output).
    """
    if hasattr(image, "detach"):
        image = image.detach().cpu()
        # numpy has no bfloat16, and half-precision decoder outputs are common.
        image = (image.float() if image.is_floating_point() else image).numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] != 3 and arr.shape[0] == 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected one RGB image (H, W, 3) or (3, H, W), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255
    arr = arr.astype(np.float64)
    low, high = value_range if value_range is not None else ((-1.0, 1.0) if arr.min() < 0 else (0.0, 1.0))
    return np.clip((arr - low) / (high - low), 0, 1)


def _components(classes: np.ndarray) -> np.ndarray:
    """Labels of 4-connected components of equal non-negative class (-1 is background).

    Each pixel starts labelled with its own flat index and repeatedly takes the smallest label
    among same-class neighbours; after each pass every label also jumps to its target's label
    (as union-find's path compression does), so the loop ends after a handful of passes.
    """
    h, w = classes.shape
    fg = classes >= 0
    down = fg[:-1] & (classes[:-1] == classes[1:])
    right = fg[:, :-1] & (classes[:, :-1] == classes[:, 1:])
    labels = np.arange(h * w).reshape(h, w)
    while True:
        new = labels.copy()
        new[:-1] = np.where(down, np.minimum(new[:-1], labels[1:]), new[:-1])
        new[1:] = np.where(down, np.minimum(new[1:], labels[:-1]), new[1:])
        new[:, :-1] = np.where(right, np.minimum(new[:, :-1], labels[:, 1:]), new[:, :-1])
        new[:, 1:] = np.where(right, np.minimum(new[:, 1:], labels[:, :-1]), new[:, 1:])
        new = new.ravel()[new]
        if np.array_equal(new, labels):
            return np.where(fg, labels, -1)
        labels = new


def _shape_of(component: np.ndarray) -> str:
    """The shape whose ideal outline in the component's bounding box has the highest IoU with it.

    The IoU with the square outline is the fill ratio (square 1, circle ~pi/4, triangle ~1/2); the
    other two outlines add where the pixels are, which the fill ratio alone cannot see: a
    pixelated circle can fill 0.94 of its box, yet its corners are empty, and a blurred square
    loses its corners but keeps its straight sides.
    """
    h, w = component.shape
    v, u = np.mgrid[0:h, 0:w] + 0.5
    u, v = 2 * u / w - 1, 2 * v / h - 1  # [-1, 1] across the box, v downwards
    outlines = {"circle": u * u + v * v <= 1, "square": np.ones((h, w), dtype=bool),
                "triangle": np.abs(u) <= (v + 1) / 2}
    iou = {name: (component & o).sum() / (component | o).sum() for name, o in outlines.items()}
    return max(iou, key=iou.get)


def colour_classes(image, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """(H, W) int: each pixel's palette colour, as an index into ``COLOURS``, or -1 for background."""
    rgb = to_unit_rgb(image, value_range)
    brightness = rgb.max(-1)
    saturation = (brightness - rgb.min(-1)) / np.maximum(brightness, 1e-6)
    # Divide out brightness so a dim or slightly washed-out red is still nearest to red.
    chroma = rgb / np.maximum(brightness, 1e-6)[..., None]
    nearest = ((chroma[..., None, :] - _PALETTE) ** 2).sum(-1).argmin(-1)
    return np.where((brightness >= MIN_BRIGHTNESS) & (saturation >= MIN_SATURATION), nearest, -1)


def find_objects(image, value_range: tuple[float, float] | None = None) -> list[Detection]:
    """Palette-coloured objects in an image (any layout :func:`to_unit_rgb` accepts)."""
    classes = colour_classes(image, value_range)
    labels = _components(classes)
    min_area = max(1, round(MIN_AREA_FRACTION * labels.size))
    found = []
    for label in np.unique(labels[labels >= 0]):
        mask = labels == label
        ys, xs = np.nonzero(mask)
        if len(ys) < min_area:
            continue
        component = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        height, width = component.shape
        colour = _NAMES[classes[ys[0], xs[0]]]
        found.append(Detection(colour, _shape_of(component), float(xs.mean() + 0.5), float(ys.mean() + 0.5),
                               width, height, len(ys)))
    return found


def relations_between(a: Detection, b: Detection) -> set[str]:
    """The relations "a <relation> b" that hold, by GenEval's rule on centroids and box sizes."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    norm = math.hypot(dx, dy)
    if norm == 0:
        return set()
    # Shrinking by a tenth of the boxes' summed extent keeps nearly aligned objects from also
    # counting as above/below (or left/right) of each other.
    sx = math.copysign(max(abs(dx) - POSITION_SHRINK * (a.width + b.width), 0.0), dx) / norm
    sy = math.copysign(max(abs(dy) - POSITION_SHRINK * (a.height + b.height), 0.0), dy) / norm
    held = {"left of": sx < -POSITION_COSINE, "right of": sx > POSITION_COSINE,
            "above": sy < -POSITION_COSINE, "below": sy > POSITION_COSINE}
    return {name for name, holds in held.items() if holds}


def _largest(found: list[Detection], colour: str, shape: str) -> Detection | None:
    matches = [d for d in found if d.colour == colour and d.shape == shape]
    return max(matches, key=lambda d: d.area, default=None)


def score_image(image, scene: Scene, value_range: tuple[float, float] | None = None) -> dict[str, bool | None]:
    """GenEval-style checks of one generated image against the scene its prompt described.

    - ``colour``: every prompted colour is among the detected objects';
    - ``shape``: every prompted shape is among the detected objects';
    - ``count``: exactly as many objects are detected as were prompted (stricter than GenEval,
      which only counts exactly for counting prompts: in this world an extra object is an error);
    - ``binding``: the detected (colour, shape) pairs are exactly the prompted ones, so a blue
      circle and a red square do not pass for a red circle and a blue square;
    - ``position``: for relation prompts, the relation holds between the largest detections of
      the two objects; None for other prompts, which say nothing about position;
    - ``correct``: all applicable checks pass (GenEval's per-prompt success).
    """
    found = find_objects(image, value_range)
    wanted = [(o.colour, o.shape) for o in scene.objects]
    result: dict[str, bool | None] = {
        "colour": {c for c, _ in wanted} <= {d.colour for d in found},
        "shape": {s for _, s in wanted} <= {d.shape for d in found},
        "count": len(found) == len(wanted),
        "binding": Counter((d.colour, d.shape) for d in found) == Counter(wanted),
        "position": None,
    }
    if scene.relation is not None:
        a, b = (_largest(found, *pair) for pair in wanted)
        result["position"] = a is not None and b is not None and scene.relation in relations_between(a, b)
    result["correct"] = all(v for v in result.values() if v is not None)
    return result


def geneval_score(images: Sequence, scenes: Sequence[Scene],
                  value_range: tuple[float, float] | None = None) -> dict[str, float]:
    """Accuracy of each check over the prompts it applies to, and three views of per-prompt success.

    - ``correct``: the fraction of prompts whose every applicable check passes (micro average);
    - ``correct/<kind>``: the same over the prompts of one scene kind (GenEval's per-task score);
    - ``overall``: the mean of ``correct/<kind>`` over the kinds present, which is how GenEval's
      "Overall" is formed (the mean of its task scores), so a prompt mix that happens to hold more
      of an easy kind does not raise it. This is the headline number.

    A check that applies to no prompt is NaN.
    """
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    if not scenes:
        raise ValueError("no images to score")
    results = [score_image(image, scene, value_range) for image, scene in zip(images, scenes, strict=True)]

    def mean(values: list[bool | None]) -> float:
        applicable = [v for v in values if v is not None]
        return float(np.mean(applicable)) if applicable else math.nan

    summary = {check: mean([r[check] for r in results]) for check in (*CHECKS, "correct")}
    for kind in KINDS:
        summary[f"correct/{kind}"] = mean([r["correct"] for r, s in zip(results, scenes, strict=True)
                                           if s.kind == kind])
    summary["overall"] = float(np.mean([summary[f"correct/{kind}"] for kind in KINDS
                                        if any(s.kind == kind for s in scenes)]))
    return summary


_DIGITS = {str(i): word for i, word in enumerate(NUMBER_WORDS)}


def normalise_answer(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed, digits as number words ("2" -> "two")."""
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return " ".join(_DIGITS.get(w, w) for w in words)


def vqa_accuracy(predicted_answers: Sequence[str], qa_pairs: Sequence[tuple[str, str]]) -> float:
    """Fraction of predictions equal to the reference answer after :func:`normalise_answer`."""
    if len(predicted_answers) != len(qa_pairs):
        raise ValueError(f"{len(predicted_answers)} predictions for {len(qa_pairs)} questions")
    if not qa_pairs:
        raise ValueError("no questions to score")
    hits = [normalise_answer(p) == normalise_answer(a) for p, (_, a) in zip(predicted_answers, qa_pairs, strict=True)]
    return float(np.mean(hits))
