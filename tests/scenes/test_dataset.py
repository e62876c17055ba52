import re

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_compile.scenes import make_split, score_image, vocabulary
from flashu_compile.scenes.dataset import COLOURS


def test_splits_are_deterministic_and_disjoint():
    a, b = make_split("train", 200, seed=1), make_split("train", 200, seed=1)
    assert [s.key() for s in a] == [s.key() for s in b]
    assert [s.key() for s in make_split("train", 200, seed=2)] != [s.key() for s in a]
    test = make_split("test", 200, seed=1)
    assert not {s.key() for s in a} & {s.key() for s in test}
    assert len({s.key() for s in test}) == 200


def test_captions_and_answers_agree_with_pixels():
    for scene in make_split("test", 100, seed=3):
        img = scene.render()
        for obj in scene.objects:
            assert tuple(img[obj.cy, obj.cx]) == COLOURS[obj.colour]
        for question, answer in scene.qa:
            if question.startswith("what colour is the") and scene.kind != "count":
                assert answer == scene.objects[0].colour


def test_every_word_is_in_the_vocabulary():
    vocab = set(vocabulary())
    for scene in make_split("train", 300, seed=4):
        texts = [scene.caption] + [q for q, _ in scene.qa] + [a for _, a in scene.qa]
        for text in texts:
            assert set(re.findall(r"[a-z]+", text)) <= vocab, text


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000))
def test_any_render_scores_correct_against_itself(seed):
    scene = make_split("train", 1, seed=seed)[0]
    assert score_image(scene.render(), scene)["correct"]


def test_images_are_32x32_rgb():
    img = make_split("test", 1)[0].render()
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
