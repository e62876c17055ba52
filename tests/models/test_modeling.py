"""Showo2's task methods: their arguments are checked, and no image or question is silently misread."""

import numpy as np
import pytest
import torch

from flashu_compile.models.showo2 import Showo2


@pytest.fixture(scope="module")
def tiny():
    return Showo2.from_preset("tiny")


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_a_uint8_image_is_scaled_like_a_float_one(tiny, image):
    pixels = (image * 255).round().to(torch.uint8)
    torch.testing.assert_close(tiny.encode_image(pixels), tiny.encode_image(pixels.float() / 255))


@pytest.mark.parametrize("scale, offset", [(255.0, 0.0), (2.0, -1.0)])
def test_a_float_image_outside_0_1_is_refused(tiny, image, scale, offset):
    """0..255 floats (or [-1, 1]) used to be encoded as they were: a silently wrong answer."""
    with pytest.raises(ValueError, match=r"image values must be finite and in \[0, 1\]"):
        tiny.answer(image * scale + offset, "what colour is the circle?", max_new_tokens=2)


def test_a_non_finite_or_integer_image_is_refused(tiny, image):
    with pytest.raises(ValueError, match="finite and in"):
        tiny.encode_image(image.clone().index_fill_(1, torch.tensor([3]), float("nan")))
    with pytest.raises(ValueError, match="dtype torch.int64"):
        tiny.encode_image((image * 255).long())
    with pytest.raises(ValueError, match="a PIL image or a"):
        tiny.encode_image(np.zeros((3, 32, 32)))


@pytest.mark.parametrize("question", ["", "   ", None, 3])
def test_an_empty_or_missing_question_is_an_error(tiny, image, question):
    with pytest.raises(ValueError, match="question must"):
        tiny.answer(image, question, max_new_tokens=2)


@pytest.mark.parametrize("max_new_tokens", [0, -1, 2.0, True, "4", float("nan"), 10**9])
def test_max_new_tokens_is_checked(tiny, image, max_new_tokens):
    with pytest.raises(ValueError, match="max_new_tokens must be an int"):
        tiny.answer(image, "what colour is the circle?", max_new_tokens=max_new_tokens)


def test_generate_images_checks_its_numbers(tiny):
    for kwargs in ({"guidance": float("nan")}, {"guidance": float("inf")}, {"shift": float("nan")},
                   {"steps": 2.7}, {"seed": True}):
        name = next(iter(kwargs))
        with pytest.raises(ValueError, match=f"^{name} must be"):
            tiny.generate_images("a red circle", progress=False, **kwargs)
