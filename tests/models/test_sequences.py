import warnings

import pytest
import torch

from flashu_compile.models.showo2.sequences import MASK_VALUE, mmu_row, omni_attention_mask, t2i_rows


def allowed(mask):
    return mask[:, 0] == 0


def test_omni_mask_is_causal_outside_spans_and_full_inside():
    positions = torch.tensor([[[2, 3]], [[0, 0]]])
    ok = allowed(omni_attention_mask(positions, 7))
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    # Row 1 has an empty span: plain causal.
    assert torch.equal(ok[1], causal)
    expected = causal.clone()
    expected[2:5, 2:5] = True  # bidirectional block over positions 2, 3, 4
    assert torch.equal(ok[0], expected)
    # Position 5 (after the span) sees all of it, position 1 (before) sees none of it.
    assert ok[0, 5, 2:5].all() and not ok[0, 1, 2:5].any()


def test_omni_mask_values_and_dtype():
    mask = omni_attention_mask(torch.tensor([[[1, 2]]]), 4, dtype=torch.float32)
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, MASK_VALUE}


def test_t2i_rows_layout(tokenizer):
    rows = t2i_rows(tokenizer, ["red circle", "blue"], num_image_tokens=4, max_text_len=5, guidance=True)
    tok = tokenizer
    assert rows.text_tokens.shape == (4, 5 + 4 + 5)
    # Conditional rows first, then one unconditional row per prompt.
    first = rows.text_tokens[0].tolist()
    assert first[:4] == [tok.bos_id, *tok.encode("red circle"), tok.boi_id]
    assert first[4:9] == [tok.img_pad_id] * 5
    assert first[9:11] == [tok.eoi_id, tok.eos_id] and first[11:] == [tok.pad_id] * 3
    uncond = rows.text_tokens[2].tolist()
    assert uncond[:2] == [tok.bos_id, tok.boi_id] and uncond[2:7] == [tok.img_pad_id] * 5
    assert rows.modality_positions[:, 0].tolist() == [[4, 5], [3, 5], [2, 5], [2, 5]]
    assert rows.time_positions.tolist() == [4, 3, 2, 2]
    assert torch.equal(rows.attention_mask, omni_attention_mask(rows.modality_positions, rows.seq_len))


def test_t2i_rows_truncate_long_prompts_with_a_warning(tokenizer):
    with pytest.warns(UserWarning, match=r"has 20 tokens but the text budget is 3: its last 17 token\(s\) are cut"):
        rows = t2i_rows(tokenizer, ["red " * 20], num_image_tokens=4, max_text_len=3, guidance=False)
    assert rows.text_tokens.shape == (1, 3 + 4 + 5)
    assert rows.modality_positions[0, 0].tolist() == [5, 5]


def test_mmu_row_reproduces_official_span_offset(tokenizer):
    row = mmu_row(tokenizer, "what colour is the circle?", num_image_tokens=4)
    tokens = row.text_tokens[0].tolist()
    time_pos = int(row.time_positions[0])
    assert tokens[time_pos - 1] == tokenizer.boi_id
    assert tokens[time_pos:time_pos + 5] == [tokenizer.img_pad_id] * 5
    assert tokens[time_pos + 5] == tokenizer.eoi_id
    # The official understanding script records the span one token after the time token.
    assert row.modality_positions[0, 0].tolist() == [time_pos + 1, 5]
    ok = allowed(row.attention_mask)[0]
    assert ok[time_pos + 1, time_pos + 5]  # image token sees eoi (inside the shifted span)
    assert not ok[time_pos, time_pos + 1]  # the time token stays causal


def test_a_prompt_within_the_budget_is_not_warned_about(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t2i_rows(tokenizer, ["red circle"], num_image_tokens=4, max_text_len=2, guidance=True)


@pytest.mark.parametrize("budget", [-5, 0, 2.5, True])
def test_t2i_rows_reject_a_bad_text_budget(tokenizer, budget):
    with pytest.raises(ValueError, match="max_text_len must be an int"):
        t2i_rows(tokenizer, ["red"], num_image_tokens=4, max_text_len=budget, guidance=False)
