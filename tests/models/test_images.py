"""Image inputs: every PIL mode and tensor dtype is either read as the picture it holds or refused by name."""

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.images import to_pixels

# Every mode Pillow 13 knows.
MODES = ["1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr", "LAB", "HSV",
         "I", "I;16", "I;16B", "I;16L", "I;16N", "F"]


@pytest.fixture(scope="module")
def tiny():
    return Showo2.from_preset("tiny")


@pytest.fixture(scope="module")
def rgb8():
    """(H, W, 3) uint8 covering the full 0..255 range."""
    return np.random.default_rng(0).integers(0, 256, size=(9, 7, 3), dtype=np.uint8)


def pixels_of(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32) / 255).permute(2, 0, 1)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_a_16_bit_image_gives_the_pixels_of_its_8_bit_version(rgb8, mode):
    """``convert("RGB")`` clipped 16-bit values to 255: nearly every pixel came out white."""
    gray8 = rgb8[..., 0]
    gray16 = gray8.astype(np.uint32) * 257  # 255 * 257 = 65535: the same levels at 16 bits
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
    image16 = Image.frombytes(mode, (gray8.shape[1], gray8.shape[0]), gray16.astype(dtype).tobytes())
    expected = to_pixels(Image.fromarray(gray8, "L"))
    torch.testing.assert_close(to_pixels(image16), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(expected, pixels_of(np.repeat(gray8[..., None], 3, axis=-1)), rtol=0, atol=1e-6)


def test_a_16_bit_tensor_is_scaled_by_65535(rgb8):
    pixels16 = torch.from_numpy(rgb8.astype(np.int32) * 257).permute(2, 0, 1).to(torch.uint16)
    torch.testing.assert_close(to_pixels(pixels16), pixels_of(rgb8), rtol=0, atol=1e-6)


def test_a_32_bit_image_beyond_16_bits_and_a_float_image_are_refused():
    with pytest.raises(ValueError, match=r"PIL mode 'I'.*\[0, 70000\].*0\.\.65535"):
        to_pixels(Image.frombytes("I", (2, 1), np.array([0, 70000], "<i4").tobytes()))
    with pytest.raises(ValueError, match="PIL mode 'F'"):
        to_pixels(Image.new("F", (3, 3), 0.5))


def test_transparency_is_composited_on_white():
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 255, 128]]], dtype=np.uint8)
    out = to_pixels(Image.fromarray(rgba, "RGBA"))
    a = 128 / 255
    expected = torch.tensor([[1.0, 1.0, 1 - a], [0.0, 1.0, 1 - a], [0.0, 1.0, 1.0]])[:, None]
    torch.testing.assert_close(out, expected)
    # LA, and the premultiplied modes (colour already times alpha), say the same.
    gray = np.array([[[0, 255], [0, 0], [200, 128]]], dtype=np.uint8)
    torch.testing.assert_close(to_pixels(Image.fromarray(gray, "LA")),
                               torch.tensor([0.0, 1.0, 200 / 255 * a + 1 - a]).expand(3, 1, 3))
    premultiplied = np.array([[[0, 255], [0, 0], [100, 128]]], dtype=np.uint8)
    torch.testing.assert_close(to_pixels(Image.frombytes("La", (3, 1), premultiplied.tobytes())),
                               torch.tensor([0.0, 1.0, 100 / 255 + 1 - a]).expand(3, 1, 3))
    # A colour key (PNG tRNS) makes its pixels transparent, at 8 and at 16 bits.
    keyed = Image.fromarray(np.array([[7, 9]], dtype=np.uint8), "L")
    keyed.info["transparency"] = 7
    torch.testing.assert_close(to_pixels(keyed), torch.tensor([1.0, 9 / 255]).expand(3, 1, 2))
    keyed16 = Image.frombytes("I;16", (2, 1), np.array([7, 900], "<u2").tobytes())
    keyed16.info["transparency"] = 7
    torch.testing.assert_close(to_pixels(keyed16), torch.tensor([1.0, 900 / 65535]).expand(3, 1, 2))


def test_a_palette_is_expanded_with_its_transparency():
    image = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), "P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    torch.testing.assert_close(to_pixels(image), torch.eye(3)[:, None])
    image.info["transparency"] = 1  # index 1 (green) is transparent
    torch.testing.assert_close(to_pixels(image), torch.tensor([[1.0, 1, 0], [0, 1, 0], [0, 1, 1]])[:, None])
    # An RGBA palette (alpha per entry) is honoured too; convert("RGB") drops it.
    image = Image.fromarray(np.array([[0]], dtype=np.uint8), "P")
    image.putpalette([0, 0, 0, 0], rawmode="RGBA")
    torch.testing.assert_close(to_pixels(image), torch.ones(3, 1, 1))


@pytest.mark.parametrize("mode", ["1", "L", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"])
def test_other_colour_spaces_convert_to_the_same_rgb(rgb8, mode):
    """Through Pillow's own conversions: a round trip RGB -> mode -> pixels gives the RGB back (within the
    rounding of the 8-bit colour spaces; "1" and "L" keep only black/white and grey)."""
    rgb = Image.fromarray(rgb8, "RGB")
    if mode == "LAB":
        from PIL import ImageCms

        transform = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB",
                                            "LAB")
        image = ImageCms.applyTransform(rgb, transform)
    else:
        image = rgb.convert(mode)
    expected = pixels_of(np.asarray(image.convert("RGB")))
    if mode in ("1", "L"):
        expected = pixels_of(np.repeat(np.asarray(image.convert("L"))[..., None], 3, axis=-1))
    torch.testing.assert_close(to_pixels(image), expected, rtol=0, atol=1e-6)
    if mode not in ("1", "L"):
        # 8-bit LAB keeps a and b in whole units: a dark channel of a saturated colour moves by up to ~17 levels.
        tolerance = (20 if mode == "LAB" else 8) / 255
        torch.testing.assert_close(to_pixels(image), pixels_of(rgb8), rtol=0, atol=tolerance)


def test_integer_tensors_need_a_known_range_and_bool_is_refused(rgb8):
    pixels = torch.from_numpy(rgb8).permute(2, 0, 1)
    torch.testing.assert_close(to_pixels(pixels), pixels_of(rgb8))
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint32, torch.bool, torch.complex64):
        with pytest.raises(ValueError, match=f"dtype {dtype}"):
            to_pixels(pixels.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_float_tensors_in_0_1_are_taken_as_they_are(dtype):
    pixels = torch.rand(3, 5, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = to_pixels(pixels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, pixels.float(), rtol=0, atol=0)


def test_grayscale_tensors_are_expanded_to_three_channels():
    gray = torch.rand(5, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(to_pixels(gray), gray.expand(3, 5, 4))
    torch.testing.assert_close(to_pixels(gray[None]), gray.expand(3, 5, 4))
    for shape in [(2, 5, 4), (4, 5, 4), (1, 3, 5, 4), (5, 4, 3), (7,)]:
        with pytest.raises(ValueError, match=re.escape(f"shape {shape}")):
            to_pixels(torch.rand(shape))


@pytest.mark.parametrize("shape", [(3, 0, 4), (3, 4, 0), (0, 4, 4), (0, 0), (1, 0, 0)])
def test_an_empty_tensor_is_refused_naming_its_size(tiny, shape):
    """It used to reach F.interpolate and fail there with torch's internal RuntimeError."""
    with pytest.raises(ValueError, match=r"no pixels.*at least 1 x 1"):
        tiny.encode_image(torch.zeros(shape))


def test_an_empty_pil_image_is_refused_naming_its_size():
    with pytest.raises(ValueError, match=r"no pixels: 0 x 5 \(height x width\).*at least 1 x 1"):
        to_pixels(Image.new("RGB", (5, 0)))


def test_encode_image_reads_a_16_bit_image_like_its_8_bit_version(tiny, rgb8):
    gray8 = rgb8[..., 1]
    image16 = Image.frombytes("I;16", (gray8.shape[1], gray8.shape[0]), (gray8.astype("<u2") * 257).tobytes())
    torch.testing.assert_close(tiny.encode_image(image16), tiny.encode_image(Image.fromarray(gray8, "L")))


def random_image(mode: str, width: int, height: int, data: bytes) -> Image.Image:
    """A ``mode`` image of random bytes; a palette image gets a random palette, sometimes with a transparent
    index."""
    size = len(Image.new(mode, (width, height)).tobytes())
    image = Image.frombytes(mode, (width, height), (data * (size // len(data) + 1))[:size])
    if mode in ("P", "PA"):
        image.putpalette(list(data[:768]))
        if mode == "P" and data[0] % 2:
            image.info["transparency"] = data[-1]
    return image


@settings(max_examples=150, deadline=None)
@given(mode=st.sampled_from(MODES), width=st.integers(1, 40), height=st.integers(1, 40),
       data=st.binary(min_size=1, max_size=4096))
def test_any_mode_and_size_gives_pixels_in_0_1_or_names_the_mode(mode, width, height, data):
    try:
        out = to_pixels(random_image(mode, width, height, data))
    except ValueError as err:
        assert repr(mode) in str(err)
        return
    assert out.shape == (3, height, width) and out.dtype == torch.float32
    assert bool(((out >= 0) & (out <= 1)).all())


def test_a_mode_outside_the_known_ones_is_refused_by_name():
    image = Image.new("RGB", (2, 2))
    image._mode = "BGR;16"  # a mode of older Pillows, which this one no longer creates
    with pytest.raises(ValueError, match="PIL mode 'BGR;16' is not supported"):
        to_pixels(image)


def test_the_command_line_reads_image_files_by_the_same_rules(tmp_path, rgb8):
    """``flashu-compile ask --image`` had its own convert("RGB"), which clipped 16-bit files too."""
    from flashu_compile.tools.cli import _read_image

    gray8 = rgb8[..., 2]
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    Image.fromarray(np.dstack([rgb8, gray8]), "RGBA").save(tmp_path / "rgba.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    torch.testing.assert_close(_read_image(str(tmp_path / "gray16.png")), to_pixels(Image.fromarray(gray8, "L")))
    torch.testing.assert_close(_read_image(str(tmp_path / "rgba.png")), to_pixels(Image.open(tmp_path / "rgba.png")))
    Image.new("F", (2, 2)).save(tmp_path / "float.tiff")
    with pytest.raises(ValueError, match="PIL mode 'F'"):
        _read_image(str(tmp_path / "float.tiff"))
