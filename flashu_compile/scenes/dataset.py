"""A seeded synthetic dataset of coloured shapes with captions and question/answer pairs.

Images are 32x32 RGB on black. A scene is one of three kinds:

- ``single``: one object, "a red circle";
- ``relation``: two objects in a stated relation, "a red circle left of a blue square";
- ``count``: two or three copies of one object, "two green triangles" (a count of one is ``single``).

Objects are filled circles, squares and triangles of 8 px in pure red, green, blue or yellow, each
centred in one cell of a 3x3 grid. The world is small on purpose: a model of a few million
parameters trained for half an hour on a CPU can learn it, and simple image analysis
(:mod:`flashu_compile.scenes.scoring`) can check it, so the quality numbers of a model trained on
it mean something. (Free positions and sizes made every 4x4 latent token a different fragment of
an edge; a model trained for the same time drew blobs.)

Layouts are chosen so that everything said about a scene is unambiguous: objects in neighbouring
cells are ``GAP`` pixels apart (so same-coloured copies stay separate connected components), the
two objects of a relation share a row ("left of", "right of") or a column ("above", "below"), and
they differ in colour and in shape, so "the circle" and "the blue object" each name exactly one of
them. There are 4,140 scenes in all (108 single, 2,592 relation, 1,440 count).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, cached_property

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
SPLITS = ("train", "validation", "test")
NUMBER_WORDS = ("zero", "one", "two", "three")
OBJECT_SIZE = 8
MAX_COUNT = 3
# Cell centres along either axis: 8 px objects there keep 2 px from the border, where a generator's
# edge artefacts live, and 2 px from each other.
CELLS = (6.0, 16.0, 26.0)
GAP = 2  # pixels between the bounding boxes of objects in neighbouring cells
TEST_FRACTION = 0.2
# Layouts for tuning inference settings (step counts, presets) without reading the test split. Carved from what
# was training data, so the test split (and every score measured on it) is unchanged.
VALIDATION_FRACTION = 0.1


@dataclass(frozen=True)
class Obj:
    """One filled shape. ``(cx, cy)`` is the centre in pixel units, x to the right and y downwards,
    with pixel ``(row, col)`` covering ``[col, col + 1) x [row, row + 1)``; ``size`` is the side of
    its bounding box (a circle's diameter, a triangle's base and height)."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: int = OBJECT_SIZE

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

    def in_reading_order(self) -> Scene:
        """The same image stated with the subject first in reading order: "B right of A" becomes "A left of B"
        and "B below A" becomes "A above B"; other scenes are returned as they are."""
        if self.relation in ("right of", "below"):
            return Scene(self.objects[::-1], OPPOSITE[self.relation])
        return self

    def layout(self) -> str:
        """Canonical text of the objects alone: equal layouts mean identical images, whatever the caption
        ("A left of B" and "B right of A" in the same cells are one image)."""
        return ";".join(sorted(f"{o.shape},{o.colour},{o.cx:g},{o.cy:g},{o.size}" for o in self.objects))

    def key(self) -> str:
        """Canonical text of caption and layout: equal keys mean identical scenes."""
        return f"{self.caption}|{self.layout()}"

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


def _grid() -> list[tuple[float, float]]:
    return [(x, y) for y in CELLS for x in CELLS]


def _singles() -> list[Scene]:
    return [Scene((Obj(shape, colour, x, y),)) for shape in SHAPES for colour in COLOURS for x, y in _grid()]


def _counts() -> list[Scene]:
    # Copies are listed top to bottom, then left to right, so each set of cells is one scene.
    return [Scene(tuple(Obj(shape, colour, x, y) for x, y in sorted(cells, key=lambda c: (c[1], c[0]))))
            for shape in SHAPES for colour in COLOURS for n in range(2, MAX_COUNT + 1)
            for cells in itertools.combinations(_grid(), n)]


def _relations() -> list[Scene]:
    out = []
    for relation in RELATIONS:
        for (colour_a, colour_b), (shape_a, shape_b) in itertools.product(
                itertools.permutations(COLOURS, 2), itertools.permutations(SHAPES, 2)):
            for line in CELLS:
                for near, far in itertools.combinations(CELLS, 2):
                    # objects[0] is the subject: nearer the left/top edge for "left of"/"above".
                    first, second = (near, far) if relation in ("left of", "above") else (far, near)
                    if relation in ("left of", "right of"):
                        centres = ((first, line), (second, line))
                    else:
                        centres = ((line, first), (line, second))
                    (ax, ay), (bx, by) = centres
                    out.append(Scene((Obj(shape_a, colour_a, ax, ay), Obj(shape_b, colour_b, bx, by)), relation))
    return out


@cache
def scenes_of(kind: str) -> tuple[Scene, ...]:
    """Every scene of one of :data:`KINDS`, in a fixed order."""
    builders = {"single": _singles, "relation": _relations, "count": _counts}
    if kind not in builders:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return tuple(builders[kind]())


def random_scene(rng: random.Random, kinds: Sequence[str] = KINDS) -> Scene:
    """A kind drawn uniformly from ``kinds`` (repeat a kind to weight it), then one of its scenes."""
    return rng.choice(scenes_of(rng.choice(kinds)))


def draw(split: str, rng: random.Random, kinds: Sequence[str] = KINDS) -> Scene:
    """One scene of ``split``, drawn as :func:`random_scene` draws; repeats are allowed (training streams)."""
    while split_of(scene := random_scene(rng, kinds)) != split:
        pass
    return scene


def split_of(scene: Scene) -> str:
    """"train", "validation" or "test", fixed by a hash of the scene's layout.

    Why a hash rather than two seeds: the split is a property of the scene itself, so no seed,
    sample count or kind mix can put the same scene in two splits; and hashing the layout rather
    than the caption keeps the two captions of one relation image in one split, so no test image
    is a training image. About ``TEST_FRACTION`` of all possible layouts are test layouts and
    ``VALIDATION_FRACTION`` validation layouts. Captions do recur across splits (there are only 324
    of them); test scenes are new layouts of them, and new combinations of shape, colour and cell.
    Weights trained before the validation split existed (the shipped ones) saw its layouts as
    training data: on them, validation scores compare settings, they do not measure generalisation.
    """
    digest = _digest("split|" + scene.layout())
    if digest < TEST_FRACTION * 2**64:
        return "test"
    return "validation" if digest < (TEST_FRACTION + VALIDATION_FRACTION) * 2**64 else "train"


def make_split(split: str, n: int, seed: int = 0, *, kinds: Sequence[str] = KINDS) -> list[Scene]:
    """``n`` distinct scenes of ``split`` (one of :data:`SPLITS`), deterministic for ``seed``.

    Scenes are drawn from a stream seeded by ``(split, seed)`` and kept when :func:`split_of`
    assigns them to ``split``; a shorter list is a prefix of a longer one with the same seed.
    ``kinds`` restricts the mix, e.g. ``("single", "relation")`` for one or two objects only.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty selection of {KINDS}, got {kinds!r}")
    available = sum(split_of(scene) == split for kind in set(kinds) for scene in scenes_of(kind))
    if n > available:
        raise ValueError(f"the {split} split has {available} scenes of kinds {tuple(kinds)}; {n} were asked for")
    rng = random.Random(f"scenes|{split}|{seed}")
    out, seen = [], set()
    while len(out) < n:
        scene = draw(split, rng, kinds)
        key = scene.key()
        if key not in seen:
            seen.add(key)
            out.append(scene)
    return out
