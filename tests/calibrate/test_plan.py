"""Plan files (round trip, corruption, atomic replacement) and the permutation-invariant fingerprint."""

import copy
import json

import pytest
import torch

import flashu_compile.files as files_module
from flashu_compile.calibrate import Plan, PlanError, calibrate, ffn_signature, model_fingerprint
from flashu_compile.calibrate.plan import META_FILE, TENSORS_FILE, _meta_digest, decoder_layers, weight_digest
from flashu_compile.files import sha256_file
from flashu_compile.models.showo2 import Showo2

from ..conftest import small_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tokenizer):
    return Showo2.random(small_config(), seed=3).attach(tokenizer=tokenizer)


@pytest.fixture(scope="module")
def plan(model):
    return calibrate(model, multiple=8, steps=3, samples=2, progress=False)


@pytest.fixture
def saved(plan, tmp_path):
    return plan.save(tmp_path / "plans" / "small")


def _rewrite_tensors(folder, change):
    """Replace the stored tensors with ``change(tensors)`` and keep plan.json's digest in step, so the
    contents checks (not the digest check) are what a load meets."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / TENSORS_FILE))
    change(tensors)
    save_file(tensors, str(folder / TENSORS_FILE))
    meta = json.loads((folder / META_FILE).read_text())
    meta["tensors_sha256"] = sha256_file(folder / TENSORS_FILE)
    write_meta(folder, meta)


def write_meta(folder, meta):
    """Write ``meta`` as plan.json with its own digest in step, so the checks after the digest's are what a
    load meets."""
    meta["meta_sha256"] = _meta_digest(meta)
    (folder / META_FILE).write_text(json.dumps(meta))


def _permute_ffn(model, layer_index, perm):
    mlp = decoder_layers(model)[layer_index][1].mlp
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[perm])
        mlp.up_proj.weight.copy_(mlp.up_proj.weight[perm])
        mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])


# ----------------------------------------------------------------------------- files
def test_round_trip(plan, saved, model):
    assert sorted(p.name for p in saved.iterdir()) == [META_FILE, TENSORS_FILE]
    loaded = Plan.load(saved)
    assert loaded == plan
    assert loaded.keep["t2i"][0].dtype == torch.int64 and loaded.scores["mmu"][1].dtype == torch.float64
    assert Plan.load(str(saved), model=model) == plan
    assert loaded.settings["prune_ratio"] == 0.2 and loaded.settings["tokens"] == plan.settings["tokens"]


def test_load_with_another_model_fails(saved, tokenizer):
    other = Showo2.random(small_config(), seed=4).attach(tokenizer=tokenizer)
    with pytest.raises(PlanError, match="plan was calibrated for a different model: weights showo.model.embed_tokens"):
        Plan.load(saved, model=other)


def test_load_with_changed_non_ffn_weight_fails(saved, model):
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.showo.model.norm.weight[0] += 0.5
    with pytest.raises(PlanError, match=r"different model: weights showo.model.norm.weight differ \(values"):
        Plan.load(saved, model=changed)


def test_a_transposed_square_weight_is_another_model(saved, model):
    """A bad conversion that transposes a square weight keeps every sum of its values; the digest sees it."""
    changed = copy.deepcopy(model)
    q = changed.showo.model.layers[0].self_attn.q_proj.weight
    assert q.shape[0] == q.shape[1]
    with torch.no_grad():
        q.copy_(q.t().clone())
    with pytest.raises(PlanError, match=r"weights showo.model.layers.0.self_attn.q_proj.weight differ"):
        Plan.load(saved, model=changed)


def test_missing_files(saved, tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "nowhere")
    (saved / TENSORS_FILE).unlink()
    with pytest.raises(PlanError, match=f"missing {TENSORS_FILE}"):
        Plan.load(saved)


def test_truncated_safetensors(saved):
    data = (saved / TENSORS_FILE).read_bytes()
    (saved / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(PlanError, match="corrupt"):
        Plan.load(saved)


def test_garbage_safetensors_with_matching_digest(saved):
    (saved / TENSORS_FILE).write_bytes(b"\xff" * 64)
    meta = json.loads((saved / META_FILE).read_text())
    meta["tensors_sha256"] = sha256_file(saved / TENSORS_FILE)
    write_meta(saved, meta)
    with pytest.raises(PlanError, match="not a valid safetensors file"):
        Plan.load(saved)


def test_corrupt_json(saved):
    text = (saved / META_FILE).read_text()
    (saved / META_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(saved)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(version=99), "format version 99"),
    (lambda m: m.update(format="something"), "not a flashu plan"),
    (lambda m: m.pop("layer_paths"), "malformed"),
    (lambda m: m["intermediate_sizes"].__setitem__(0, 32), "expected 32 scores"),
])
def test_bad_metadata(saved, edit, message):
    meta = json.loads((saved / META_FILE).read_text())
    edit(meta)
    write_meta(saved, meta)
    with pytest.raises(PlanError, match=message):
        Plan.load(saved)


def _set(key, values):
    def change(tensors):
        tensors[key] = torch.tensor(values, dtype=torch.int64)

    return change


@pytest.mark.parametrize("change, message", [
    (_set("keep.t2i.0", list(range(47)) + [64]), "out of range"),
    (_set("keep.t2i.0", list(range(1, 48)) + [0]), "not sorted"),
    (_set("keep.mmu.1", list(range(47)) + [46]), "duplicates"),
    (_set("keep.mmu.1", list(range(40))), "40 kept neurons, but prune_ratio 0.2 and multiple 8 keep 48"),
    (lambda t: t.pop("scores.mmu.0"), "missing or bad entry"),
    (lambda t: t.update({"keep.vqa.0": torch.zeros(1, dtype=torch.int64)}), "unexpected tensors"),
])
def test_inconsistent_contents(saved, change, message):
    _rewrite_tensors(saved, change)
    with pytest.raises(PlanError, match=message):
        Plan.load(saved)


def test_save_refuses_an_inconsistent_plan(plan, tmp_path):
    bad = copy.copy(plan)
    bad.keep = {**plan.keep, "t2i": [plan.keep["t2i"][0].flip(0), plan.keep["t2i"][1]]}
    with pytest.raises(PlanError, match="sorted"):
        bad.save(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_failed_save_keeps_the_previous_plan(plan, saved, monkeypatch):
    other = copy.copy(plan)
    other.settings = {**plan.settings, "note": "second"}

    def crash(folder):
        assert (folder / TENSORS_FILE).is_file()  # mid-write: the new files exist, not yet in place
        raise OSError("disk full")

    monkeypatch.setattr(files_module, "_fsync_dir", crash)
    with pytest.raises(OSError, match="disk full"):
        other.save(saved)
    assert Plan.load(saved) == plan
    assert sorted(p.name for p in saved.parent.iterdir()) == ["small"]  # no temporary directory left


def test_failed_rename_restores_the_previous_plan(plan, saved, monkeypatch):
    real_replace = files_module.os.replace
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new plan moving into place, after the old one moved aside
            raise OSError("rename failed")
        return real_replace(src, dst)

    other = copy.copy(plan)
    other.settings = {**plan.settings, "note": "second"}
    monkeypatch.setattr(files_module.os, "replace", flaky)
    with pytest.raises(OSError, match="rename failed"):
        other.save(saved)
    monkeypatch.undo()
    assert len(calls) == 3  # aside, failed, moved back
    assert Plan.load(saved) == plan
    assert sorted(p.name for p in saved.parent.iterdir()) == ["small"]
    other.save(saved)  # and a normal save still replaces it
    assert Plan.load(saved).settings["note"] == "second"


def test_save_refuses_to_replace_other_directories(plan, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(PlanError, match="not a plan directory"):
        plan.save(tmp_path / "data")
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- fingerprint
def test_fingerprint_invariant_under_ffn_permutation_but_not_weight_changes(model, plan):
    permuted = copy.deepcopy(model)
    for i in range(len(decoder_layers(permuted))):
        _permute_ffn(permuted, i, torch.randperm(64, generator=torch.Generator().manual_seed(i)))
    embeds = torch.randn(1, 5, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(permuted.llm_hidden(embeds, None), model.llm_hidden(embeds, None))
    assert not torch.equal(decoder_layers(permuted)[0][1].mlp.gate_proj.weight,
                           decoder_layers(model)[0][1].mlp.gate_proj.weight)
    assert model_fingerprint(permuted) == model_fingerprint(model) == plan.fingerprint
    plan.verify_model(permuted)

    with torch.no_grad():
        decoder_layers(permuted)[1][1].mlp.up_proj.weight[3, 2] += 1e-3
    assert model_fingerprint(permuted) != plan.fingerprint
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.diffusion_head_b.linear.weight[0, 0] *= 2
    assert model_fingerprint(other) != plan.fingerprint


def test_ffn_signature_is_permutation_invariant():
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(96, 16, generator=g), torch.randn(96, 16, generator=g)
    down = torch.randn(16, 96, generator=g)
    perm = torch.randperm(96, generator=g)
    sig = ffn_signature(gate, up, down)
    assert len(sig) == 3
    assert ffn_signature(gate[perm], up[perm], down[:, perm]) == sig
    assert ffn_signature(gate.clone(), up.clone(), down.clone()) == sig  # bytes, not tensor identity
    assert ffn_signature(gate, up * 1.001, down)[1] != sig[1]
    swapped = gate.clone()
    swapped[0, :2] = gate[0, :2].flip(0)  # two values of one neuron swapped: the same sums, another weight
    assert ffn_signature(swapped, up, down)[0] != sig[0]
    assert ffn_signature(gate.half(), up, down)[0] != sig[0]


def test_a_weight_digest_follows_in_place_changes():
    w = torch.randn(8, 8)
    before = weight_digest(w)
    with torch.no_grad():
        w[3, 3] += 1
    assert weight_digest(w) != before


def test_verify_layer(model, plan):
    mlp = decoder_layers(model)[1][1].mlp
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    perm = torch.randperm(64)
    plan.verify_layer(1, gate[perm], up[perm], down[:, perm])
    with pytest.raises(PlanError, match="layer showo.model.layers.1: FFN weights down_proj differ"):
        plan.verify_layer(1, gate, up, down * 1.01)
    with pytest.raises(PlanError, match="layer showo.model.layers.0: FFN weights gate_proj, up_proj, down_proj"):
        plan.verify_layer(0, gate, up, down)  # another layer's weights
    with pytest.raises(PlanError, match="64 FFN neurons"):
        plan.verify_layer(1, gate[:48], up[:48], down[:, :48])
    with pytest.raises(PlanError, match="no layer 5"):
        plan.verify_layer(5, gate, up, down)


def test_summary(plan):
    line = plan.summary()
    assert "\n" not in line
    assert "2 layers (FFN 64)" in line and "t2i keeps 96/128" in line and "Jaccard" in line
    assert plan.fingerprint[:12] in line
