"""Pixels from what a user hands the model: the one conversion every image input goes through.

:func:`to_pixels` either returns the picture the input holds as a (3, H, W) float32 tensor in [0, 1], or
raises a ``ValueError`` that names what it refuses (the PIL mode, the tensor dtype or shape, the size).
Nothing is guessed: a value range that the input does not carry with it is refused instead of assumed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Float rounding in a caller's conversion (e.g. (x + 1) / 2) moves [0, 1] pixels by a hair; anything
# further is another value range.
PIXEL_SLACK = 1e-3
# Modes Pillow turns into RGB itself (8 bits a channel, no transparency of their own). A Pillow release that
# cannot convert one of them (LAB, in older releases) raises, and that is reported by mode.
_PILLOW_CONVERTS = ("1", "L", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
# Modes whose alpha is straight (colour not multiplied by it). A palette may carry alpha in its entries or a
# transparent index, so palette images always go through RGBA.
_STRAIGHT_ALPHA = ("RGBA", "LA", "PA", "P")
# Modes whose colour is already multiplied by alpha; Pillow cannot turn "La" into RGBA, so these are read directly.
_PREMULTIPLIED = ("RGBa", "La")
# One grey channel of up to 16 bits. "I" (32-bit signed) is how older Pillow releases open 16-bit PNGs and TIFFs.
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_SIXTEEN_BIT_MAX = 65535
_ALL_MODES = (*_PILLOW_CONVERTS, *_STRAIGHT_ALPHA, *_PREMULTIPLIED, *_SIXTEEN_BIT)

# Integer dtypes with a known full scale; any other integer range is the caller's to state.
_INTEGER_SCALES = {torch.uint8: 255.0, torch.uint16: float(_SIXTEEN_BIT_MAX)}


def to_pixels(image: Any) -> torch.Tensor:
    """A PIL image or a tensor as a (3, H, W) float32 tensor in [0, 1], or a ``ValueError`` naming the problem.

    PIL images, by mode:

    * "RGB", "RGBX", "L", "1", "CMYK", "YCbCr", "HSV", "LAB": Pillow's own conversion to RGB.
    * "I;16", "I;16B", "I;16L", "I;16N": 16-bit grey, divided by 65535 (so 257 * v reads as the 8-bit v).
    * "I" (32-bit int): read as 16-bit grey when every value is in 0..65535 (16-bit PNGs and TIFFs open
      this way in older Pillows; note that ``convert("I")`` of an 8-bit image keeps 0..255 and reads dark);
      any other value is refused.
    * "F" (32-bit float): refused; it has no fixed range. Pass a float tensor in [0, 1] instead.
    * Transparency is composited on white: the alpha of "RGBA", "LA", "PA", "RGBa", "La" (the last two
      premultiplied), a palette's alpha or transparent index ("P"), and a colour key (PNG tRNS,
      ``info["transparency"]``) of "1", "L", "RGB" and 16-bit images.
    * Any other mode is refused.

    Tensors, by dtype: uint8 is divided by 255, uint16 by 65535; float16, bfloat16, float32 and float64 must
    hold [0, 1] already (values within 1e-3 outside it, a conversion's rounding, are clamped; anything
    further, NaN or infinity is refused rather than guessed at: 0..255 floats or [-1, 1] are other ranges).
    Other integer dtypes (their full scale says nothing of the pixels' range), bool and complex are refused.
    Shapes: (3, H, W) is RGB; (1, H, W) and (H, W) are grey, repeated to three channels; any other shape
    (channels last, a batch) is refused.

    Every image needs at least 1 x 1 pixel (the model resizes any image to its input size, so one pixel
    already has a picture to give); an empty one, any side 0, is refused.
    """
    if isinstance(image, torch.Tensor):
        return _tensor_pixels(image)
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image or a (3, H, W) tensor, got {type(image).__name__}")
    if image.height < 1 or image.width < 1:
        raise _no_pixels(f"{image.height} x {image.width} (height x width)")
    return torch.from_numpy(np.ascontiguousarray(_pil_pixels(image), dtype=np.float32)).permute(2, 0, 1).clamp(0, 1)


def _no_pixels(described: str) -> ValueError:
    return ValueError(f"image has no pixels: {described}; an image needs at least 1 x 1 (height x width)")


def _pil_pixels(image) -> np.ndarray:
    """(H, W, 3) in [0, 1] by the mode rules of :func:`to_pixels`."""
    mode = image.mode
    if mode in _SIXTEEN_BIT:
        # Pillow hands out "I;16B" big-endian; astype reads it by its dtype, whatever the byte order.
        grey = np.asarray(image).astype(np.int64)
        low, high = int(grey.min()), int(grey.max())
        if low < 0 or high > _SIXTEEN_BIT_MAX:
            raise ValueError(f"PIL mode {mode!r} image has values in [{low}, {high}]; only 16-bit content "
                             f"(0..{_SIXTEEN_BIT_MAX}) has a known scale: scale it to 0..{_SIXTEEN_BIT_MAX} or "
                             "pass a float tensor in [0, 1]")
        pixels = grey / _SIXTEEN_BIT_MAX
        key = image.info.get("transparency")
        if isinstance(key, int):  # Pillow's own convert("RGBA") clips 16-bit values, so the key is applied here
            pixels = np.where(grey == key, 1.0, pixels)
        return np.repeat(pixels[..., None], 3, axis=-1)
    if mode in _PREMULTIPLIED:
        values = np.asarray(image, dtype=np.float32) / 255
        colour, alpha = values[..., :-1], values[..., -1:]
        # On white: colour * alpha + (1 - alpha), and the colour is already multiplied. A colour above its
        # alpha is not a valid premultiplied value; the clamp in to_pixels bounds it like Pillow's own unpremultiply.
        return np.broadcast_to(colour + (1 - alpha), (*values.shape[:2], 3))
    if mode in _STRAIGHT_ALPHA or (mode in ("1", "L", "RGB") and image.info.get("transparency") is not None):
        values = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255
        colour, alpha = values[..., :3], values[..., 3:]
        return colour * alpha + (1 - alpha)
    if mode in _PILLOW_CONVERTS:
        try:
            rgb = image.convert("RGB")
        except ValueError as err:
            raise ValueError(f"PIL mode {mode!r} cannot be converted to RGB by this Pillow: {err}") from None
        return np.asarray(rgb, dtype=np.float32) / 255
    if mode == "F":
        raise ValueError("PIL mode 'F' (32-bit float) has no fixed pixel range; pass a float tensor in [0, 1]")
    raise ValueError(f"PIL mode {mode!r} is not supported; supported modes: {', '.join(_ALL_MODES)}")


def _tensor_pixels(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1] by the dtype and shape rules of :func:`to_pixels`."""
    shape = tuple(image.shape)
    if image.numel() == 0:
        raise _no_pixels(f"shape {shape}")
    if image.dim() not in (2, 3) or (image.dim() == 3 and image.shape[0] not in (1, 3)):
        raise ValueError(f"image must be (3, H, W) RGB, or (1, H, W) or (H, W) grey, got shape {shape}")
    if image.dtype in _INTEGER_SCALES:
        pixels = image.float() / _INTEGER_SCALES[image.dtype]
    elif image.is_floating_point():
        pixels = image.float()
        low, high = float(pixels.min()), float(pixels.max())
        if not (-PIXEL_SLACK <= low and high <= 1 + PIXEL_SLACK):  # NaN fails both comparisons
            raise ValueError(f"image values must be finite and in [0, 1], got [{low}, {high}]; divide 0..255 "
                             "pixels by 255, map [-1, 1] with (x + 1) / 2")
    else:
        raise ValueError(f"image must be a float tensor in [0, 1], a uint8 (0..255) or a uint16 (0..65535) tensor, "
                         f"got dtype {image.dtype}")
    if pixels.dim() == 2:
        pixels = pixels[None]
    return pixels.expand(3, -1, -1).clamp(0, 1)
