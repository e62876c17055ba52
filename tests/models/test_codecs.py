import pytest
import torch

from flashu_compile.models.showo2.codecs import PixelUnshuffleCodec, preview, to_pil


def test_pixel_codec_round_trip():
    codec = PixelUnshuffleCodec(2)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    latents = codec.encode(images)
    assert latents.shape == (2, 12, 4, 4)
    torch.testing.assert_close(codec.decode(latents), (images + 1) / 2)


def test_preview_shows_latent_structure():
    lat = torch.zeros(1, 16, 6, 6)
    lat[0, :, :3] = 1.0  # top half differs from the bottom half in every channel
    pic = preview(lat)
    assert pic.shape == (1, 3, 6, 6) and pic.min() >= 0 and pic.max() <= 1
    assert (pic[0, :, :3] - pic[0, :, 3:]).abs().max() > 0.5
    assert to_pil(pic, upscale=4)[0].size == (24, 24)


def test_wan_vae_codec_on_a_tiny_vae(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="the 'vae' extra (diffusers) is not installed")
    from flashu_compile.models.showo2.codecs import WanVAECodec

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                     temperal_downsample=[False], latents_mean=[0.5, -0.5, 0.0, 1.0],
                                     latents_std=[2.0, 1.0, 0.5, 1.5])
    vae.save_pretrained(tmp_path)
    codec = WanVAECodec(tmp_path)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    latents = codec.encode(images)
    assert latents.shape == (1, 4, 8, 8)
    # The codec normalises with the VAE's per-channel statistics.
    raw = vae.encode(images[:, :, None]).latent_dist.mean[:, :, 0]
    mean = torch.tensor([0.5, -0.5, 0.0, 1.0]).view(1, 4, 1, 1)
    std = torch.tensor([2.0, 1.0, 0.5, 1.5]).view(1, 4, 1, 1)
    torch.testing.assert_close(latents, (raw - mean) / std, rtol=1e-4, atol=1e-5)
    decoded = codec.decode(latents)
    assert decoded.shape == (1, 3, 16, 16) and decoded.min() >= 0 and decoded.max() <= 1
    with pytest.raises(FileNotFoundError, match="VAE folder"):
        WanVAECodec(tmp_path / "missing")
