"""The layout probes tell a model that reads (or draws) layout from one that does not."""

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flashu_compile.models.showo2.codecs import PixelUnshuffleCodec
from flashu_compile.models.showo2.tokenizer import SceneTokenizer
from flashu_compile.scenes import Obj, Scene, make_split, to_tensor
from research.scenes.probes import (
    colour_centroid,
    data_mean_image,
    object_tiles_by_value_norm,
    relation_sensitivity,
    relation_swap,
    shuffle_tiles,
    soft_centroid,
    vqa_layout_sensitivity,
)


def tiles_of(image: torch.Tensor) -> list[bytes]:
    t = torch.nn.functional.pixel_unshuffle(image[None], 4)[0].flatten(1).T
    return sorted(row.numpy().tobytes() for row in t)


class Reader:
    """Answers about the test scene whose render it is shown: matched pixel for pixel (reads the
    layout), or by the multiset of 4x4 tiles only (a bag of tiles)."""

    def __init__(self, bag: bool):
        self.bag = bag
        self.scenes = make_split("test", 200, seed=0)
        self.images = [(to_tensor(s.render()) + 1) / 2 for s in self.scenes]

    def answer(self, image, question, max_new_tokens):
        same = (lambda a, b: tiles_of(a) == tiles_of(b)) if self.bag else torch.equal
        for s, im in zip(self.scenes, self.images, strict=True):
            if question in dict(s.qa) and same(image, im):
                return dict(s.qa)[question]
        return "?"


def test_shuffled_tiles_are_the_same_tiles_elsewhere():
    image = (to_tensor(make_split("test", 1, seed=0)[0].render()) + 1) / 2
    shuffled = shuffle_tiles(image, 4, torch.Generator().manual_seed(0))
    assert tiles_of(shuffled) == tiles_of(image) and not torch.equal(shuffled, image)


def test_layout_sensitivity_separates_a_layout_reader_from_a_bag_of_tiles():
    reader = vqa_layout_sensitivity(Reader(bag=False), n_questions=30)
    bag = vqa_layout_sensitivity(Reader(bag=True), n_questions=30)
    assert reader["original"]["all"] == bag["original"]["all"] == 1.0
    assert reader["tiles shuffled"]["all"] < 0.1
    assert bag["tiles shuffled"]["all"] == 1.0


CAPTION = re.compile(r"a (\w+) (\w+) (left of|right of|above|below) a (\w+) (\w+)")


class Painter:
    """Draws relation captions: A 12 px from B in the stated direction, or (``follows=False``)
    always in the same place whatever the relation says."""

    def __init__(self, follows: bool):
        self.follows = follows

    def generate_images(self, prompts, steps, guidance, seed, progress):
        out = []
        for p in prompts:
            ca, sa, rel, cb, sb = CAPTION.fullmatch(p).groups()
            dx, dy = {"left of": (-12, 0), "right of": (12, 0), "above": (0, -12), "below": (0, 12)}[rel] \
                if self.follows else (-12, 0)
            a, b = Obj(sa, ca, 16 + dx / 2, 16 + dy / 2), Obj(sb, cb, 16 - dx / 2, 16 - dy / 2)
            out.append((to_tensor(Scene((a, b), rel).render()) + 1) / 2)
        return torch.stack(out)


def test_relation_swap_separates_a_painter_that_follows_relations_from_one_that_does_not():
    assert relation_swap(Painter(follows=True), n=12) == {"pairs": 12, "measured": 12, "followed": 1.0}
    assert relation_swap(Painter(follows=False), n=12)["followed"] == 0.0


def test_colour_centroid():
    image = Scene((Obj("square", "red", 8, 20, 8),)).render()
    assert colour_centroid(image, "red") == (7.5, 19.5)  # pixel indices, not pixel-centre units
    assert colour_centroid(image, "blue") is None
    assert np.isclose(colour_centroid((to_tensor(image) + 1) / 2, "red")[0], 7.5)


class MeanPredictor:
    """Predicts, from any noise, the data's mean image of its caption (a model that learned the conditional
    mean), or (``ignores_relation``) the mean image of the caption with "left of" or "above" whatever it says."""

    def __init__(self, ignores_relation: bool):
        self.ignores_relation = ignores_relation
        self.tokenizer = SceneTokenizer()
        self.codec = PixelUnshuffleCodec(4)
        self.config = SimpleNamespace(image_latent_dim=48, latent_size=(8, 8), num_image_tokens=64, max_text_len=12)

    def denoise(self, text_tokens, noise, t, attention_mask, modality_positions):
        assert bool((t == 0).all())
        targets = []
        for row in text_tokens.tolist():
            caption = self.tokenizer.decode(row)
            if self.ignores_relation:
                caption = caption.replace("right of", "left of").replace("below", "above")
            targets.append(self.codec.encode(data_mean_image(caption)[None] * 2 - 1)[0])
        return torch.stack(targets) - noise


def test_relation_sensitivity_is_one_for_the_conditional_mean_and_zero_without_the_relation_word():
    learned = relation_sensitivity(MeanPredictor(ignores_relation=False), n=3, noises=2)
    assert learned.keys() == {"left of/right of", "above/below"}
    assert all(abs(v - 1) < 1e-4 for v in learned.values())
    ignored = relation_sensitivity(MeanPredictor(ignores_relation=True), n=3, noises=2)
    assert all(abs(v) < 1e-4 for v in ignored.values())


def test_soft_centroid_follows_the_colour_and_refuses_shared_channels():
    scene = Scene((Obj("square", "red", 8, 20, 8), Obj("circle", "blue", 26, 6, 8)), "left of")
    image = (to_tensor(scene.render()) + 1) / 2
    assert torch.allclose(soft_centroid(image, "red"), torch.tensor([7.5, 19.5]))
    with pytest.raises(ValueError, match="soft centroids"):
        soft_centroid(image, "yellow")


def test_object_tiles_by_value_norm_counts_the_tiles_that_hold_objects():
    """``all`` is the share of 4x4 tiles with a non-black pixel, counted here from the renders; ranked shares
    over every token are that share again, and the highest and lowest quarters split the objects between them."""
    from flashu_compile.models.showo2 import Showo2

    model = Showo2.default()
    scenes = make_split("test", 6)
    expected = np.mean([(s.render().reshape(8, 4, 8, 4, 3).max(axis=(1, 3, 4)) > 0).mean() for s in scenes])
    whole = object_tiles_by_value_norm(model, n_scenes=6, share=1.0)
    assert whole["all"] == pytest.approx(expected) and whole["highest"] == whole["lowest"] == pytest.approx(expected)
    quarter = object_tiles_by_value_norm(model, n_scenes=6, share=0.25)
    assert quarter["all"] == pytest.approx(expected)
    assert 0 <= quarter["lowest"] <= 1 and 0 <= quarter["highest"] <= 1 and quarter["highest"] != quarter["lowest"]
