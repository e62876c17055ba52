"""Show-o2 configuration: the official constructor arguments plus the sub-model configs.

The official checkpoint's ``config.json`` only holds the Show-o2 constructor arguments; the
LLM and SigLIP configs live behind ``llm_model_path`` / ``clip_pretrained_model_path``. A
:class:`Showo2Config` carries all three resolved, so a model can be built without a hub.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from transformers import Qwen2Config, SiglipVisionConfig

from ...validate import check_int


@dataclass
class FlowHeadConfig:
    """Dimensions of the flow-matching head (``diffusion_head_a`` / ``diffusion_head_b``).

    The official code fixes these (width 2048, 32 heads of 64, 8 KV heads, MLP 8192); they are
    configurable here so that small models can be built and trained on a CPU.
    """

    hidden_size: int = 2048
    head_dim: int = 64
    intermediate_size: int = 8192
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # llama3-style frequency scaling, as in the official head.
    rope_factor: float = 32.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192

    # The keys an official ``config.json`` may override through its ``diffusion_head`` object.
    OVERRIDABLE = ("hidden_size", "head_dim", "intermediate_size", "num_attention_heads", "num_key_value_heads")

    def __post_init__(self) -> None:
        for name in self.OVERRIDABLE:
            check_int(f"diffusion_head.{name}", getattr(self, name), 1)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"diffusion_head.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"diffusion_head.head_dim must be even for rotary embeddings, got {self.head_dim}")

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any] | None) -> FlowHeadConfig:
        """Apply the optional ``diffusion_head`` object of an official ``config.json``."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(cls.OVERRIDABLE))
        if unknown:
            raise ValueError(
                f"unknown diffusion_head key(s) {unknown}; valid keys: {list(cls.OVERRIDABLE)}"
            )
        return cls(**overrides)


@dataclass
class Showo2Config:
    """Everything needed to build a Show-o2: official arguments plus resolved sub-configs."""

    llm: Qwen2Config
    vision: SiglipVisionConfig
    flow_head: FlowHeadConfig = field(default_factory=FlowHeadConfig)
    llm_vocab_size: int | None = None
    image_latent_dim: int = 16
    # The *token* grid (27 at 432x432), not the VAE latent size: the official code builds its
    # position ids from it.
    image_latent_height: int = 27
    image_latent_width: int = 27
    patch_size: int = 2
    num_diffusion_layers: int = 10
    add_time_embeds: bool = True
    # Prompt slots in a text-to-image row; the official 290 = 1024 - (729 + 1) - 4.
    max_text_len: int = 290
    # How images map to latents: "wan2.1-vae" (real checkpoints) or "pixel-unshuffle-F" (small models).
    latent_codec: str = "wan2.1-vae"
    # Kept verbatim so that a saved checkpoint is readable by the official code.
    llm_model_path: str = "Qwen/Qwen2.5-1.5B-Instruct"
    clip_pretrained_model_path: str = "google/siglip-so400m-patch14-384"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_sub_config("llm", self.llm, _LLM_INTS)
        _check_sub_config("vision", self.vision, _VISION_INTS)
        if self.llm_vocab_size is None:
            self.llm_vocab_size = self.llm.vocab_size
        for name in ("llm_vocab_size", "image_latent_dim", "image_latent_height", "image_latent_width", "patch_size",
                     "num_diffusion_layers", "max_text_len"):
            check_int(name, getattr(self, name), 1)
        if not isinstance(self.add_time_embeds, bool):
            raise ValueError(f"add_time_embeds must be a bool, got {self.add_time_embeds!r}")
        if not isinstance(self.latent_codec, str):
            raise ValueError(f"latent_codec must be a str, got {self.latent_codec!r}")
        # The official model resizes the LLM's embeddings to the tokenizer length.
        self.llm.vocab_size = self.llm_vocab_size
        # Show-o2 passes a ready 4D additive mask; SDPA consumes it as is.
        self.llm._attn_implementation = "sdpa"
        self.vision._attn_implementation = "sdpa"
        if not self.add_time_embeds:
            raise ValueError(
                "add_time_embeds=False is not supported: every released Show-o2 checkpoint places a time "
                "token before the image tokens"
            )
        if self.latent_codec != "wan2.1-vae":
            factor = _unshuffle_factor(self.latent_codec)
            if 3 * factor * factor != self.image_latent_dim:
                raise ValueError(f"latent_codec {self.latent_codec!r} gives {3 * factor * factor} channels, "
                                 f"but image_latent_dim is {self.image_latent_dim}")
        if self.vision.num_hidden_layers < 2:
            raise ValueError("the SigLIP config needs at least 2 layers (Show-o2 drops the last one)")

    # Official ``hidden_size`` / ``clip_latent_dim`` are the LLM and SigLIP widths.
    @property
    def hidden_size(self) -> int:
        return self.llm.hidden_size

    @property
    def clip_latent_dim(self) -> int:
        return self.vision.hidden_size

    @property
    def num_position_embeddings(self) -> int:
        return (self.vision.image_size // self.vision.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """Image tokens at the default resolution (729 at 432x432), without the time token."""
        return self.image_latent_height * self.image_latent_width

    @property
    def latent_size(self) -> tuple[int, int]:
        """Spatial size of the VAE latent at the default resolution (54x54 at 432x432)."""
        return self.image_latent_height * self.patch_size, self.image_latent_width * self.patch_size

    def official_dict(self) -> dict[str, Any]:
        """The ``config.json`` the official ``Showo2Qwen2_5`` would write for this model."""
        out: dict[str, Any] = dict(self.extra)
        out.update(
            llm_vocab_size=self.llm_vocab_size,
            llm_model_path=self.llm_model_path,
            load_from_showo=True,
            image_latent_dim=self.image_latent_dim,
            image_latent_height=self.image_latent_height,
            image_latent_width=self.image_latent_width,
            video_latent_height=out.get("video_latent_height", self.image_latent_height),
            video_latent_width=out.get("video_latent_width", self.image_latent_width),
            patch_size=self.patch_size,
            hidden_size=self.hidden_size,
            clip_latent_dim=self.clip_latent_dim,
            num_diffusion_layers=self.num_diffusion_layers,
            add_time_embeds=self.add_time_embeds,
            clip_pretrained_model_path=self.clip_pretrained_model_path,
            # Not read by the official code (it ignores unknown keys); kept for a faithful round trip.
            max_text_len=self.max_text_len,
            latent_codec=self.latent_codec,
        )
        default_head = FlowHeadConfig()
        overrides = {k: getattr(self.flow_head, k) for k in FlowHeadConfig.OVERRIDABLE
                     if getattr(self.flow_head, k) != getattr(default_head, k)}
        if overrides:
            out["diffusion_head"] = overrides
        else:
            out.pop("diffusion_head", None)
        return out

    def replace(self, **changes: Any) -> Showo2Config:
        """A deep copy with some fields changed (sub-configs are copied, never shared)."""
        values = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        values.update(changes)
        return Showo2Config(**values)

    def summary(self) -> dict[str, Any]:
        return {
            "llm": {k: getattr(self.llm, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                      "num_key_value_heads", "intermediate_size", "vocab_size")},
            "vision": {k: getattr(self.vision, k) for k in ("hidden_size", "num_hidden_layers",
                                                            "num_attention_heads", "intermediate_size")},
            "flow_head": asdict(self.flow_head),
            "num_diffusion_layers": self.num_diffusion_layers,
            "token_grid": (self.image_latent_height, self.image_latent_width),
        }


# Sub-config dimensions that must be positive ints, and (numerator, denominator) pairs that must divide.
_LLM_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings")
_VISION_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size")
_DIVISIBLE = (("hidden_size", "num_attention_heads"), ("num_attention_heads", "num_key_value_heads"))


def _check_sub_config(kind: str, config: Any, names: tuple[str, ...]) -> None:
    """The LLM or SigLIP config's dimensions: positive ints that split into whole heads (named ``llm.hidden_size``)."""
    for name in names:
        check_int(f"{kind}.{name}", getattr(config, name, None), 1)
    for whole, part in _DIVISIBLE:
        if part in names and getattr(config, whole) % getattr(config, part):
            raise ValueError(f"{kind}.{whole} ({getattr(config, whole)}) must be a multiple of {kind}.{part} "
                             f"({getattr(config, part)})")


def _unshuffle_factor(codec: str) -> int:
    prefix = "pixel-unshuffle-"
    if not codec.startswith(prefix) or not codec[len(prefix):].isdigit() or int(codec[len(prefix):]) < 1:
        raise ValueError(f"unknown latent_codec {codec!r}; use 'wan2.1-vae' or 'pixel-unshuffle-<factor>'")
    return int(codec[len(prefix):])


# --- Sub-config presets for the official hub ids (no hub access: the dimensions are known) ---

def _qwen2_5_instruct(**dims) -> Qwen2Config:
    # What the Qwen2.5 Instruct sizes share; each size adds its own dimensions.
    return Qwen2Config(num_hidden_layers=28, max_position_embeddings=32768, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151645, **dims)


def qwen2_5_1_5b_instruct() -> Qwen2Config:
    return _qwen2_5_instruct(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                             num_key_value_heads=2, tie_word_embeddings=True, max_window_layers=21)


def qwen2_5_7b_instruct() -> Qwen2Config:
    return _qwen2_5_instruct(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                             num_key_value_heads=4, tie_word_embeddings=False, max_window_layers=28)


def siglip_so400m_patch14_384() -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    )


HUB_PRESETS = {
    "Qwen/Qwen2.5-1.5B-Instruct": qwen2_5_1_5b_instruct,
    "Qwen/Qwen2.5-7B-Instruct": qwen2_5_7b_instruct,
    "google/siglip-so400m-patch14-384": siglip_so400m_patch14_384,
}

# Tokenizer length of the official Qwen2.5 tokenizer after Show-o2 adds its tokens.
SHOWO2_QWEN_VOCAB = 151669


def _showo2_1_5b() -> Showo2Config:
    return Showo2Config(llm=qwen2_5_1_5b_instruct(), vision=siglip_so400m_patch14_384(),
                        llm_vocab_size=SHOWO2_QWEN_VOCAB, llm_model_path="Qwen/Qwen2.5-1.5B-Instruct")


def _showo2_7b() -> Showo2Config:
    return Showo2Config(llm=qwen2_5_7b_instruct(), vision=siglip_so400m_patch14_384(),
                        llm_vocab_size=SHOWO2_QWEN_VOCAB, llm_model_path="Qwen/Qwen2.5-7B-Instruct")


def _tiny() -> Showo2Config:
    # Proportions of the real model at toy width: H != D so diff_proj / time_embed_proj exist,
    # GQA in both attention stacks, an 8x8 token grid matching a 64-entry position table, and
    # 32x32 RGB images as 12-channel pixel-unshuffled latents.
    from .tokenizer import SceneTokenizer

    return custom_config(
        vocab_size=len(SceneTokenizer()), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=128, vision_hidden_size=48, vision_layers=3, vision_heads=4,
        vision_intermediate_size=96, grid=8, head_hidden_size=96, head_heads=4, head_kv_heads=2,
        head_dim=24, head_intermediate_size=192, num_diffusion_layers=2, latent_channels=12,
        max_text_len=24, latent_codec="pixel-unshuffle-2",
    )


def _bench() -> Showo2Config:
    # Show-o2 1.5B's depth and sequence at 1/16 of its width, for benchmarks on a CPU: 28 decoder
    # layers (12 heads, 2 KV heads, FFN 5.8x hidden), a 10-block flow head wider than the LLM
    # (4 heads per KV head), a 26-layer SigLIP path, and 729 image tokens from 108x108 RGB images
    # (27x27 tokens of 2x2 patches of 12-channel pixel-unshuffled latents). The text budget is 64
    # tokens instead of 290, which keeps the rows image-dominated as they are for real prompts.
    from .tokenizer import SceneTokenizer

    return custom_config(
        vocab_size=len(SceneTokenizer()), hidden_size=96, num_layers=28, num_heads=12, num_kv_heads=2,
        intermediate_size=560, vision_hidden_size=72, vision_layers=27, vision_heads=6,
        vision_intermediate_size=270, grid=27, head_hidden_size=128, head_heads=8, head_kv_heads=2,
        head_dim=16, head_intermediate_size=512, num_diffusion_layers=10, latent_channels=12,
        max_text_len=64, latent_codec="pixel-unshuffle-2",
    )


def custom_config(
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    vision_hidden_size: int,
    vision_layers: int,
    vision_heads: int,
    vision_intermediate_size: int,
    grid: int,
    head_hidden_size: int,
    head_heads: int,
    head_kv_heads: int,
    head_dim: int,
    head_intermediate_size: int,
    num_diffusion_layers: int,
    latent_channels: int = 16,
    patch_size: int = 2,
    max_position_embeddings: int = 4096,
    tie_word_embeddings: bool = True,
    max_text_len: int = 32,
    latent_codec: str = "wan2.1-vae",
) -> Showo2Config:
    """A Show-o2 of arbitrary dimensions with the official structure (for tests and small models).

    ``grid`` is the token grid side; the SigLIP position table gets ``grid**2`` entries so the
    default resolution adds it without interpolation, like 27x27 in the real model.
    """
    vision_patch = 14
    llm = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=tie_word_embeddings,
    )
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=vision_intermediate_size,
        num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
        image_size=grid * vision_patch, patch_size=vision_patch, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    head = FlowHeadConfig(hidden_size=head_hidden_size, head_dim=head_dim,
                          intermediate_size=head_intermediate_size, num_attention_heads=head_heads,
                          num_key_value_heads=head_kv_heads)
    return Showo2Config(
        llm=llm, vision=vision, flow_head=head, llm_vocab_size=vocab_size, image_latent_dim=latent_channels,
        image_latent_height=grid, image_latent_width=grid, patch_size=patch_size,
        num_diffusion_layers=num_diffusion_layers, llm_model_path="llm", clip_pretrained_model_path="siglip",
        max_text_len=max_text_len, latent_codec=latent_codec,
    )


SIZE_PRESETS = {
    "showo2-1.5b": _showo2_1_5b,
    "showo2-7b": _showo2_7b,
    "tiny": _tiny,
    "bench": _bench,
}


def preset(name: str) -> Showo2Config:
    """A named configuration preset (a fresh object each call)."""
    try:
        factory = SIZE_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown Show-o2 preset {name!r}; choose one of {sorted(SIZE_PRESETS)}") from None
    return factory()
