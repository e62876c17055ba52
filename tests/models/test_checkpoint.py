import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.checkpoint import CheckpointError, load_showo2, save_showo2
from flashu_compile.models.showo2.sequences import t2i_rows


def outputs(model, tokenizer):
    rows = t2i_rows(tokenizer, ["red circle left of blue square"], model.config.num_image_tokens,
                    model.config.max_text_len, guidance=True)
    gen = torch.Generator().manual_seed(0)
    lat = torch.randn(1, model.config.image_latent_dim, *model.config.latent_size, generator=gen).repeat(2, 1, 1, 1)
    return model(rows.text_tokens, image_latents=lat, t=torch.tensor([0.3, 0.3]),
                 attention_mask=rows.attention_mask, modality_positions=rows.modality_positions)


@pytest.mark.parametrize("fmt, shard", [("safetensors", None), ("bin", None), ("safetensors", 40_000),
                                        ("bin", 40_000)])
def test_round_trip_gives_identical_outputs(tmp_path, small_model, tokenizer, fmt, shard):
    save_showo2(small_model, tmp_path, format=fmt, max_shard_bytes=shard)
    files = os.listdir(tmp_path)
    if shard:
        assert any(f.endswith(".index.json") for f in files) and len(files) > 5
    loaded = load_showo2(tmp_path).attach(tokenizer=tokenizer)
    (la, va), (lb, vb) = outputs(small_model, tokenizer), outputs(loaded, tokenizer)
    assert torch.equal(la, lb) and torch.equal(va, vb)
    official = json.loads((tmp_path / "config.json").read_text())
    assert official["llm_model_path"] == "llm" and official["hidden_size"] == 32
    assert official["diffusion_head"]["hidden_size"] == 48


def test_load_in_bfloat16(tmp_path, small_model):
    save_showo2(small_model, tmp_path)
    loaded = load_showo2(tmp_path, dtype=torch.bfloat16)
    assert loaded.showo.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert loaded.head_inv_freq.dtype == torch.float32


@pytest.fixture()
def saved(tmp_path, small_model):
    save_showo2(small_model, tmp_path)
    return tmp_path


def edit_weights(folder: Path, change):
    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(folder / "model.safetensors"))


def edit_config(folder: Path, change):
    cfg = json.loads((folder / "config.json").read_text())
    change(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_key_is_named(saved):
    edit_weights(saved, lambda s: s.pop("diffusion_head_a.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: diffusion_head_a\.1\.mlp\.up_proj\.weight"):
        load_showo2(saved)


def test_unexpected_key_is_named(saved):
    edit_weights(saved, lambda s: s.update({"diffusion_head_a.7.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: diffusion_head_a\.7\.mlp\.up_proj\.weight"):
        load_showo2(saved)


def test_wrong_shape_is_named(saved):
    edit_weights(saved, lambda s: s.update({"fusion_proj.3.weight": torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=r"fusion_proj\.3\.weight: checkpoint \(3, 3\) vs model \(32, 32\)"):
        load_showo2(saved)


def test_corrupt_safetensors(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[:50])
    with pytest.raises(CheckpointError, match="corrupt or unreadable weight file .*model.safetensors"):
        load_showo2(saved)


def test_corrupt_bin(tmp_path, small_model):
    save_showo2(small_model, tmp_path, format="bin")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or unreadable weight file .*pytorch_model.bin"):
        load_showo2(tmp_path)


def test_truncated_tensor_data_fails_before_returning(saved):
    # A valid header with truncated tensor bytes only shows when tensors are read.
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError):
        load_showo2(saved)


def test_missing_shard(tmp_path, small_model):
    save_showo2(small_model, tmp_path, max_shard_bytes=40_000)
    shard = sorted(tmp_path.glob("model-0000*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard\\(s\\) that do not exist: \\['{shard.name}'\\]"):
        load_showo2(tmp_path)


def test_no_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        load_showo2(saved)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_showo2(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_showo2(tmp_path)


def test_invalid_config_json(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_showo2(saved)


def test_unresolvable_llm_path(saved):
    edit_config(saved, lambda c: c.update(llm_model_path="someone/unknown-llm"))
    with pytest.raises(CheckpointError, match="'someone/unknown-llm' is neither a local folder"):
        load_showo2(saved)


def test_llm_path_absolute_and_hub_preset(saved, tmp_path_factory):
    # An absolute folder works as well as a path relative to the checkpoint.
    edit_config(saved, lambda c: c.update(llm_model_path=str((saved / "llm").resolve())))
    assert load_showo2(saved).config.hidden_size == 32
    # A known hub id resolves to its built-in dimensions, which then disagree with these weights.
    edit_config(saved, lambda c: c.update(llm_model_path="Qwen/Qwen2.5-1.5B-Instruct"))
    with pytest.raises(CheckpointError, match="hidden_size 32 differs from the LLM width 1536"):
        load_showo2(saved)


def test_bad_diffusion_head_override(saved):
    edit_config(saved, lambda c: c["diffusion_head"].update(depth=3))
    with pytest.raises(CheckpointError, match=r"unknown diffusion_head key\(s\) \['depth'\]"):
        load_showo2(saved)
    edit_config(saved, lambda c: c["diffusion_head"].update(depth=None) or c["diffusion_head"].pop("depth"))
    edit_config(saved, lambda c: c["diffusion_head"].update(num_key_value_heads=3))
    with pytest.raises(CheckpointError, match="multiple of num_key_value_heads"):
        load_showo2(saved)


def test_diffusion_head_override_changes_dimensions(tmp_path, tokenizer):
    from tests.conftest import small_config

    model = Showo2.random(small_config(head_hidden_size=40, head_heads=2, head_kv_heads=1, head_dim=20,
                                       head_intermediate_size=56), seed=3)
    save_showo2(model, tmp_path)
    head = json.loads((tmp_path / "config.json").read_text())["diffusion_head"]
    assert head == {"hidden_size": 40, "head_dim": 20, "intermediate_size": 56, "num_attention_heads": 2,
                    "num_key_value_heads": 1}
    loaded = load_showo2(tmp_path)
    assert loaded.diffusion_head_a[0].mlp.up_proj.weight.shape == (56, 40)


def test_tied_lm_head_may_be_present_or_absent(tmp_path, small_model):
    save_showo2(small_model, tmp_path, format="bin")
    state = torch.load(tmp_path / "pytorch_model.bin")
    assert "showo.lm_head.weight" in state  # as torch.save of the official state dict writes it
    loaded = load_showo2(tmp_path)
    assert loaded.showo.lm_head.weight.data_ptr() == loaded.showo.model.embed_tokens.weight.data_ptr()
