"""Scorers: GenEval-like checks of generated scenes by image analysis, and VQA accuracy.

An image is segmented by nearest palette colour, split into connected components, and each
component classified by how much of its bounding box it fills (square ~1, circle ~pi/4,
triangle ~1/2). A prompt counts as correct when colour, shape, count and position all hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .dataset import COLOURS, NUMBERS, Scene

MIN_PIXELS = 12  # smaller blobs are noise, not objects (a rendered object covers ~50-100 pixels)
MAX_COLOUR_DISTANCE = 90.0


@dataclass(frozen=True)
class Blob:
    colour: str
    shape: str
    cx: float
    cy: float
    pixels: int


def _as_uint8(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32)
        if arr.min() < 0:
            arr = (arr + 1) / 2
        arr = np.clip(arr * 255 + 0.5, 0, 255).astype(np.uint8)
    return arr


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, comp = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(comp)
    return out


def _shape_of(comp: list[tuple[int, int]]) -> str:
    ys, xs = np.array(comp).T
    fill = len(comp) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"


def find_objects(image) -> list[Blob]:
    """Palette-coloured blobs in an image (uint8 HxWx3, or float in [0,1] / [-1,1], HWC or CHW)."""
    arr = _as_uint8(image).astype(np.float32)
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float32)
    dist = np.linalg.norm(arr[:, :, None, :] - palette[None, None], axis=-1)
    nearest = dist.argmin(-1)
    close = dist.min(-1) <= MAX_COLOUR_DISTANCE
    blobs = []
    for i, name in enumerate(names):
        for comp in _components(close & (nearest == i)):
            if len(comp) >= MIN_PIXELS:
                ys, xs = np.array(comp).T
                blobs.append(Blob(name, _shape_of(comp), float(xs.mean()), float(ys.mean()), len(comp)))
    return blobs


def _relation_holds(a: Blob, b: Blob, relation: str) -> bool:
    margin = 3.0
    return {"left of": b.cx - a.cx > margin, "right of": a.cx - b.cx > margin,
            "above": b.cy - a.cy > margin, "below": a.cy - b.cy > margin}[relation]


def score_image(image, scene: Scene) -> dict[str, bool]:
    """Per-check results for one generated image against the scene its prompt described."""
    blobs = find_objects(image)
    wanted = [(o.colour, o.shape) for o in scene.objects]
    colour = all(any(b.colour == c for b in blobs) for c, _ in wanted)
    shape = all(any(b.colour == c and b.shape == s for b in blobs) for c, s in wanted)
    count = len(blobs) == len(wanted) and all(
        sum(b.colour == c and b.shape == s for b in blobs) == wanted.count((c, s)) for c, s in set(wanted))
    position = True
    if scene.relation is not None:
        a = [b for b in blobs if b.colour == scene.objects[0].colour]
        b = [b for b in blobs if b.colour == scene.objects[1].colour]
        position = len(a) == 1 and len(b) == 1 and _relation_holds(a[0], b[0], scene.relation)
    return {"colour": colour, "shape": shape, "count": count, "position": position,
            "correct": colour and shape and count and position}


def geneval_score(images, scenes: list[Scene]) -> dict[str, float]:
    """Mean of each check over prompts; ``correct`` is the GenEval-style overall score."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    results = [score_image(img, sc) for img, sc in zip(images, scenes)]
    return {k: float(np.mean([r[k] for r in results])) for k in results[0]}


_WORDS_FOR_DIGITS = {str(k): v for k, v in NUMBERS.items()}


def normalise_answer(text: str) -> str:
    words = re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()
    return " ".join(_WORDS_FOR_DIGITS.get(w, w) for w in words)


def vqa_accuracy(predicted: list[str], qa_pairs: list[tuple[str, str]]) -> float:
    """Normalised exact match between predicted answers and the reference answers."""
    if len(predicted) != len(qa_pairs):
        raise ValueError(f"{len(predicted)} predictions for {len(qa_pairs)} questions")
    if not qa_pairs:
        raise ValueError("no questions to score")
    hits = [normalise_answer(p) == normalise_answer(a) for p, (_, a) in zip(predicted, qa_pairs)]
    return float(np.mean(hits))
