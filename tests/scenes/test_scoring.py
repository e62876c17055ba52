import math
from dataclasses import replace as moved

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_compile.scenes import (
    Obj,
    Scene,
    find_objects,
    geneval_score,
    make_split,
    render,
    score_image,
    to_tensor,
    vqa_accuracy,
)
from flashu_compile.scenes.dataset import COLOURS, KINDS, SHAPES, SIZE
from flashu_compile.scenes.scoring import relations_between


@pytest.fixture(scope="module")
def scenes():
    return make_split("test", 240, seed=0)


def noisy(image: np.ndarray, rng: np.random.Generator, std: float = 0.05) -> np.ndarray:
    return np.clip(image / 255 + rng.normal(0, std, image.shape), 0, 1)


def test_ground_truth_renders_score_high(scenes):
    result = geneval_score([s.render() for s in scenes], scenes)
    assert result["correct"] >= 0.95
    assert all(result[f"correct/{kind}"] >= 0.95 for kind in KINDS)


def test_noisy_renders_still_score_high(scenes):
    rng = np.random.default_rng(0)
    assert geneval_score([noisy(s.render(), rng) for s in scenes], scenes)["correct"] >= 0.9


def test_mismatched_pairs_score_low(scenes):
    # Each image against the next scene with a different caption, i.e. a different prompt.
    others = [next(t for t in scenes[i + 1:] + scenes[:i] if t.caption != s.caption) for i, s in enumerate(scenes)]
    result = geneval_score([s.render() for s in scenes], others)
    assert result["correct"] <= 0.05
    assert result["binding"] <= 0.05


def test_blank_and_noise_only_images_fail_every_prompt(scenes):
    rng = np.random.default_rng(1)
    blank = np.zeros((SIZE, SIZE, 3), np.uint8)
    for s in scenes[:30]:
        for image in (blank, noisy(blank, rng)):
            result = score_image(image, s)
            assert not result["correct"] and not result["colour"] and not result["shape"]


RED_CIRCLE = Obj("circle", "red", 8, 16)
BLUE_SQUARE = Obj("square", "blue", 24, 16)
PROMPT = Scene((RED_CIRCLE, BLUE_SQUARE), "left of")


def score_drawn(*objects: Obj, prompt: Scene = PROMPT) -> dict:
    """Draw ``objects`` (bypassing Scene's grammar checks, as a generator would) and score them."""
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    for o in objects:
        image |= render(Scene((o,)))
    return score_image(image, prompt)


def test_the_right_image_passes_every_check():
    assert score_drawn(RED_CIRCLE, BLUE_SQUARE) == {"colour": True, "shape": True, "count": True, "binding": True,
                                                   "position": True, "correct": True}


def test_wrong_colour_fails_the_colour_check():
    result = score_drawn(moved(RED_CIRCLE, colour="green"), BLUE_SQUARE)
    assert not result["colour"] and result["shape"] and result["count"] and not result["correct"]


def test_wrong_shape_fails_the_shape_check():
    result = score_drawn(moved(RED_CIRCLE, shape="triangle"), BLUE_SQUARE)
    assert not result["shape"] and result["colour"] and result["count"] and not result["correct"]


def test_swapped_positions_fail_only_the_position_check():
    result = score_drawn(moved(RED_CIRCLE, cx=24), moved(BLUE_SQUARE, cx=8))
    assert result == {"colour": True, "shape": True, "count": True, "binding": True, "position": False,
                      "correct": False}


def test_position_holds_for_the_equivalent_opposite_statement():
    assert score_drawn(RED_CIRCLE, BLUE_SQUARE, prompt=Scene((BLUE_SQUARE, RED_CIRCLE), "right of"))["correct"]
    # Vertical stacking satisfies neither horizontal relation.
    result = score_drawn(moved(RED_CIRCLE, cx=16, cy=8), moved(BLUE_SQUARE, cx=16, cy=24))
    assert result["binding"] and not result["position"]


def test_wrong_count_fails_the_count_check():
    circles = [Obj("circle", "red", x, y) for x, y in ((8, 8), (24, 8), (8, 24))]
    two = Scene(tuple(circles[:2]))
    assert score_drawn(*circles[:2], prompt=two)["correct"]
    result = score_drawn(*circles, prompt=two)
    assert not result["count"] and result["colour"] and result["shape"] and result["position"] is None
    assert not score_drawn(circles[0], prompt=two)["count"]


def test_swapped_attributes_fail_the_binding_check():
    # A red square and a blue circle have the prompted colours and shapes, but not bound as prompted.
    result = score_drawn(moved(RED_CIRCLE, shape="square"), moved(BLUE_SQUARE, shape="circle"))
    assert result["colour"] and result["shape"] and result["count"]
    assert not result["binding"] and not result["position"] and not result["correct"]


def test_tiny_specks_are_not_objects():
    image = render(Scene((RED_CIRCLE,)))
    image[2:4, 28:30] = COLOURS["yellow"]  # a 2x2 speck
    assert [d.colour for d in find_objects(image)] == ["red"]


def test_detections_locate_and_measure_objects():
    image = render(Scene((Obj("square", "green", 10, 12, 8), Obj("square", "green", 22.5, 22.5, 11))))
    found = sorted(find_objects(image), key=lambda d: d.area)
    assert [(d.width, d.height, d.area) for d in found] == [(8, 8, 64), (11, 11, 121)]
    assert [(d.cx, d.cy) for d in found] == [(10, 12), (22.5, 22.5)]
    a, b = found
    assert relations_between(a, b) == {"left of", "above"} and relations_between(b, a) == {"right of", "below"}
    assert relations_between(a, a) == set()


def test_every_image_layout_and_range_is_accepted(scenes):
    s = next(s for s in scenes if s.kind == "relation")
    image = s.render()
    as_tensor = to_tensor(image)  # (3, H, W) in [-1, 1]
    for variant in (image, image / 255, image.transpose(2, 0, 1) / 255, as_tensor, as_tensor.numpy(),
                    (as_tensor + 1) / 2, as_tensor.bfloat16()):
        assert score_image(variant, s)["correct"]
    # Floats in [0, 255] need their range stated: read as [0, 1], a noisy dark background turns bright.
    in_0_255 = noisy(image, np.random.default_rng(0)) * 255
    assert not score_image(in_0_255, s)["correct"]
    assert score_image(in_0_255, s, value_range=(0, 255))["correct"]
    with pytest.raises(ValueError, match="RGB"):
        score_image(image[..., 0], s)


def test_geneval_score_reports_nan_for_checks_that_never_apply(scenes):
    singles = [s for s in scenes if s.kind == "single"][:5]
    result = geneval_score([s.render() for s in singles], singles)
    assert math.isnan(result["position"]) and math.isnan(result["correct/relation"])
    assert result["correct"] == 1.0
    with pytest.raises(ValueError, match="images for"):
        geneval_score([], singles)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(KINDS), noise=st.booleans())
def test_any_generated_scene_scores_correct_against_itself(seed, kind, noise):
    scene = make_split("train", 1, seed=seed, kinds=(kind,))[0]
    image = noisy(scene.render(), np.random.default_rng(seed)) if noise else scene.render()
    assert score_image(image, scene)["correct"]


@settings(max_examples=80, deadline=None)
@given(shape=st.sampled_from(SHAPES), colour=st.sampled_from(list(COLOURS)), size=st.integers(8, 12),
       x0=st.integers(0, SIZE - 12), y0=st.integers(0, SIZE - 12))
def test_any_single_object_is_detected_as_itself(shape, colour, size, x0, y0):
    obj = Obj(shape, colour, x0 + size / 2, y0 + size / 2, size)
    [found] = find_objects(render(Scene((obj,))))
    assert (found.colour, found.shape) == (colour, shape)
    # Circles and squares are symmetric about their centre; a triangle's mass sits low in its box.
    assert abs(found.cx - obj.cx) < 1e-9 and 0 <= found.cy - obj.cy < size / 4


def test_vqa_accuracy_normalises_case_punctuation_and_digits():
    qa = [("how many circles are there?", "two"), ("what colour is the square?", "red"),
          ("how many squares are there?", "zero"), ("is the red circle left of the blue square?", "yes"),
          ("what shape is the red object?", "circle")]
    assert vqa_accuracy(["2", " Red. ", "0", "YES!", "circle"], qa) == 1.0
    assert vqa_accuracy(["two", "red", "one", "no", "red circle"], qa) == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="5 questions"):
        vqa_accuracy(["red"], qa)
    with pytest.raises(ValueError, match="no questions"):
        vqa_accuracy([], [])


def test_overall_is_the_mean_of_per_kind_success_like_geneval(scenes):
    # One correct single-object image and three blank images for count prompts: a prompt-weighted
    # mean says 0.25, GenEval's mean over tasks says 0.5.
    single = next(s for s in scenes if s.kind == "single")
    counts = [s for s in scenes if s.kind == "count"][:3]
    blank = np.zeros((SIZE, SIZE, 3), np.uint8)
    result = geneval_score([single.render(), blank, blank, blank], [single, *counts])
    assert result["correct"] == 0.25 and result["correct/single"] == 1.0 and result["correct/count"] == 0.0
    assert result["overall"] == 0.5
    assert math.isnan(result["correct/relation"])  # absent kinds do not count as failures
