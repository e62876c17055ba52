"""Outputs recorded from the official Show-o2 code at small dimensions (see fixtures/official_small/README.md)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.sampling import integrate_cfg, time_grid
from flashu_compile.models.showo2.sequences import Rows, mmu_row, t2i_rows
from flashu_compile.models.showo2.tokenizer import ASSISTANT_PREFIX, SYSTEM_PROMPT, USER_PREFIX
from flashu_compile.models.showo2.understanding import answer_tokens, prepare

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "official_small"
PROMPT, QUESTION = "a red circle on a box", "what is it?"


@pytest.fixture(scope="module")
def recorded():
    return load_file(str(FIXTURE / "expected.safetensors")), json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture(scope="module")
def model():
    return Showo2.from_pretrained(FIXTURE / "ckpt")


class RecordedIds:
    """Maps the strings the row builders encode to the ids the recording used."""

    def __init__(self, meta):
        ids = meta["special_ids"]
        self.pad_id, self.bos_id, self.eos_id = ids["pad_id"], ids["bos_id"], ids["eos_id"]
        self.boi_id, self.eoi_id, self.img_pad_id = ids["boi_id"], ids["eoi_id"], ids["img_pad_id"]
        mmu = meta["mmu"]
        self.table = {PROMPT: meta["t2i"]["prompt_ids"], "": [], SYSTEM_PROMPT: mmu["system_ids"],
                      USER_PREFIX: mmu["user_prefix_ids"], ASSISTANT_PREFIX: mmu["assistant_prefix_ids"],
                      QUESTION: mmu["question_ids"]}

    def encode(self, text):
        return list(self.table[text])

    def __len__(self):
        return 320


def assert_relative(actual, expected, tol=1e-4):
    err = ((actual - expected).norm() / expected.norm()).item()
    assert err < tol, f"relative error {err:.2e}"
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_rows_and_mask_match_official_builders(recorded):
    exp, meta = recorded
    rows = t2i_rows(RecordedIds(meta), [PROMPT], 16, meta["t2i"]["max_text_len"], guidance=True)
    assert torch.equal(rows.text_tokens, exp["t2i_text_tokens"])
    assert torch.equal(rows.modality_positions, exp["t2i_modality_positions"])
    assert torch.equal(rows.attention_mask, exp["t2i_attention_mask"])


@pytest.mark.parametrize("prefix", ["t2i", "grid6"])
def test_forward_matches_official(model, recorded, prefix):
    exp, _ = recorded
    with torch.no_grad():
        logits, v = model(exp[f"{prefix}_text_tokens"], image_latents=exp[f"{prefix}_image_latents"],
                          t=exp[f"{prefix}_t"], attention_mask=exp[f"{prefix}_attention_mask"],
                          modality_positions=exp[f"{prefix}_modality_positions"])
    assert_relative(logits, exp[f"{prefix}_logits"])
    assert_relative(v, exp[f"{prefix}_v_pred"])


def test_understanding_matches_official(model, recorded):
    exp, meta = recorded
    ids = RecordedIds(meta)
    row = mmu_row(ids, QUESTION, 16)
    assert torch.equal(row.modality_positions, exp["mmu_modality_positions"])
    assert torch.equal(row.attention_mask, exp["mmu_attention_mask"])
    with torch.no_grad():
        rows, embeds = prepare(model, ids, exp["mmu_image_latents"], QUESTION)
        logits = model.showo.lm_head(model.llm_hidden(embeds, rows.attention_mask))
    assert_relative(logits, exp["mmu_logits"])
    # The official loop (full recompute, top-1) and the cached greedy decoder agree token for token.
    assert answer_tokens(model, ids, exp["mmu_image_latents"], QUESTION, max_new_tokens=4) == \
        exp["mmu_greedy_tokens"].tolist()


def test_euler_steps_match_official_sampler(model, recorded):
    exp, meta = recorded
    euler = meta["euler"]
    rows = Rows(exp["t2i_text_tokens"], exp["t2i_modality_positions"], exp["t2i_attention_mask"],
                exp["t2i_modality_positions"][:, 0, 0])
    grid = time_grid(euler["num_inference_steps"], euler["time_shifting_factor"])
    torch.testing.assert_close(grid, exp["euler_time_grid"], rtol=1e-6, atol=1e-7)
    trajectory = exp["euler_trajectory"]  # (grid points, 1, c, h, w): the conditional half
    with torch.no_grad():
        for k in range(1, euler["num_inference_steps"]):
            x = integrate_cfg(model.denoise, rows, exp["euler_noise"], grid[: k + 1], euler["guidance_scale"],
                          progress=False)
            assert_relative(x, trajectory[k])
