"""Probes of whether a model uses where things are, for telling "cannot place" from "cannot score".

    python -m research.scenes.probes MODEL_DIR

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
- ``relation_sensitivity``: no sampling at all. The model's one-step estimate of the clean image
  from pure noise (x0 + v at t = 0), averaged over noises, is its estimate of the mean image of
  the caption; the data's mean image of "A left of B" has A's colour well left of B's. The probe
  measures how far A's colour centroid moves against B's between "left of" and "right of" (and
  "above" and "below") in the model's mean, as a fraction of how far it moves in the data's:
  1 for a model that learned where the relation word puts objects, 0 for one that ignores it.
  Sampling cannot place objects by the relation if this is 0; if it is high and ``relation_swap``
  low, the sampler loses what the model knows.
- ``object_tiles_by_value_norm``: which image tokens V-norm token dropping removes. Each test
  scene's image tokens are ranked by the norm of their value vectors at an LLM layer (as the
  ``token_drop`` pass scores them); the probe gives the share of tiles holding part of an object
  among the highest-norm and the lowest-norm fraction, beside the share among all tiles. Where the
  highest-norm tokens are the objects, dropping them (the paper's order) loses the answers.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from flashu_compile.models.showo2.sequences import t2i_rows
from flashu_compile.scenes.dataset import (
    COLOURS,
    QUESTION_TYPES,
    SHAPES,
    make_split,
    question_type,
    scenes_of,
    to_tensor,
)
from flashu_compile.scenes.evaluate import vqa_items
from flashu_compile.scenes.scoring import colour_classes, normalise_answer

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


@torch.no_grad()
def object_tiles_by_value_norm(model, n_scenes: int = 40, layer: int = 2, share: float = 0.25,
                               seed: int = 0) -> dict[str, float]:
    """Share of object tiles (a 4x4 pixel tile, one image token, with any non-black pixel) among all image tokens
    (``all``), among the ``share`` of them with the highest value-vector norm at decoder layer ``layer`` (L2 over
    head_dim, mean over KV heads, as ``token_drop`` scores them; ``highest``) and among the ``share`` with the
    lowest (``lowest``), over ``n_scenes`` test scenes asked one question each."""
    from flashu_compile.models.showo2.understanding import prepare

    lm = model.showo.model
    heads = lm.config.num_key_value_heads
    shares: dict[str, list[float]] = defaultdict(list)
    values: list[torch.Tensor] = []
    hook = lm.layers[layer].self_attn.v_proj.register_forward_hook(lambda mod, args, out: values.append(out))
    try:
        prompts = []
        for scene in make_split("test", n_scenes, seed=seed):
            image = (to_tensor(scene.render()) + 1) / 2
            rows, embeds = prepare(model, model.tokenizer, model.encode_image(image), scene.qa[0][0])
            lm(inputs_embeds=embeds, attention_mask=rows.attention_mask)
            prompts.append((image, rows))
    finally:
        hook.remove()
    for (image, rows), value in zip(prompts, values, strict=True):
        positions = rows.image_positions()[0]
        norms = value[0, positions].unflatten(-1, (heads, -1)).norm(dim=-1).mean(-1)
        occupied = F.pixel_unshuffle(image[None], 4)[0].flatten(1).amax(0) > 0  # tile k is image token k
        if occupied.numel() != positions.numel():
            raise ValueError(f"{positions.numel()} image tokens for {occupied.numel()} tiles: not a 4x4-tile model")
        order = norms.argsort(descending=True)
        k = max(1, int(len(order) * share))
        shares["all"].append(occupied.float().mean().item())
        shares["highest"].append(occupied[order[:k]].float().mean().item())
        shares["lowest"].append(occupied[order[-k:]].float().mean().item())
    return {name: float(np.mean(values)) for name, values in shares.items()}


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


# Red, green and blue share no channel, so each one's weight below counts no other palette colour's pixels.
_EXCLUSIVE = ("red", "green", "blue")


def soft_centroid(image: torch.Tensor, colour: str) -> torch.Tensor:
    """(x, y) of a (3, H, W) image in [0, 1], each pixel weighted by how far it leans towards ``colour``
    (one of :data:`_EXCLUSIVE`): it works on mean images, whose pixels are mixtures and not palette colours."""
    if colour not in _EXCLUSIVE:
        raise ValueError(f"soft centroids are defined for {_EXCLUSIVE}, got {colour!r}")
    sign = torch.tensor(COLOURS[colour], dtype=image.dtype) / 127.5 - 1  # +1 on the colour's channel, -1 elsewhere
    weight = (image * sign[:, None, None]).sum(0).clamp(min=0)
    ys, xs = torch.meshgrid(torch.arange(image.shape[1], dtype=image.dtype),
                            torch.arange(image.shape[2], dtype=image.dtype), indexing="ij")
    return torch.stack([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum().clamp(min=1e-6)


def _object_pairs(n: int) -> list[tuple[str, str, str, str]]:
    """``(colour_a, shape_a, colour_b, shape_b)`` for up to ``n`` captions, in a fixed order."""
    combos = [(ca, sa, cb, sb) for ca, cb in itertools.permutations(_EXCLUSIVE, 2)
              for sa, sb in itertools.permutations(SHAPES, 2)]
    return combos[:n]


def data_mean_image(caption: str) -> torch.Tensor:
    """(3, H, W) in [0, 1]: the mean render of every scene (both splits) with this caption."""
    renders = [s.render() for s in scenes_of("relation") if s.caption == caption]
    if not renders:
        raise ValueError(f"no relation scene has the caption {caption!r}")
    return (to_tensor(np.stack(renders)).mean(0) + 1) / 2


@torch.no_grad()
def relation_sensitivity(model, n: int = 12, noises: int = 8, seed: int = 0) -> dict[str, float]:
    """Per axis, the fraction of the data's relation-driven centroid shift that the model's mean prediction at
    t = 0 reproduces, over ``n`` captions and ``noises`` noises (see the module doc)."""
    cfg = model.config
    noise = torch.randn(noises, cfg.image_latent_dim, *cfg.latent_size, generator=torch.Generator().manual_seed(seed))

    def model_mean(caption: str) -> torch.Tensor:
        rows = t2i_rows(model.tokenizer, [caption] * noises, cfg.num_image_tokens, cfg.max_text_len, guidance=False)
        v = model.denoise(rows.text_tokens, noise, torch.zeros(noises), rows.attention_mask, rows.modality_positions)
        return model.codec.decode(noise + v).mean(0)

    out = {}
    for axis, (first, second) in enumerate((("left of", "right of"), ("above", "below"))):
        moved = {"model": 0.0, "data": 0.0}
        for ca, sa, cb, sb in _object_pairs(n):
            for source, mean_image in (("model", model_mean), ("data", data_mean_image)):
                offsets = []
                for relation in (first, second):
                    image = mean_image(f"a {ca} {sa} {relation} a {cb} {sb}")
                    offsets.append(float(soft_centroid(image, ca)[axis] - soft_centroid(image, cb)[axis]))
                moved[source] += offsets[1] - offsets[0]
        out[f"{first}/{second}"] = moved["model"] / moved["data"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="checkpoint folder, 'default' or an embedded model's name (scenes-10)")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--only", choices=["layout", "value-norm"],
                        help="run one probe family: the layout probes, or object_tiles_by_value_norm (default: all)")
    args = parser.parse_args(argv)
    from flashu_compile.models.showo2 import Showo2
    from flashu_compile.models.showo2.embedded import EMBEDDED

    model = (Showo2.default() if args.model == "default" else Showo2.embedded(args.model) if args.model in EMBEDDED
             else Showo2.from_pretrained(args.model))
    found = {}
    if args.only in (None, "layout"):
        found.update(vqa_layout_sensitivity=vqa_layout_sensitivity(model, args.questions),
                     relation_swap=relation_swap(model, args.pairs), relation_sensitivity=relation_sensitivity(model))
    if args.only in (None, "value-norm"):
        found["object_tiles_by_value_norm"] = object_tiles_by_value_norm(model)
    print(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
