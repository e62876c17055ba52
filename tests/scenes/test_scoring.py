import numpy as np
import pytest

from flashu_compile.scenes import Obj, Scene, geneval_score, render, score_image, vqa_accuracy
from flashu_compile.scenes.dataset import make_split


@pytest.fixture(scope="module")
def test_scenes():
    return make_split("test", 200, seed=0)


def test_ground_truth_renders_score_high(test_scenes):
    assert geneval_score([s.render() for s in test_scenes], test_scenes)["correct"] >= 0.95


def test_noisy_renders_still_score_high(test_scenes):
    rng = np.random.default_rng(0)
    noisy = [np.clip(s.render() / 255 + rng.normal(0, 0.05, (32, 32, 3)), 0, 1) for s in test_scenes]
    assert geneval_score(noisy, test_scenes)["correct"] >= 0.9


def test_mismatched_pairs_score_low(test_scenes):
    shifted = [s.render() for s in test_scenes[1:] + test_scenes[:1]]
    assert geneval_score(shifted, test_scenes)["correct"] <= 0.1


def pair(a, b, relation="left of"):
    return Scene((a, b), "pair", relation)


def test_each_check_fails_on_its_own_defect():
    red_circle, blue_square = Obj("circle", "red", 9, 16), Obj("square", "blue", 23, 16)
    scene = pair(red_circle, blue_square)
    assert score_image(render((red_circle, blue_square)), scene)["correct"]
    wrong_colour = score_image(render((Obj("circle", "green", 9, 16), blue_square)), scene)
    assert not wrong_colour["colour"] and not wrong_colour["correct"]
    wrong_shape = score_image(render((Obj("triangle", "red", 9, 16), blue_square)), scene)
    assert wrong_shape["colour"] and not wrong_shape["shape"]
    swapped = score_image(render((Obj("circle", "red", 23, 16), Obj("square", "blue", 9, 16))), scene)
    assert swapped["shape"] and not swapped["position"]
    extra = score_image(render((red_circle, blue_square, Obj("circle", "red", 16, 28))), scene)
    assert not extra["count"]
    blank = score_image(np.zeros((32, 32, 3), np.uint8), scene)
    assert not any(blank.values())


def test_float_and_chw_inputs_are_accepted():
    obj = Obj("triangle", "yellow", 16, 16)
    scene = Scene((obj,), "single")
    img = render((obj,))
    assert score_image(img.astype(np.float32) / 255, scene)["correct"]
    assert score_image((img.transpose(2, 0, 1) / 127.5 - 1).astype(np.float32), scene)["correct"]


def test_vqa_accuracy_normalises():
    qa = [("q1", "two"), ("q2", "red"), ("q3", "yes")]
    assert vqa_accuracy(["2", "Red.", "no"], qa) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="3 questions"):
        vqa_accuracy(["red"], qa)
