"""Reading and writing Show-o2 checkpoints in the official layout.

A checkpoint folder holds ``config.json`` (the official constructor arguments) and weights as
``pytorch_model.bin``, ``*.safetensors`` or shards listed by an ``*.index.json``. Every check —
sub-configs resolvable, keys complete, shapes right, files readable — happens before a model is
handed back, so a bad checkpoint never yields a half-loaded model.

A folder written by :func:`save_showo2` is written whole: the new checkpoint replaces the folder,
so no index or shard of an earlier checkpoint is left to be read with it. It also lists every
file with its SHA-256 in ``SHA256SUMS``; a folder with that listing loads only if every file in it
is listed and matches, so a corrupt, truncated, missing or added file is an error, never other weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import Qwen2Config, SiglipConfig, SiglipVisionConfig

from ...files import CHECKSUMS, read_checksums, replacing_dir, sha256_file, write_checksums
from .configuration import HUB_PRESETS, FlowHeadConfig, Showo2Config
from .modules import llama3_inv_freq

CONFIG_NAME = "config.json"
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

M = TypeVar("M", bound=nn.Module)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as Show-o2; the message names the problem."""


# --------------------------------------------------------------------------- configuration
def _resolve_sub_config(value: str, folder: Path, kind: str) -> Qwen2Config | SiglipVisionConfig:
    if not isinstance(value, str) or not value:
        raise CheckpointError(f"{folder / CONFIG_NAME}: the {kind} path must be a non-empty string, got {value!r}")
    candidates = [Path(value)] if os.path.isabs(value) else [folder / value]
    for cand in candidates:
        cfg_file = cand / CONFIG_NAME
        if cfg_file.is_file():
            raw = _read_json(cfg_file, f"{kind} config")
            model_type = raw.get("model_type")
            if kind == "llm" and model_type != "qwen2":
                raise CheckpointError(f"{cfg_file}: model_type {model_type!r} is not a Qwen2 LLM")
            if kind != "llm" and model_type not in ("siglip", "siglip_vision_model"):
                raise CheckpointError(f"{cfg_file}: model_type {model_type!r} is not a SigLIP config")
            try:
                if kind == "llm":
                    return Qwen2Config.from_pretrained(str(cand), local_files_only=True)
                if model_type == "siglip":
                    return SiglipConfig.from_pretrained(str(cand), local_files_only=True).vision_config
                return SiglipVisionConfig.from_pretrained(str(cand), local_files_only=True)
            except (TypeError, ValueError, AttributeError, LookupError, StrictDataclassError) as err:
                # transformers checks a config's values in its own ways; to a user they all mean one thing
                raise CheckpointError(f"{cfg_file} is not a valid {kind} config: {type(err).__name__}: {err}") from err
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
    raw = _read_json(cfg_file, "config")
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


def _read_json(file: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``file``; anything else (bad bytes, bad JSON, another type) is a CheckpointError."""
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{what} {file} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{what} {file} must hold a JSON object, not {type(raw).__name__}")
    return raw


# --------------------------------------------------------------------------- weights
def weight_map(folder: Path) -> dict[str, str] | None:
    """``{key: shard file name}`` from the folder's shard index, or None if it has no index."""
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.is_file():
            mapping = _read_json(index, "shard index").get("weight_map")
            if not isinstance(mapping, dict) or not mapping or not all(
                    isinstance(v, str) and v and Path(v).name == v and v not in (".", "..") for v in mapping.values()):
                raise CheckpointError(f"{index} is not a valid shard index: 'weight_map' must map each key to the "
                                      "name of a file in the folder")
            return mapping
    return None


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint, in load order."""
    mapping = weight_map(folder)
    if mapping is not None:
        single = [name for name in ("model.safetensors", "pytorch_model.bin") if (folder / name).is_file()]
        if single:
            raise CheckpointError(f"{str(folder)!r} holds both a shard index and {single[0]}: one of them is stale")
        shards = sorted(set(mapping.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"the shard index of {str(folder)!r} lists shard(s) that do not exist: {missing}")
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


def verify_checksums(folder: Path) -> bool:
    """If ``folder`` has a ``SHA256SUMS``, check that it lists every file in the folder (hidden ones
    aside) and that each matches its digest; True if it was checked, False if there is no listing.

    Raises :class:`CheckpointError` naming the first missing, unlisted or mismatching file.
    """
    try:
        listed = read_checksums(folder)
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    if listed is None:
        return False
    present = {f.relative_to(folder).as_posix() for f in folder.rglob("*")
               if f.is_file() and f.name != CHECKSUMS and not any(part.startswith(".") for part in
                                                                     f.relative_to(folder).parts)}
    if unlisted := sorted(present - set(listed)):
        raise CheckpointError(f"{str(folder)!r} holds files its {CHECKSUMS} does not list (stale or added later): "
                              f"{_list(unlisted)}")
    for name, digest in listed.items():
        if name not in present:
            raise CheckpointError(f"{str(folder)!r} is missing {name}, which its {CHECKSUMS} lists")
        if sha256_file(folder / name) != digest:
            raise CheckpointError(f"{folder / name} does not match its SHA-256 in {CHECKSUMS} (corrupt or changed)")
    return True


def _list(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def load_showo2(
    model_class: type[M],
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    tokenizer_path: str | os.PathLike | None = None,
    vae_path: str | os.PathLike | None = None,
) -> M:
    """Load an official-layout Show-o2 checkpoint folder into a ``model_class`` (eval mode); the class is
    given by ``Showo2.from_pretrained``, which this module stays below.

    ``tokenizer_path`` is a local Qwen2.5 tokenizer folder and ``vae_path`` a local diffusers
    Wan2.1 VAE folder; small models with a pixel codec need neither.
    """
    folder = Path(path)
    if folder.is_dir():
        verify_checksums(folder)
    config = read_config(folder)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_class(config)  # shapes only: no memory, no init cost
    except (TypeError, ValueError, ArithmeticError, AttributeError, LookupError, RuntimeError) as err:
        # A config value the modules cannot be built from (an unknown activation, a negative size).
        raise CheckpointError(f"{folder / CONFIG_NAME} does not describe a buildable model: "
                              f"{type(err).__name__}: {err}") from err
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
                if key in where:
                    raise CheckpointError(f"{key} is in both {where[key].name} and {file.name}: which one is stale?")
                found[key], where[key] = shape, file
    mapping = weight_map(folder)
    if mapping is not None:
        # A shard that holds other keys than the index says is from another save.
        stray = sorted(k for k in set(mapping) | set(where) if mapping.get(k) != getattr(where.get(k), "name", None))
        if stray:
            raise CheckpointError(f"the shard index of {str(folder)!r} and its shards disagree on: "
                                  + _list([f"{k} (index {mapping.get(k)}, found in "
                                           f"{getattr(where.get(k), 'name', None)})" for k in stray], 4))
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


def _reset_buffers(model: nn.Module) -> None:
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


_SHARD = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")
_WRITTEN = {CONFIG_NAME, CHECKSUMS, SAFE_INDEX, BIN_INDEX, "model.safetensors", "pytorch_model.bin",
            f"llm/{CONFIG_NAME}", f"siglip/{CONFIG_NAME}"}


def _check_replaceable(folder: Path) -> None:
    """Refuse to replace ``folder`` unless it is empty or holds only a checkpoint: files :func:`save_showo2`
    writes, and files its ``SHA256SUMS`` lists (say a training log saved with the weights)."""
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir() or folder.is_symlink():
        raise CheckpointError(f"{str(folder)!r} exists and is not a folder; refusing to replace it")
    try:
        listed = set(read_checksums(folder) or ())
    except ValueError:
        listed = set()
    names = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))]
    foreign = [n for n in names if n not in _WRITTEN | listed | {"llm", "siglip"} and not _SHARD.fullmatch(n)]
    if foreign:
        raise CheckpointError(f"{str(folder)!r} holds files that are not part of a Show-o2 checkpoint "
                              f"({_list(foreign)}); refusing to replace it: save into a new or empty folder")


def save_showo2(
    model: nn.Module, path: str | os.PathLike, format: str = "safetensors", max_shard_bytes: int | None = None
) -> None:
    """Write ``model`` in the official layout (config.json + weights, optionally sharded) plus ``SHA256SUMS``.

    The folder is written whole (:func:`files.replacing_dir`): an existing checkpoint in ``path`` is
    replaced, not overwritten file by file, and a failed save leaves it as it was. A folder holding
    anything else is refused (:class:`CheckpointError`) before any work, so no user file is deleted.
    """
    if format not in ("safetensors", "bin"):
        raise ValueError(f"format must be 'safetensors' or 'bin', got {format!r}")
    if max_shard_bytes is not None and (isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int)
                                        or max_shard_bytes < 1):
        raise ValueError(f"max_shard_bytes must be a positive integer or None, got {max_shard_bytes!r}")
    target = Path(path)
    _check_replaceable(target)
    config = model.config
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

    def write(tensors: dict[str, torch.Tensor], file: Path) -> None:
        if format == "safetensors":
            save_file(tensors, file, metadata={"format": "pt"})
        else:
            torch.save(tensors, file)

    with replacing_dir(target) as folder:
        official = config.official_dict()
        official["llm_model_path"] = _sub_config_ref(config.llm, config.llm_model_path, folder, "llm")
        official["clip_pretrained_model_path"] = _sub_config_ref(
            config.vision, config.clip_pretrained_model_path, folder, "siglip")
        if len(shards) == 1:
            write(shards[0], folder / f"{stem}{ext}")
        else:
            mapping = {}
            for i, shard in enumerate(shards, 1):
                name = f"{stem}-{i:05d}-of-{len(shards):05d}{ext}"
                write(shard, folder / name)
                mapping.update(dict.fromkeys(shard, name))
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": mapping}
            (folder / (SAFE_INDEX if format == "safetensors" else BIN_INDEX)).write_text(json.dumps(index, indent=2))
        (folder / CONFIG_NAME).write_text(json.dumps(official, indent=2))
        write_checksums(folder)
