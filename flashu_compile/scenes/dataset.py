"""A seeded synthetic dataset of coloured shapes with captions and question/answer pairs.

Images are 32x32 RGB on black. A scene is one of three kinds:

- ``single``: one object, "a red circle";
- ``relation``: two objects in a stated relation, "a red circle left of a blue square";
- ``count``: two or three copies of one object, "two green triangles" (a count of one is ``single``).

Objects are filled circles, squares and triangles of 8-12 px in pure red, green, blue or yellow.
The grammar is small on purpose: a model of a few million parameters trained on a CPU can learn
it, and simple image analysis (:mod:`flashu_compile.scenes.scoring`) can check it, so the quality
numbers of a model trained on it mean something.

Layouts are chosen so that everything said about a scene is unambiguous: objects' bounding boxes
are at least ``GAP`` pixels apart (so same-coloured copies stay separate connected components),
and the two objects of a relation are separated along the relation's axis and nearly aligned
along the other one (so "left of" is never also "above"). The two objects of a relation differ in
colour and in shape, so "the circle" and "the blue object" each name exactly one of them.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

SIZE = 32
SHAPES = ("circle", "square", "triangle")
# Pure, saturated colours: they sit far apart in chromaticity, so pixel classification is trivial
# on renders and still easy on the blurry output of a small generator.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
}
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
KINDS = ("single", "relation", "count")
SPLITS = ("train", "test")
NUMBER_WORDS = ("zero", "one", "two", "three")
MIN_OBJECT_SIZE, MAX_OBJECT_SIZE = 8, 12
MAX_COUNT = 3
MARGIN = 1  # keeps objects off the border, where a generator's edge artefacts live
GAP = 2  # minimum pixels between two objects' bounding boxes
MAX_CROSS_OFFSET = 3.0  # in a relation, largest centre offset across the relation's axis
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Obj:
    """One filled shape. ``(cx, cy)`` is the centre in pixel units, x to the right and y downwards,
    with pixel ``(row, col)`` covering ``[col, col + 1) x [row, row + 1)``; ``size`` is the side of
    its bounding box (a circle's diameter, a triangle's base and height)."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: int = 10

    @property
    def centre(self) -> tuple[float, float]:
        return (self.cx, self.cy)

    def box(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)``: every pixel of the object has its centre inside this box."""
        half = self.size / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)

    def phrase(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Objects and what is said about them; ``relation`` (if any) is "objects[0] <relation> objects[1]".

    Captions and question/answer pairs are functions of the scene alone (the questions' random
    choices are seeded by a hash of the scene), so a scene is fully described by its fields.
    """

    objects: tuple[Obj, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= MAX_COUNT:
            raise ValueError(f"a scene has 1 to {MAX_COUNT} objects, got {len(self.objects)}")
        for o in self.objects:
            if o.shape not in SHAPES or o.colour not in COLOURS:
                raise ValueError(f"unknown shape or colour in {o}")
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"unknown relation {self.relation!r}; expected one of {RELATIONS}")
            objs = self.objects
            if len(objs) != 2 or len({o.colour for o in objs}) != 2 or len({o.shape for o in objs}) != 2:
                raise ValueError("a relation links two objects of different colours and different shapes")
        elif len({(o.shape, o.colour) for o in self.objects}) != 1:
            raise ValueError("without a relation, all objects must be copies of one shape and colour")

    @property
    def kind(self) -> str:
        if self.relation is not None:
            return "relation"
        return "single" if len(self.objects) == 1 else "count"

    @property
    def caption(self) -> str:
        first = self.objects[0]
        if self.kind == "relation":
            return f"a {first.phrase()} {self.relation} a {self.objects[1].phrase()}"
        if self.kind == "count":
            return f"{NUMBER_WORDS[len(self.objects)]} {first.phrase()}s"
        return f"a {first.phrase()}"

    def key(self) -> str:
        """Canonical text of caption and layout: equal keys mean identical scenes and images."""
        parts = [f"{o.shape},{o.colour},{o.cx:g},{o.cy:g},{o.size}" for o in self.objects]
        if self.relation is None:
            parts.sort()  # copies of one object are interchangeable
        return f"{self.caption}|{';'.join(parts)}"

    @cached_property
    def qa(self) -> tuple[tuple[str, str], ...]:
        return questions(self)

    def render(self) -> np.ndarray:
        return render(self)


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def questions(scene: Scene) -> tuple[tuple[str, str], ...]:
    """Question/answer pairs with single-word answers.

    Every scene gets a colour and a shape question per distinct object and one count question;
    relation scenes also get a yes/no question. Its answer is "yes" or "no" with equal probability, and the
    question names the objects in either order, so neither the answer nor the word order can be
    guessed from the caption alone. The count question asks about a shape that is absent half of
    the time, so "zero" is not rare and "one" is not a safe guess.
    """
    rng = random.Random(_digest("qa|" + scene.key()))
    qa = []
    if scene.kind == "count":
        o = scene.objects[0]
        qa += [(f"what colour are the {o.shape}s?", o.colour), (f"what shape are the {o.colour} objects?", o.shape)]
    else:
        for o in scene.objects:
            qa += [(f"what colour is the {o.shape}?", o.colour), (f"what shape is the {o.colour} object?", o.shape)]
    present = sorted({o.shape for o in scene.objects})
    absent = [s for s in SHAPES if s not in present]
    asked = rng.choice(present if rng.random() < 0.5 else absent)
    qa.append((f"how many {asked}s are there?", NUMBER_WORDS[sum(o.shape == asked for o in scene.objects)]))
    if scene.relation is not None:
        a, b = scene.objects
        truth = rng.random() < 0.5
        relation = scene.relation if truth else OPPOSITE[scene.relation]
        if rng.random() < 0.5:  # "B <opposite> A" states the same fact as "A <relation> B"
            a, b, relation = b, a, OPPOSITE[relation]
        qa.append((f"is the {a.phrase()} {relation} the {b.phrase()}?", "yes" if truth else "no"))
    return tuple(qa)


QUESTION_TYPES = ("colour", "shape", "count", "relation")


def question_type(question: str) -> str:
    """Which of :data:`QUESTION_TYPES` a question from :func:`questions` is."""
    for prefix, kind in (("what colour", "colour"), ("what shape", "shape"), ("how many", "count"),
                         ("is the", "relation")):
        if question.startswith(prefix):
            return kind
    raise ValueError(f"not a scenes question: {question!r}")


def _mask(o: Obj, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Pixels whose centres fall inside the shape: no anti-aliasing, so renders are exact.

    Boundaries are half-open, so an object of size ``s`` spans at most ``s`` pixels whatever its
    offset (a closed boundary gives off-grid circles one-pixel tips).
    """
    half = o.size / 2
    dx, dy = xs - o.cx, ys - o.cy
    if o.shape == "circle":
        return dx * dx + dy * dy < half * half
    if o.shape == "square":
        return (dx >= -half) & (dx < half) & (dy >= -half) & (dy < half)
    # Upright isosceles triangle: apex at the top of the box, base along its bottom edge.
    depth = dy + half
    return (depth >= 0) & (depth < o.size) & (np.abs(dx) < depth / 2)


def render(scene: Scene) -> np.ndarray:
    """The scene as a (32, 32, 3) uint8 image on black; deterministic."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    for o in scene.objects:
        image[_mask(o, xs, ys)] = COLOURS[o.colour]
    return image


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1], the models' pixel convention."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1).movedim(-1, -3)


def _apart(a: Obj, b: Obj) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return max(bx0 - ax1, ax0 - bx1) >= GAP or max(by0 - ay1, ay0 - by1) >= GAP


def _corner(rng: random.Random, size: int) -> int:
    return rng.randint(MARGIN, SIZE - MARGIN - size)


def _size(rng: random.Random) -> int:
    return rng.randint(MIN_OBJECT_SIZE, MAX_OBJECT_SIZE)


def _single(rng: random.Random) -> Scene:
    s = _size(rng)
    o = Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), _corner(rng, s) + s / 2, _corner(rng, s) + s / 2, s)
    return Scene((o,))


def _count(rng: random.Random) -> Scene:
    shape, colour, n = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.randint(2, MAX_COUNT)
    # Rejection sampling: three 12 px objects fit in 30x30 in many ways, so this ends in a few tries.
    while True:
        sizes = [_size(rng) for _ in range(n)]
        objs = [Obj(shape, colour, _corner(rng, s) + s / 2, _corner(rng, s) + s / 2, s) for s in sizes]
        if all(_apart(a, b) for i, a in enumerate(objs) for b in objs[i + 1:]):
            return Scene(tuple(sorted(objs, key=lambda o: (o.cy, o.cx))))


def _relation(rng: random.Random) -> Scene:
    relation = rng.choice(RELATIONS)
    colour_a, colour_b = rng.sample(list(COLOURS), 2)
    shape_a, shape_b = rng.sample(SHAPES, 2)
    size_a, size_b = _size(rng), _size(rng)
    # Lay out along x as "first left of second", then mirror/transpose into the drawn relation.
    first, second = (size_a, size_b) if relation in ("left of", "above") else (size_b, size_a)
    gap = rng.randint(GAP, SIZE - 2 * MARGIN - first - second)
    start = rng.randint(MARGIN, SIZE - MARGIN - first - gap - second)
    along = (start + first / 2, start + first + gap + second / 2)
    across_first = _corner(rng, first) + first / 2
    nearly_aligned = [c + second / 2 for c in range(MARGIN, SIZE - MARGIN - second + 1)
                      if abs(c + second / 2 - across_first) <= MAX_CROSS_OFFSET]
    centres = [(along[0], across_first), (along[1], rng.choice(nearly_aligned))]
    if relation in ("above", "below"):
        centres = [(y, x) for x, y in centres]
    if relation in ("right of", "below"):
        centres.reverse()
    (ax, ay), (bx, by) = centres
    return Scene((Obj(shape_a, colour_a, ax, ay, size_a), Obj(shape_b, colour_b, bx, by, size_b)), relation)


_SAMPLERS = {"single": _single, "relation": _relation, "count": _count}


def random_scene(rng: random.Random, kinds: Sequence[str] = KINDS) -> Scene:
    """One scene of a kind drawn uniformly from ``kinds`` (repeat a kind to weight it)."""
    return _SAMPLERS[rng.choice(kinds)](rng)


def split_of(scene: Scene) -> str:
    """"train" or "test", fixed by a hash of the scene's caption and layout.

    Why a hash rather than two seeds: the split is a property of the scene itself, so no seed,
    sample count or kind mix can put the same scene (and so the same image) in both splits. About
    ``TEST_FRACTION`` of all possible scenes are test scenes. Captions do recur across splits
    (there are only 324 of them); test scenes are new layouts of them.
    """
    return "test" if _digest("split|" + scene.key()) < TEST_FRACTION * 2**64 else "train"


def make_split(split: str, n: int, seed: int = 0, *, kinds: Sequence[str] = KINDS) -> list[Scene]:
    """``n`` distinct scenes of ``split`` ("train" or "test"), deterministic for ``seed``.

    Scenes are drawn from a stream seeded by ``(split, seed)`` and kept when :func:`split_of`
    assigns them to ``split``; a shorter list is a prefix of a longer one with the same seed.
    ``kinds`` restricts the mix, e.g. ``("single", "relation")`` for one or two objects only.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty selection of {KINDS}, got {kinds!r}")
    rng = random.Random(f"scenes|{split}|{seed}")
    out, seen = [], set()
    while len(out) < n:
        scene = random_scene(rng, kinds)
        key = scene.key()
        if split_of(scene) == split and key not in seen:
            seen.add(key)
            out.append(scene)
    return out


def vocabulary() -> list[str]:
    """Every word that captions, questions and answers use, in a fixed order, for word-level
    tokenizers (punctuation such as "?" is left to the tokenizer)."""
    words = ["a", "the", "is", "are", "there", "what", "colour", "shape", "object", "objects", "how", "many",
             "yes", "no", "left", "right", "of", "above", "below", *NUMBER_WORDS, *COLOURS, *SHAPES]
    return words + [f"{s}s" for s in SHAPES]
