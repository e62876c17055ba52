"""A seeded synthetic dataset of coloured shapes with captions and question/answer pairs.

Images are 32x32 RGB on black: one object, two objects in a stated relation, or two or three
copies of one object. The grammar is small on purpose, so that a model of a few million
parameters trained on a CPU can learn it, and so that simple image analysis can check it.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import numpy as np

SIZE = 32
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {1: "one", 2: "two", 3: "three"}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
OBJECT_SIZE = 10  # side of the bounding box; clear gaps between slots keep relations unambiguous


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cx: int  # centre, pixels
    cy: int


@dataclass
class Scene:
    """Objects plus what is said about them. ``relation`` links objects[0] to objects[1]."""

    objects: tuple[Obj, ...]
    kind: str  # "single" | "pair" | "count"
    relation: str | None = None
    caption: str = ""
    qa: list[tuple[str, str]] = field(default_factory=list)

    def key(self) -> str:
        layout = ";".join(f"{o.shape},{o.colour},{o.cx},{o.cy}" for o in self.objects)
        return f"{self.kind}|{self.relation}|{layout}"

    def render(self) -> np.ndarray:
        """(32, 32, 3) uint8, deterministic."""
        return render(self.objects)


def _shape_mask(shape: str, cx: int, cy: int) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    half = OBJECT_SIZE / 2
    dx, dy = xx - cx + 0.5, yy - cy + 0.5
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half - 0.5) & (np.abs(dy) <= half - 0.5)
    # Upright isosceles triangle filling the box: width grows linearly from apex to base.
    rel = (dy + half) / (2 * half)  # 0 at the apex row, 1 at the base
    return (rel >= 0) & (rel <= 1) & (np.abs(dx) <= rel * half)


def render(objects: tuple[Obj, ...]) -> np.ndarray:
    img = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    for o in objects:
        img[_shape_mask(o.shape, o.cx, o.cy)] = COLOURS[o.colour]
    return img


def to_tensor(image: np.ndarray):
    """uint8 (H, W, 3) -> float tensor (3, H, W) in [-1, 1], the models' input convention."""
    import torch

    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1


def _phrase(o: Obj) -> str:
    return f"a {o.colour} {o.shape}"


def _jitter(rng: random.Random) -> int:
    return rng.randint(-2, 2)


def _pair(rng: random.Random) -> Scene:
    a_shape, b_shape = rng.choice(SHAPES), rng.choice(SHAPES)
    a_col, b_col = rng.sample(list(COLOURS), 2)  # distinct colours name each object unambiguously
    relation = rng.choice(RELATIONS)
    near, far = 9, 23
    across = 16 + _jitter(rng)
    first, second = (near, far) if relation in ("left of", "above") else (far, near)
    if relation in ("left of", "right of"):
        a = Obj(a_shape, a_col, first + _jitter(rng), across)
        b = Obj(b_shape, b_col, second + _jitter(rng), across + _jitter(rng))
    else:
        a = Obj(a_shape, a_col, across, first + _jitter(rng))
        b = Obj(b_shape, b_col, across + _jitter(rng), second + _jitter(rng))
    caption = f"{_phrase(a)} {relation} {_phrase(b)}"
    truth = rng.random() < 0.5
    asked = relation if truth else {"left of": "right of", "right of": "left of",
                                    "above": "below", "below": "above"}[relation]
    qa = [
        (f"what colour is the {a.shape}?" if a.shape != b.shape else f"what colour is the {a.shape} {relation} "
         f"the {b.colour} {b.shape}?", a.colour),
        (f"what shape is the {b.colour} object?", b.shape),
        (f"is the {a.colour} {a.shape} {asked} the {b.colour} {b.shape}?", "yes" if truth else "no"),
    ]
    return Scene((a, b), "pair", relation, caption, qa)


def _single(rng: random.Random) -> Scene:
    o = Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.randint(8, 24), rng.randint(8, 24))
    qa = [(f"what colour is the {o.shape}?", o.colour), (f"what shape is the {o.colour} object?", o.shape),
          (f"how many {PLURAL[o.shape]} are there?", "one")]
    return Scene((o,), "single", None, _phrase(o), qa)


def _count(rng: random.Random) -> Scene:
    shape, colour, n = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice((2, 3))
    slots = [(9, 9), (23, 9), (9, 23), (23, 23)]
    chosen = rng.sample(slots, n)
    objs = tuple(Obj(shape, colour, x + _jitter(rng), y + _jitter(rng)) for x, y in sorted(chosen))
    qa = [(f"how many {PLURAL[shape]} are there?", NUMBERS[n]), (f"what colour are the {PLURAL[shape]}?", colour)]
    return Scene(objs, "count", None, f"{NUMBERS[n]} {colour} {PLURAL[shape]}", qa)


def random_scene(rng: random.Random) -> Scene:
    kind = rng.choices(("single", "pair", "count"), weights=(3, 5, 2))[0]
    return {"single": _single, "pair": _pair, "count": _count}[kind](rng)


def split_of(scene: Scene) -> str:
    """Train/test by a hash of the layout: a scene lands in one split whatever seed drew it,
    so the two splits never share a scene (captions recur; exact images do not)."""
    digest = hashlib.sha256(scene.key().encode()).digest()
    return "test" if digest[0] % 10 == 0 else "train"


def make_split(split: str, n: int, seed: int = 0) -> list[Scene]:
    """``n`` distinct scenes of ``split`` ("train" or "test"), deterministic for ``seed``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"scenes-{seed}")
    out, seen = [], set()
    while len(out) < n:
        scene = random_scene(rng)
        if split_of(scene) == split and scene.key() not in seen:
            seen.add(scene.key())
            out.append(scene)
    return out


def vocabulary() -> list[str]:
    """Every word captions, questions and answers use (for word-level tokenizers)."""
    words = ["a", "the", "is", "are", "there", "what", "colour", "shape", "object", "how", "many", "yes", "no",
             "left", "right", "of", "above", "below"]
    words += list(COLOURS) + list(SHAPES) + list(PLURAL.values()) + list(NUMBERS.values())
    return list(dict.fromkeys(words))
