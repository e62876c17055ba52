"""Latent codecs: how images become latents and back.

Real checkpoints use the Wan2.1 VAE (diffusers ``AutoencoderKLWan``) with per-channel latent
normalisation. Small models trained here use a fixed pixel-unshuffle, so no VAE is needed.
Without either, latents can still be previewed as a picture.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


class PixelUnshuffleCodec:
    """RGB in [-1, 1] (B, 3, H, W) <-> latent (B, 3*f*f, H/f, W/f): an exact, fixed rearrangement."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    @property
    def channels(self) -> int:
        return 3 * self.factor * self.factor

    @property
    def spatial_factor(self) -> int:
        return self.factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images.float(), self.factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Back to RGB in [0, 1]."""
        return (F.pixel_shuffle(latents.float(), self.factor).clamp(-1, 1) + 1) / 2


class WanVAECodec:
    """The Wan2.1 VAE from a local diffusers folder, latents normalised by its mean and std."""

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> None:
        try:
            from diffusers import AutoencoderKLWan
        except ImportError as err:
            raise ImportError(
                "decoding real Show-o2 latents needs diffusers: pip install 'flashu-compile[vae]'"
            ) from err
        if not os.path.isdir(path):
            raise FileNotFoundError(f"VAE folder {str(path)!r} does not exist")
        self.vae = AutoencoderKLWan.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True).eval()
        cfg = self.vae.config
        self.mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)

    @property
    def channels(self) -> int:
        return self.mean.shape[1]

    spatial_factor = 8  # Wan2.1 downsamples images 8x in each direction

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in [-1, 1] (B, 3, H, W) -> normalised latent mean (B, 16, H/8, W/8)."""
        x = images[:, :, None].to(self.vae.dtype)
        mean = self.vae.encode(x).latent_dist.mean.float()
        return ((mean - self.mean) / self.std)[:, :, 0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float()[:, :, None] * self.std + self.mean
        images = self.vae.decode(z.to(self.vae.dtype)).sample[:, :, 0].float()
        return (images.clamp(-1, 1) + 1) / 2


def preview(latents: torch.Tensor) -> torch.Tensor:
    """A look at a latent without a decoder: its first three principal channel directions as RGB.

    Projection is per image, each channel stretched to [0, 1]; enough to see layout and noise.
    """
    b, c, h, w = latents.shape
    flat = latents.float().reshape(b, c, h * w)
    flat = flat - flat.mean(dim=-1, keepdim=True)
    out = []
    for x in flat:
        k = min(3, c)
        u, _, _ = torch.linalg.svd(x, full_matrices=False)
        rgb = u[:, :k].T @ x
        if k < 3:
            rgb = torch.cat([rgb, rgb[:1].expand(3 - k, -1)], dim=0)
        lo, hi = rgb.amin(dim=-1, keepdim=True), rgb.amax(dim=-1, keepdim=True)
        out.append(((rgb - lo) / (hi - lo).clamp_min(1e-8)).reshape(3, h, w))
    return torch.stack(out)


def to_pil(images: torch.Tensor, upscale: int = 1):
    """(B, 3, H, W) in [0, 1] -> list of PIL images, optionally enlarged (nearest) for viewing."""
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    pics = [Image.fromarray(a) for a in arr]
    if upscale > 1:
        pics = [p.resize((p.width * upscale, p.height * upscale), Image.NEAREST) for p in pics]
    return pics
