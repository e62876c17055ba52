import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flashu_compile.files import write_checksums
from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.checkpoint import CheckpointError
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
    small_model.save_pretrained(tmp_path, format=fmt, max_shard_bytes=shard)
    files = os.listdir(tmp_path)
    if shard:
        assert any(f.endswith(".index.json") for f in files) and len(files) > 5
    loaded = Showo2.from_pretrained(tmp_path).attach(tokenizer=tokenizer)
    (la, va), (lb, vb) = outputs(small_model, tokenizer), outputs(loaded, tokenizer)
    assert torch.equal(la, lb) and torch.equal(va, vb)
    official = json.loads((tmp_path / "config.json").read_text())
    assert official["llm_model_path"] == "llm" and official["hidden_size"] == 32
    assert official["diffusion_head"]["hidden_size"] == 48


def test_load_in_bfloat16(tmp_path, small_model):
    small_model.save_pretrained(tmp_path)
    loaded = Showo2.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.showo.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert loaded.head_inv_freq.dtype == torch.float32


@pytest.fixture()
def saved(tmp_path, small_model):
    small_model.save_pretrained(tmp_path)
    return tmp_path


def official(folder: Path) -> Path:
    """``folder`` without its SHA256SUMS, as official checkpoints come: the loader's own checks are what
    meet a corrupt file."""
    (folder / "SHA256SUMS").unlink()
    return folder


def edit_weights(folder: Path, change):
    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(folder / "model.safetensors"))
    write_checksums(folder)  # as a tool that edits checkpoints would: the contents checks are what a load meets


def edit_config(folder: Path, change):
    cfg = json.loads((folder / "config.json").read_text())
    change(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    write_checksums(folder)


def test_missing_key_is_named(saved):
    edit_weights(saved, lambda s: s.pop("diffusion_head_a.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: diffusion_head_a\.1\.mlp\.up_proj\.weight"):
        Showo2.from_pretrained(saved)


def test_unexpected_key_is_named(saved):
    edit_weights(saved, lambda s: s.update({"diffusion_head_a.7.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: diffusion_head_a\.7\.mlp\.up_proj\.weight"):
        Showo2.from_pretrained(saved)


def test_wrong_shape_is_named(saved):
    edit_weights(saved, lambda s: s.update({"fusion_proj.3.weight": torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=r"fusion_proj\.3\.weight: checkpoint \(3, 3\) vs model \(32, 32\)"):
        Showo2.from_pretrained(saved)


def test_corrupt_safetensors(saved):
    official(saved)
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[:50])
    with pytest.raises(CheckpointError, match="corrupt or unreadable weight file .*model.safetensors"):
        Showo2.from_pretrained(saved)


def test_corrupt_bin(tmp_path, small_model):
    small_model.save_pretrained(tmp_path, format="bin")
    official(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or unreadable weight file .*pytorch_model.bin"):
        Showo2.from_pretrained(tmp_path)


def test_truncated_tensor_data_fails_before_returning(saved):
    # A valid header with truncated tensor bytes only shows when tensors are read.
    official(saved)
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError):
        Showo2.from_pretrained(saved)


def test_missing_shard(tmp_path, small_model):
    small_model.save_pretrained(tmp_path, max_shard_bytes=40_000)
    official(tmp_path)
    shard = sorted(tmp_path.glob("model-0000*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard\\(s\\) that do not exist: \\['{shard.name}'\\]"):
        Showo2.from_pretrained(tmp_path)


def test_no_weights(saved):
    official(saved)
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        Showo2.from_pretrained(saved)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Showo2.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        Showo2.from_pretrained(tmp_path)


def test_invalid_config_json(saved):
    official(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        Showo2.from_pretrained(saved)


def test_unresolvable_llm_path(saved):
    edit_config(saved, lambda c: c.update(llm_model_path="someone/unknown-llm"))
    with pytest.raises(CheckpointError, match="'someone/unknown-llm' is neither a local folder"):
        Showo2.from_pretrained(saved)


def test_llm_path_absolute_and_hub_preset(saved, tmp_path_factory):
    # An absolute folder works as well as a path relative to the checkpoint.
    edit_config(saved, lambda c: c.update(llm_model_path=str((saved / "llm").resolve())))
    assert Showo2.from_pretrained(saved).config.hidden_size == 32
    # A known hub id resolves to its built-in dimensions, which then disagree with these weights.
    edit_config(saved, lambda c: c.update(llm_model_path="Qwen/Qwen2.5-1.5B-Instruct"))
    with pytest.raises(CheckpointError, match="hidden_size 32 differs from the LLM width 1536"):
        Showo2.from_pretrained(saved)


def test_bad_diffusion_head_override(saved):
    edit_config(saved, lambda c: c["diffusion_head"].update(depth=3))
    with pytest.raises(CheckpointError, match=r"unknown diffusion_head key\(s\) \['depth'\]"):
        Showo2.from_pretrained(saved)
    edit_config(saved, lambda c: c["diffusion_head"].update(depth=None) or c["diffusion_head"].pop("depth"))
    edit_config(saved, lambda c: c["diffusion_head"].update(num_key_value_heads=3))
    with pytest.raises(CheckpointError, match="multiple of num_key_value_heads"):
        Showo2.from_pretrained(saved)


def test_diffusion_head_override_changes_dimensions(tmp_path, tokenizer):
    from tests.conftest import small_config

    model = Showo2.random(small_config(head_hidden_size=40, head_heads=2, head_kv_heads=1, head_dim=20,
                                       head_intermediate_size=56), seed=3)
    model.save_pretrained(tmp_path)
    head = json.loads((tmp_path / "config.json").read_text())["diffusion_head"]
    assert head == {"hidden_size": 40, "head_dim": 20, "intermediate_size": 56, "num_attention_heads": 2,
                    "num_key_value_heads": 1}
    loaded = Showo2.from_pretrained(tmp_path)
    assert loaded.diffusion_head_a[0].mlp.up_proj.weight.shape == (56, 40)


def test_tied_lm_head_may_be_present_or_absent(tmp_path, small_model):
    small_model.save_pretrained(tmp_path, format="bin")
    state = torch.load(tmp_path / "pytorch_model.bin")
    assert "showo.lm_head.weight" in state  # as torch.save of the official state dict writes it
    loaded = Showo2.from_pretrained(tmp_path)
    assert loaded.showo.lm_head.weight.data_ptr() == loaded.showo.model.embed_tokens.weight.data_ptr()


def _params_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("first, second", [({"max_shard_bytes": 40_000}, {}),
                                           ({"format": "bin", "max_shard_bytes": 40_000}, {}),
                                           ({}, {"format": "bin"}),
                                           ({"max_shard_bytes": 40_000}, {"max_shard_bytes": 20_000})])
def test_a_save_replaces_the_earlier_checkpoint_whole(tmp_path, small_model, first, second):
    """No index or shard of the earlier checkpoint is left for from_pretrained to read."""
    other = Showo2.random(small_model.config, seed=11)
    other.save_pretrained(str(tmp_path), **first)
    small_model.save_pretrained(str(tmp_path), **second)
    fresh = tmp_path.parent / "fresh"
    small_model.save_pretrained(str(fresh), **second)
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(fresh))
    assert _params_equal(Showo2.from_pretrained(str(tmp_path)), small_model)


def test_a_save_never_replaces_a_folder_with_other_files(tmp_path, small_model):
    small_model.save_pretrained(str(tmp_path))
    (tmp_path / "notes.txt").write_text("mine")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(CheckpointError, match=r"holds files that are not part of a Show-o2 checkpoint \(notes.txt\)"):
        small_model.save_pretrained(str(tmp_path), format="bin")
    assert sorted(os.listdir(tmp_path)) == before and (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path.parent / "a-file").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a folder"):
        small_model.save_pretrained(tmp_path.parent / "a-file")


def test_files_a_listing_covers_may_be_replaced(tmp_path, small_model):
    """A training log saved (and listed) with the weights is part of the checkpoint it belongs to."""
    small_model.save_pretrained(str(tmp_path))
    (tmp_path / "training.json").write_text("{}")
    write_checksums(tmp_path)
    small_model.save_pretrained(str(tmp_path))
    assert not (tmp_path / "training.json").exists()


@pytest.mark.parametrize("change, message", [
    (lambda f: (f / "model-00009-of-00009.safetensors").write_bytes(b"stale"), "does not list .*model-00009"),
    (lambda f: (f / "config.json").write_text((f / "config.json").read_text().replace("32", "33", 1)),
     "config.json does not match its SHA-256"),
    (lambda f: (f / "llm" / "config.json").unlink(), "is missing llm/config.json"),
    (lambda f: (f / "SHA256SUMS").write_text("not a listing\n"), "SHA256SUMS, line 1"),
])
def test_a_listed_folder_loads_only_as_listed(saved, change, message):
    change(saved)
    with pytest.raises(CheckpointError, match=message):
        Showo2.from_pretrained(saved)


def test_invalid_save_arguments_fail_before_writing(tmp_path, small_model):
    for bad in (0, -5, 2.5, True, "1"):
        with pytest.raises(ValueError, match="max_shard_bytes must be a positive integer"):
            small_model.save_pretrained(tmp_path / "out", max_shard_bytes=bad)
    assert not (tmp_path / "out").exists()
