"""Show-o2 on transformers parts: a Qwen2 LLM, SigLIP encoder layers and a flow-matching head.

The forward follows the official ``Showo2Qwen2_5.forward`` (same inputs, same outputs, same
state-dict keys) but places the time and image embeddings with index tensors instead of Python
loops over tensor values, so one denoising step or prefill traces into a single graph.
"""

from __future__ import annotations

import copy
import functools
import gc
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import Qwen2ForCausalLM
from transformers.models.siglip.modeling_siglip import SiglipEncoder

from ...validate import warn_user
from . import understanding
from .checkpoint import load_showo2, save_showo2
from .configuration import Showo2Config, preset
from .embedded import EMBEDDED, WEIGHTS_DIR, verify_checksums
from .images import to_pixels
from .modules import (
    FinalLayer,
    ModulatedAttentionBlock,
    PatchEmbed,
    RMSNorm,
    TimestepEmbedder,
    interpolate_position_table,
    llama3_inv_freq,
    rotary_cos_sin,
)
from .sequences import check_t2i_fits, span_membership

if TYPE_CHECKING:
    from .sampling import DenoiseFn, SamplerRules


def image_span_mask(modality_positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, S, 1) bool: positions inside any (offset, length) span of their row."""
    return span_membership(modality_positions, seq_len).any(dim=1)[..., None]


def unpatchify(x: torch.Tensor, grid_h: int, grid_w: int, patch: int, channels: int) -> torch.Tensor:
    """(N, h*w, p*p*c) -> (N, c, h*p, w*p) with the official reshape (no spatial permute)."""
    n = x.shape[0]
    x = x.reshape(n, grid_h, grid_w, patch, patch, channels).reshape(n, grid_h * patch * grid_w * patch, channels)
    return x.transpose(1, 2).reshape(n, channels, grid_h * patch, grid_w * patch)


class Showo2(nn.Module):
    """The Show-o2 unified model (understanding through the LLM head, generation through the flow head)."""

    def __init__(self, config: Showo2Config) -> None:
        super().__init__()
        self.config = config
        h, d = config.hidden_size, config.flow_head.hidden_size
        self.showo = Qwen2ForCausalLM(config.llm)
        self.image_embedder_und = PatchEmbed(config.patch_size, config.image_latent_dim, config.clip_latent_dim)
        self.image_embedder_gen = PatchEmbed(config.patch_size, config.image_latent_dim, h)
        self.position_embedding = nn.Embedding(config.num_position_embeddings, config.clip_latent_dim)
        und_config = copy.deepcopy(config.vision)
        und_config.num_hidden_layers -= 1  # Show-o2 drops SigLIP's last layer
        self.und_trans = SiglipEncoder(und_config)
        self.fusion_proj = nn.Sequential(
            RMSNorm(config.clip_latent_dim + h),
            nn.Linear(config.clip_latent_dim + h, h),
            nn.GELU(),
            nn.Linear(h, h),
        )
        self.time_embed = TimestepEmbedder(d)
        if h != d:
            self.diff_proj = nn.Sequential(nn.Linear(h, d), nn.GELU(), nn.Linear(d, d))
            self.time_embed_proj = nn.Linear(d, h)
        self.diffusion_head_a = nn.ModuleList(
            [ModulatedAttentionBlock(config.flow_head) for _ in range(config.num_diffusion_layers)]
        )
        self.diffusion_head_b = FinalLayer(d, config.patch_size, config.image_latent_dim)
        self.register_buffer("head_inv_freq", llama3_inv_freq(config.flow_head), persistent=False)
        # Set by attach(): what generate_images() / answer() need beyond the network.
        self.tokenizer = None
        self.codec = None
        self._checked_for_wrapper = False

    # ----------------------------------------------------------------- construction helpers
    @classmethod
    def from_preset(cls, name: str, seed: int = 0) -> Showo2:
        """A randomly initialised model of a named preset (deterministic for ``seed``)."""
        return cls.random(preset(name), seed)

    @classmethod
    def random(cls, config: Showo2Config, seed: int = 0) -> Showo2:
        """Build and initialise with a fixed seed, independent of the global RNG state."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config)
            model.init_weights()
        return model.eval()._attach_builtin()

    def _attach_builtin(self) -> Showo2:
        """Small models use the built-in scene tokenizer and a pixel codec when they fit."""
        from .codecs import PixelUnshuffleCodec
        from .configuration import _unshuffle_factor
        from .tokenizer import SceneTokenizer

        if self.config.latent_codec != "wan2.1-vae":
            self.codec = PixelUnshuffleCodec(_unshuffle_factor(self.config.latent_codec))
            tokenizer = SceneTokenizer()
            if len(tokenizer) <= self.config.llm_vocab_size:
                self.tokenizer = tokenizer
        return self

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> Showo2:
        """Load an official-layout checkpoint folder; see :func:`checkpoint.load_showo2`."""
        return load_showo2(cls, path, **kwargs)

    @classmethod
    def default(cls) -> Showo2:
        """The embedded default model shipped with the package, checksum-verified; the seeded ``tiny`` preset
        (with a warning) if none is shipped."""
        if not (WEIGHTS_DIR / "config.json").is_file():
            warn_user(f"no trained embedded weights at {WEIGHTS_DIR}; using the randomly initialised 'tiny' preset "
                      "(outputs are not meaningful images or answers)")
            return cls.from_preset("tiny")
        return cls.embedded("scenes")

    @classmethod
    def embedded(cls, name: str) -> Showo2:
        """An embedded model by name (``embedded.EMBEDDED``: "scenes", the default), checksum-verified."""
        if name not in EMBEDDED:
            raise ValueError(f"embedded model must be one of {list(EMBEDDED)}, got {name!r}")
        folder = EMBEDDED[name]
        verify_checksums(folder)
        return cls.from_pretrained(folder)

    def attach(self, tokenizer=None, codec=None) -> Showo2:
        """Set the tokenizer and latent codec the high-level methods use; returns self."""
        if tokenizer is not None:
            if len(tokenizer) > self.config.llm_vocab_size:
                raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                                 f"{self.config.llm_vocab_size}")
            self.tokenizer = tokenizer
        if codec is not None:
            self.codec = codec
        return self

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """PyTorch's in-place :meth:`torch.nn.Module.compile`: the model's own calls, which ``generate_images`` and
        ``answer`` make for every step (see :meth:`forward`), then run compiled.

        A backend may have rules for the sampler (a ``sampler_rules(options, model)`` attribute, as ``flashu``
        has: its guidance schedule and the request each image's calls form). They are asked for here, before
        anything compiles, so the backend can refuse its options at this call, and are kept with the compiled
        call PyTorch keeps, which ``generate_images`` follows. ``torch.compile(model)`` instead returns a wrapper
        whose other methods run this model uncompiled (their first call says so).
        """
        backend = kwargs.get("backend", "inductor")
        found = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
        make_rules = getattr(found, "sampler_rules", None)
        rules = make_rules(kwargs.get("options"), self) if make_rules is not None else None
        super().compile(*args, **kwargs)
        self._compiled_call_impl.sampler_rules = rules

    def _step(self, name: str) -> Callable:
        """One step kind of the task methods, through the module itself (compiled if compiled in place)."""
        self._warn_if_wrapped()
        return functools.partial(self, step=name)

    def _warn_if_wrapped(self) -> None:
        """Once per model: say so when ``torch.compile(model)`` wrapped this model, whose task methods the wrapper
        forwards to this uncompiled model."""
        if self._checked_for_wrapper or self._compiled_call_impl is not None:
            return
        self._checked_for_wrapper = True
        # The wrapper (dynamo's OptimizedModule) keeps the model as "_orig_mod" in its attribute dicts.
        if any(isinstance(holder, dict) and holder.get("_orig_mod") is self for holder in gc.get_referrers(self)):
            warn_user("torch.compile(model) returns a wrapper that compiles only the wrapper's own calls; "
                      "generate_images and answer run the model uncompiled. Compile the model in place instead: "
                      "model.compile(backend='flashu', options={...}), then model.generate_images(...)")

    def save_pretrained(self, path: str, **kwargs) -> None:
        """Write an official-layout checkpoint folder that replaces whatever checkpoint ``path`` held;
        see :func:`checkpoint.save_showo2`."""
        save_showo2(self, path, **kwargs)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random weights where every module matters (unlike the official init, which zeroes the
        output layer and adaLN so a fresh model predicts v = 0)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=0.02 if isinstance(module, nn.Linear) else 0.05)
                if module.bias is not None:
                    nn.init.normal_(module.bias, std=0.02)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.05)
            elif isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.05)
                module.bias.normal_(0.0, 0.02)
            elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter) \
                    and module.weight.dim() == 1:
                module.weight.normal_(1.0, 0.05)  # RMSNorm variants
        for block in self.diffusion_head_a:
            nn.init.normal_(block.adaLN_modulation[1].weight, std=0.05)
        nn.init.normal_(self.diffusion_head_b.adaLN_modulation[1].weight, std=0.05)
        nn.init.normal_(self.diffusion_head_b.linear.weight, std=0.1)
        self.showo.tie_weights()

    # ----------------------------------------------------------------- pieces of the forward
    @property
    def dtype(self) -> torch.dtype:
        return self.showo.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.showo.model.embed_tokens.weight.device

    def image_features(self, image_latents: torch.Tensor) -> torch.Tensor:
        """Dual-path image features: SigLIP-style semantic path and a projection path, fused."""
        latents = image_latents.to(self.dtype)
        p = self.config.patch_size
        grid_h, grid_w = latents.shape[-2] // p, latents.shape[-1] // p
        und = self.image_embedder_und(latents)
        gen = self.image_embedder_gen(latents)
        table = self.position_embedding.weight
        side = int(round(table.shape[0] ** 0.5))
        if (grid_h, grid_w) == (side, side):
            und = und + table[None]
        else:
            und = und + interpolate_position_table(table, grid_h, grid_w)
        und = self.und_trans(inputs_embeds=und).last_hidden_state
        return self.fusion_proj(torch.cat([und, gen], dim=-1))

    def time_embeddings(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(flow-head conditioning of width D, time token of width H) for each image."""
        time_embeds = self.time_embed(t, self.dtype)
        tokens = self.time_embed_proj(time_embeds) if hasattr(self, "time_embed_proj") else time_embeds
        return time_embeds, tokens

    def embed(
        self,
        text_tokens: torch.Tensor,
        image_latents: torch.Tensor,
        t: torch.Tensor,
        time_positions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with the time token at ``time_positions`` and image tokens right after."""
        embeds = self.showo.model.embed_tokens(text_tokens)
        image = self.image_features(image_latents)
        time_embeds, time_tokens = self.time_embeddings(t)
        values = torch.cat([time_tokens[:, None].to(embeds.dtype), image.to(embeds.dtype)], dim=1)
        index = time_positions[:, None] + torch.arange(values.shape[1], device=text_tokens.device)
        embeds = embeds.scatter(1, index[..., None].expand(-1, -1, embeds.shape[-1]), values)
        return embeds, time_embeds

    def llm_hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs) -> torch.Tensor:
        """The LLM's last hidden state after its final norm (what the flow head reads)."""
        return self.showo.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs).last_hidden_state

    def flow_head(
        self,
        hidden: torch.Tensor,
        time_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_span: torch.Tensor,
    ) -> torch.Tensor:
        """Per-position velocity patches (B, S, p*p*c) from the LLM's hidden states."""
        x = self.diff_proj(hidden) if hasattr(self, "diff_proj") else hidden
        rotary = rotary_cos_sin(self.head_inv_freq, x.shape[1], x.dtype)
        for block in self.diffusion_head_a:
            x = block(x, time_embeds, attention_mask, rotary, image_span)
        return self.diffusion_head_b(x, time_embeds, image_span)

    def velocity(self, head_out: torch.Tensor, time_positions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Gather each row's image tokens (time token dropped) and unpatchify to (B, c, H, W)."""
        n = grid[0] * grid[1]
        index = time_positions[:, None] + 1 + torch.arange(n, device=head_out.device)
        tokens = head_out.gather(1, index[..., None].expand(-1, -1, head_out.shape[-1]))
        return unpatchify(tokens, grid[0], grid[1], self.config.patch_size, self.config.image_latent_dim)

    def _check_spans(self, modality_positions: torch.Tensor, image_latents: torch.Tensor, seq_len: int) -> None:
        if modality_positions.dim() != 3 or modality_positions.shape[1] != 1:
            raise ValueError(
                "modality_positions must be (batch, 1, 2): one image per row is supported, got "
                f"{tuple(modality_positions.shape)}"
            )
        if torch.compiler.is_compiling():
            return  # value checks would be data-dependent branches; eager calls validate
        p = self.config.patch_size
        expected = (image_latents.shape[-2] // p) * (image_latents.shape[-1] // p) + 1
        lengths = modality_positions[:, 0, 1]
        offsets = modality_positions[:, 0, 0]
        if bool((lengths != expected).any()):
            raise ValueError(f"modality length must be {expected} (time token + image tokens), got {lengths.tolist()}")
        if bool((offsets < 0).any()) or bool((offsets + lengths > seq_len).any()):
            raise ValueError(f"modality span out of the sequence of length {seq_len}: {modality_positions.tolist()}")

    def _check_latents(self, image_latents: torch.Tensor) -> tuple[int, int]:
        p, c = self.config.patch_size, self.config.image_latent_dim
        if image_latents.dim() != 4 or image_latents.shape[1] != c:
            raise ValueError(f"image_latents must be (batch, {c}, H, W), got {tuple(image_latents.shape)}")
        if image_latents.shape[-2] % p or image_latents.shape[-1] % p:
            raise ValueError(f"latent height/width must be multiples of the patch size {p}, "
                             f"got {tuple(image_latents.shape[-2:])}")
        return image_latents.shape[-2] // p, image_latents.shape[-1] // p

    # ----------------------------------------------------------------- entry points
    def forward(self, *args: Any, step: str | None = None, **kwargs: Any) -> Any:
        """Without ``step``, the official semantics (:meth:`logits_and_velocity`). With ``step``, one model call
        of the task methods: ``"denoise"`` (:meth:`denoise`), ``"embed"`` (:meth:`embed`), ``"prefill"`` and
        ``"decode"`` (:func:`understanding.prefill`, :func:`understanding.decode_step`).

        ``generate_images`` and ``answer`` make every model call through the module itself, so a model
        compiled in place (``model.compile(backend="flashu", options=...)``, PyTorch's ``Module.compile``)
        runs each of them compiled: dynamo traces one graph per step kind.
        """
        if step is None:
            return self.logits_and_velocity(*args, **kwargs)
        steps = {"denoise": self.denoise, "embed": self.embed,
                 "prefill": functools.partial(understanding.prefill, self),
                 "decode": functools.partial(understanding.decode_step, self)}
        if step not in steps:
            raise ValueError(f"step must be one of {sorted(steps)} or None, got {step!r}")
        return steps[step](*args, **kwargs)

    def logits_and_velocity(
        self,
        text_tokens: torch.Tensor,
        image_latents: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        modality_positions: torch.Tensor | None = None,
        **unused,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Official semantics: returns ``(logits, v_pred)``; ``v_pred`` is None without an image."""
        if image_latents is None:
            logits = self.showo.lm_head(self.llm_hidden(self.showo.model.embed_tokens(text_tokens), attention_mask))
            return logits, None
        hidden, head_out, grid, time_positions = self._multimodal(
            text_tokens, image_latents, t, attention_mask, modality_positions
        )
        return self.showo.lm_head(hidden), self.velocity(head_out, time_positions, grid)

    def denoise(
        self,
        text_tokens: torch.Tensor,
        image_latents: torch.Tensor,
        t: torch.Tensor,
        attention_mask: torch.Tensor,
        modality_positions: torch.Tensor,
    ) -> torch.Tensor:
        """One flow step's velocity (B, c, H, W): the forward without the unused LM logits."""
        _, head_out, grid, time_positions = self._multimodal(
            text_tokens, image_latents, t, attention_mask, modality_positions
        )
        return self.velocity(head_out, time_positions, grid)

    def _multimodal(self, text_tokens, image_latents, t, attention_mask, modality_positions):
        grid = self._check_latents(image_latents)
        self._check_spans(modality_positions, image_latents, text_tokens.shape[1])
        time_positions = modality_positions[:, 0, 0]
        t = t.reshape(-1).to(image_latents.device)
        embeds, time_embeds = self.embed(text_tokens, image_latents, t, time_positions)
        hidden = self.llm_hidden(embeds, attention_mask)
        span = image_span_mask(modality_positions, text_tokens.shape[1])
        return hidden, self.flow_head(hidden, time_embeds, attention_mask, span), grid, time_positions

    # ----------------------------------------------------------------- tasks
    def _require(self, what: str):
        value = getattr(self, what)
        if value is None:
            hint = {"tokenizer": "from_pretrained(..., tokenizer_path=...) or attach(tokenizer=...)",
                    "codec": "from_pretrained(..., vae_path=...) or attach(codec=...)"}[what]
            raise RuntimeError(f"this model has no {what}; provide one with {hint}")
        return value

    @torch.no_grad()
    def generate_images(
        self, prompts: list[str] | str, steps: int = 50, guidance: float | None = None, shift: float = 3.0,
        seed: int = 0, progress: bool = True, denoise: DenoiseFn | None = None, rules: SamplerRules | None = None,
        solver: str = "euler",
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1]; without a decoder, a preview of the latents.

        Each denoising step is a call of the model itself (compiled if the model was compiled in place, whose
        backend's sampler rules then apply), unless ``denoise`` replaces it (e.g. ``torch.compile(model.denoise,
        backend="flashu", options=...)``, with ``rules=flashu_compile.sampler_rules(options)``). ``guidance`` is
        the request's scale s0, 7.5 by default, which a relative schedule scales per call (see
        :func:`sampling.generate_latents`). ``solver``: "euler" (the official sampler) or "heun" (second
        order, two model calls per step; see :func:`sampling.integrate_cfg`).

        A prompt longer than the text budget (``config.max_text_len`` tokens) is cut, with a warning; a model whose
        text-to-image row (budget, image tokens, special tokens) exceeds ``config.llm.max_position_embeddings`` is
        a ValueError naming the limit.
        """
        from .codecs import preview
        from .sampling import generate_latents

        cfg = self.config
        check_t2i_fits(cfg.num_image_tokens, cfg.max_text_len, cfg.llm.max_position_embeddings)
        if denoise is None:
            # The model's own calls: compiled in place, with the rules of the compile's backend unless told otherwise.
            denoise = self._step("denoise")
            if rules is None:
                rules = getattr(self._compiled_call_impl, "sampler_rules", None)
        latents = generate_latents(self, self._require("tokenizer"), prompts, steps=steps, guidance=guidance,
                                   shift=shift, seed=seed, denoise=denoise, progress=progress, rules=rules,
                                   solver=solver)
        return self.codec.decode(latents) if self.codec is not None else preview(latents)

    def encode_image(self, image: Any) -> torch.Tensor:
        """A PIL image or an image tensor -> the model's latent (1, c, h, w), resized to the model's input size.

        The pixels are read by :func:`images.to_pixels`, which states the rules: every PIL mode and tensor
        dtype is read as the picture it holds (16-bit as 16-bit, transparency composited on white) or refused
        with a ValueError naming it; a float tensor must hold [0, 1], a uint8 one 0..255, a uint16 one
        0..65535; (1, H, W) and (H, W) tensors are grey; an empty image is refused.
        """
        import torch.nn.functional as F

        codec = self._require("codec")
        image = to_pixels(image)
        h, w = self.config.latent_size
        size = (h * codec.spatial_factor, w * codec.spatial_factor)
        if tuple(image.shape[-2:]) != size:
            image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        return codec.encode(image[None] * 2 - 1)

    @torch.no_grad()
    def answer(self, image, question: str, max_new_tokens: int = 300,
               entries: Mapping[str, Callable] | None = None) -> str:
        """Greedy answer to ``question`` (a non-empty str) about ``image``, decoded with a KV cache.

        ``image`` is read by :meth:`encode_image`. The chat template, the image's tokens, the question and
        ``max_new_tokens`` answer tokens must fit ``config.llm.max_position_embeddings``: a longer question is a
        ValueError naming how many tokens fit, not an answer from positions the model does not know.

        ``entries`` replaces the ``embed``, ``prefill`` and ``decode`` steps by name (compiled ones, as
        ``flashu_compile.compile_tasks`` gives them); without it, each step is a call of the model itself (compiled when
        the model was compiled in place), and a name it lacks runs eagerly.
        """
        from ...validate import check_int, check_text
        from .understanding import answer_tokens

        check_text("question", question)
        # The answer's positions must stay inside the LLM's rotary table.
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1, self.config.llm.max_position_embeddings)
        tokenizer = self._require("tokenizer")
        if entries is None:
            # prefill and decode take the model first, as the module-level functions of understanding do.
            entries = {"embed": self._step("embed"), "prefill": lambda model, *a: model(*a, step="prefill"),
                       "decode": lambda model, *a: model(*a, step="decode")}
        ids = answer_tokens(self, tokenizer, self.encode_image(image), question, max_new_tokens=max_new_tokens,
                            entries=entries)
        return tokenizer.decode(ids)
