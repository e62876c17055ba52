"""Reading and writing Show-o2 checkpoints in the official layout.

A checkpoint folder holds ``config.json`` (the official constructor arguments) and weights as
``pytorch_model.bin``, ``*.safetensors`` or shards listed by an ``*.index.json``. Every check —
sub-configs resolvable, keys complete, shapes right, files readable — happens before a model is
handed back, so a bad checkpoint never yields a half-loaded model.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen2Config, SiglipConfig, SiglipVisionConfig

from ...files import write_atomic
from .configuration import HUB_PRESETS, FlowHeadConfig, Showo2Config
from .modeling import Showo2
from .modules import llama3_inv_freq

CONFIG_NAME = "config.json"
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as Show-o2; the message names the problem."""


# --------------------------------------------------------------------------- configuration
def _resolve_sub_config(value: str, folder: Path, kind: str) -> Qwen2Config | SiglipVisionConfig:
    candidates = [Path(value)] if os.path.isabs(value) else [folder / value]
    for cand in candidates:
        cfg_file = cand / CONFIG_NAME
        if cfg_file.is_file():
            try:
                raw = json.loads(cfg_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{kind} config {cfg_file} is not valid JSON: {err}") from err
            model_type = raw.get("model_type")
            if kind == "llm":
                if model_type != "qwen2":
                    raise CheckpointError(f"{cfg_file}: model_type {model_type!r} is not a Qwen2 LLM")
                return Qwen2Config.from_pretrained(str(cand), local_files_only=True)
            if model_type == "siglip":
                return SiglipConfig.from_pretrained(str(cand), local_files_only=True).vision_config
            if model_type == "siglip_vision_model":
                return SiglipVisionConfig.from_pretrained(str(cand), local_files_only=True)
            raise CheckpointError(f"{cfg_file}: model_type {model_type!r} is not a SigLIP config")
    if value in HUB_PRESETS:
        return HUB_PRESETS[value]()
    raise CheckpointError(
        f"{kind} path {value!r} is neither a local folder with a config.json (looked in "
        f"{[str(c) for c in candidates]}) nor a known hub id ({sorted(HUB_PRESETS)}); without hub access "
        "the configuration must be available locally"
    )


def read_config(path: str | os.PathLike) -> Showo2Config:
    """Parse an official ``config.json`` and resolve the LLM and SigLIP configs it points to."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} does not exist")
    cfg_file = folder / CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in checkpoint folder {str(folder)!r}")
    try:
        raw: dict[str, Any] = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {err}") from err
    for key in ("llm_model_path", "hidden_size"):
        if key not in raw:
            raise CheckpointError(f"{cfg_file} lacks the required key {key!r}")
    llm = _resolve_sub_config(raw["llm_model_path"], folder, "llm")
    vision = _resolve_sub_config(raw.get("clip_pretrained_model_path", "google/siglip-so400m-patch14-384"),
                                 folder, "SigLIP")
    if raw["hidden_size"] != llm.hidden_size:
        raise CheckpointError(
            f"{cfg_file}: hidden_size {raw['hidden_size']} differs from the LLM width {llm.hidden_size}"
        )
    if raw.get("clip_latent_dim", vision.hidden_size) != vision.hidden_size:
        raise CheckpointError(
            f"{cfg_file}: clip_latent_dim {raw['clip_latent_dim']} differs from the SigLIP width {vision.hidden_size}"
        )
    try:
        head = FlowHeadConfig.from_overrides(raw.get("diffusion_head"))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{cfg_file}: {err}") from err
    known = {"llm_vocab_size", "llm_model_path", "image_latent_dim", "image_latent_height", "image_latent_width",
             "patch_size", "num_diffusion_layers", "add_time_embeds", "clip_pretrained_model_path",
             "hidden_size", "clip_latent_dim", "diffusion_head", "max_text_len", "latent_codec"}
    take = {k: raw[k] for k in known - {"hidden_size", "clip_latent_dim", "diffusion_head"} if k in raw}
    try:
        return Showo2Config(llm=llm, vision=vision, flow_head=head,
                            extra={k: v for k, v in raw.items() if k not in known}, **take)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{cfg_file}: {err}") from err


# --------------------------------------------------------------------------- weights
def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint, in load order."""
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index} is not a valid shard index: {err}") from err
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shard(s) that do not exist: {missing}")
            return [folder / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if found:
        return found
    raise CheckpointError(f"no weights in {str(folder)!r} (looked for {SAFE_INDEX}, {BIN_INDEX}, "
                          "model.safetensors, pytorch_model.bin, *.safetensors, *.bin)")


@contextlib.contextmanager
def _open_weights(file: Path) -> Iterator[dict[str, Any]]:
    """Yield a lazy name -> tensor-getter view of one weight file, wrapping read errors."""
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                yield {k: (lambda k=k: handle.get_tensor(k), tuple(handle.get_slice(k).get_shape()))
                       for k in handle.keys()}
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{file} does not hold a flat state dict of tensors")
            yield {k: (lambda v=v: v, tuple(v.shape)) for k, v in state.items()}
    except CheckpointError:
        raise
    except Exception as err:  # safetensors / pickle / zip errors all mean the same to a user
        raise CheckpointError(f"corrupt or unreadable weight file {file}: {type(err).__name__}: {err}") from err


def _list(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def load_showo2(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    tokenizer_path: str | os.PathLike | None = None,
    vae_path: str | os.PathLike | None = None,
) -> Showo2:
    """Load an official-layout Show-o2 checkpoint folder into a :class:`Showo2` (eval mode).

    ``tokenizer_path`` is a local Qwen2.5 tokenizer folder and ``vae_path`` a local diffusers
    Wan2.1 VAE folder; small models with a pixel codec need neither.
    """
    folder = Path(path)
    config = read_config(folder)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Showo2(config)  # shapes only: no memory, no init cost
    finally:
        torch.set_default_dtype(previous)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = bool(config.llm.tie_word_embeddings)
    files = weight_files(folder)

    # Pass 1: keys and shapes from headers (safetensors) or mmap (bin), nothing materialised.
    found: dict[str, tuple[int, ...]] = {}
    where: dict[str, Path] = {}
    for file in files:
        with _open_weights(file) as view:
            for key, (_, shape) in view.items():
                found[key], where[key] = shape, file
    optional = {"showo.lm_head.weight"} if tied else set()
    missing = sorted(set(expected) - set(found) - optional)
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_list(unexpected)}")
        raise CheckpointError(f"checkpoint {str(folder)!r} does not match the Show-o2 config: " + "; ".join(parts))
    wrong = [f"{k}: checkpoint {found[k]} vs model {expected[k]}" for k in sorted(found) if found[k] != expected[k]]
    if wrong:
        raise CheckpointError(f"checkpoint {str(folder)!r} has wrong shapes: {_list(wrong, 8)}")

    # Pass 2: allocate once in the target dtype and copy each tensor in.
    model = model.to_empty(device="cpu")
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for file in files:
            with _open_weights(file) as view:
                for key, (get, _) in view.items():
                    params[key].copy_(get())
        if tied:
            model.showo.tie_weights()
        _reset_buffers(model)
    model = model.eval()._attach_builtin()
    if tokenizer_path is not None:
        from .tokenizer import QwenTokenizer

        model.attach(tokenizer=QwenTokenizer(tokenizer_path))
    if vae_path is not None:
        from .codecs import WanVAECodec

        model.attach(codec=WanVAECodec(vae_path, dtype=dtype))
    return model


def _reset_buffers(model: Showo2) -> None:
    """Recompute the non-persistent rotary tables that meta construction left empty."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    model.head_inv_freq = llama3_inv_freq(model.config.flow_head)
    model.showo.model.rotary_emb = Qwen2RotaryEmbedding(model.config.llm)


# --------------------------------------------------------------------------- saving
def _sub_config_ref(cfg: Qwen2Config | SiglipVisionConfig, current: str, folder: Path, name: str) -> str:
    """Keep a hub id when the config is exactly that preset; otherwise write it next to the weights."""
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    if current in HUB_PRESETS:
        ref = HUB_PRESETS[current]()
        if all(getattr(ref, k) == getattr(cfg, k) for k in keys):
            return current
    (folder / name).mkdir(exist_ok=True)
    cfg.save_pretrained(str(folder / name))
    return name


def save_showo2(
    model: Showo2, path: str | os.PathLike, format: str = "safetensors", max_shard_bytes: int | None = None
) -> None:
    """Write ``model`` in the official layout (config.json + weights, optionally sharded)."""
    if format not in ("safetensors", "bin"):
        raise ValueError(f"format must be 'safetensors' or 'bin', got {format!r}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    official = config.official_dict()
    official["llm_model_path"] = _sub_config_ref(config.llm, config.llm_model_path, folder, "llm")
    official["clip_pretrained_model_path"] = _sub_config_ref(
        config.vision, config.clip_pretrained_model_path, folder, "siglip")

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if format == "safetensors" and config.llm.tie_word_embeddings:
        state.pop("showo.lm_head.weight")  # safetensors stores no aliases; the loader re-ties
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes

    ext = ".safetensors" if format == "safetensors" else ".bin"
    stem = "model" if format == "safetensors" else "pytorch_model"

    def writer(tensors: dict[str, torch.Tensor]):
        if format == "safetensors":
            return lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
        return lambda tmp: torch.save(tensors, tmp)

    if len(shards) == 1:
        write_atomic(folder / f"{stem}{ext}", writer(shards[0]))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"{stem}-{i:05d}-of-{len(shards):05d}{ext}"
            write_atomic(folder / name, writer(shard))
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": weight_map}
        write_atomic(folder / (SAFE_INDEX if format == "safetensors" else BIN_INDEX),
                      lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
    write_atomic(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(official, indent=2)))
