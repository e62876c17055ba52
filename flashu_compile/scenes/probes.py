"""Probes of whether a model uses where things are, for telling "cannot place" from "cannot score".

    python -m flashu_compile.scenes.probes MODEL_DIR

- ``vqa_layout_sensitivity``: VQA accuracy on the test scenes' own renders, and on the same
  renders with their 4x4 pixel tiles (one latent token each) shuffled. A model that reads the
  layout loses shape, count and position answers on shuffled tiles; a model that sees a bag of
  tiles answers the same.
- ``relation_swap``: each relation caption is drawn twice from the same noise, once as "A left of
  B" (or "above") and once as "A right of B" ("below"). The fraction of pairs where A's colour mass
  sits further in the stated direction in the first image than in the second is about 0.5 for a
  model that ignores the relation word (0 if it draws both captions identically: ties do not
  count as followed), 1.0 for one that follows it. Colour mass needs no shape to
  be recognised, so this isolates placement from shape quality.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import COLOURS, QUESTION_TYPES, make_split, question_type, to_tensor
from .evaluate import vqa_items
from .scoring import colour_classes, normalise_answer

_NAMES = tuple(COLOURS)


def shuffle_tiles(image: torch.Tensor, tile: int, generator: torch.Generator) -> torch.Tensor:
    """(3, H, W) with its ``tile`` x ``tile`` tiles in a random order: the same tiles, no layout."""
    tiles = F.pixel_unshuffle(image[None], tile)
    flat = tiles.flatten(2)
    order = torch.randperm(flat.shape[-1], generator=generator)
    return F.pixel_shuffle(flat[..., order].reshape(tiles.shape), tile)[0]


@torch.no_grad()
def vqa_layout_sensitivity(model, n_questions: int = 200, tile: int = 4, seed: int = 0) -> dict:
    items = vqa_items(make_split("test", n_questions, seed=seed), n_questions)
    gen = torch.Generator().manual_seed(seed)
    hits: dict[str, dict[str, list[bool]]] = {"original": defaultdict(list), "tiles shuffled": defaultdict(list)}
    for scene, question, answer in items:
        image = (to_tensor(scene.render()) + 1) / 2
        for name, shown in (("original", image), ("tiles shuffled", shuffle_tiles(image, tile, gen))):
            ok = normalise_answer(model.answer(shown, question, max_new_tokens=4)) == answer
            hits[name][question_type(question)].append(ok)
    return {name: {"all": float(np.mean([x for v in by.values() for x in v])),
                   **{k: float(np.mean(by[k])) for k in QUESTION_TYPES if by[k]}} for name, by in hits.items()}


def colour_centroid(image, colour: str) -> tuple[float, float] | None:
    """(x, y) mean of the pixels classified as ``colour``, or None if there are none."""
    ys, xs = np.nonzero(colour_classes(image) == _NAMES.index(colour))
    return (float(xs.mean()), float(ys.mean())) if len(xs) else None


@torch.no_grad()
def relation_swap(model, n: int = 20, steps: int = 50, guidance: float = 5.0, seed: int = 0) -> dict:
    scenes = make_split("test", n, seed=seed, kinds=("relation",))
    pairs = []
    for s in scenes:
        a, b = s.objects
        first, second = ("left of", "right of") if s.relation in ("left of", "right of") else ("above", "below")
        pairs.append((f"a {a.phrase()} {first} a {b.phrase()}", f"a {a.phrase()} {second} a {b.phrase()}",
                       0 if first == "left of" else 1, a.colour, b.colour))
    # The same seed gives each batch position the same noise in both calls.
    images = [model.generate_images([p[k] for p in pairs], steps=steps, guidance=guidance, seed=seed, progress=False)
              for k in (0, 1)]
    followed, measured = 0, 0
    for i, (_, _, axis, colour_a, colour_b) in enumerate(pairs):
        offsets = []
        for k in (0, 1):
            ca, cb = colour_centroid(images[k][i], colour_a), colour_centroid(images[k][i], colour_b)
            offsets.append(None if ca is None or cb is None else ca[axis] - cb[axis])
        if None in offsets:
            continue
        measured += 1
        followed += offsets[0] < offsets[1]  # A further left (up) when told "left of" ("above")
    return {"pairs": len(pairs), "measured": measured, "followed": followed / measured if measured else float("nan")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="checkpoint folder, or 'default'")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=20)
    args = parser.parse_args(argv)
    from flashu_compile.models.showo2 import Showo2

    model = Showo2.default() if args.model == "default" else Showo2.from_pretrained(args.model)
    print(json.dumps({"vqa_layout_sensitivity": vqa_layout_sensitivity(model, args.questions),
                      "relation_swap": relation_swap(model, args.pairs)}, indent=1))


if __name__ == "__main__":
    main()
