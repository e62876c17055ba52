"""Text against the LLM's positions: a question or a text-to-image row that does not fit
``max_position_embeddings`` is a ValueError naming the limit, never an answer from positions the model
does not know."""

import re

import pytest
import torch

from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.sequences import check_t2i_fits, mmu_row, t2i_rows
from tests.conftest import small_config

IMAGE = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))


def template_tokens(tokenizer, num_image_tokens: int) -> int:
    """Positions an understanding row takes besides its question."""
    return mmu_row(tokenizer, "red", num_image_tokens).seq_len - len(tokenizer.encode("red"))


def model_with_positions(tokenizer, positions: int) -> Showo2:
    return Showo2.random(small_config(max_position_embeddings=positions), seed=1).attach(tokenizer=tokenizer)


def test_mmu_row_takes_the_longest_question_that_fits_and_names_the_limit(tokenizer):
    fixed = template_tokens(tokenizer, 4)
    limit, answer = fixed + 10, 3
    fits = mmu_row(tokenizer, "red " * 7, 4, max_positions=limit, max_new_tokens=answer)
    assert fits.seq_len + answer == limit
    message = (f"question has 8 tokens but at most 7 fit: the model has {limit} positions (max_position_embeddings), "
               f"the chat template and the image take {fixed} and the answer (max_new_tokens) {answer}")
    with pytest.raises(ValueError, match=re.escape(message)):
        mmu_row(tokenizer, "red " * 8, 4, max_positions=limit, max_new_tokens=answer)
    # Without a limit the row is built as before (the official layout has none).
    assert mmu_row(tokenizer, "red " * 8, 4).seq_len == fits.seq_len + 1


def test_answer_refuses_a_question_longer_than_the_positions_and_serves_one_that_fits(tokenizer):
    fixed = template_tokens(tokenizer, small_config().num_image_tokens)
    model = model_with_positions(tokenizer, fixed + 3 + 4)  # a 3-token question and a 4-token answer
    assert isinstance(model.answer(IMAGE, "red red red", max_new_tokens=4), str)
    with pytest.raises(ValueError, match=r"question has 4 tokens but at most 3 fit: the model has \d+ positions"):
        model.answer(IMAGE, "red red red red", max_new_tokens=4)
    with pytest.raises(ValueError, match=r"question has 3 tokens but at most 2 fit: .* \(max_new_tokens\) 5"):
        model.answer(IMAGE, "red red red", max_new_tokens=5)


def test_the_embedded_model_refuses_a_question_beyond_its_positions():
    """Such a question used to be answered, from positions the model was never trained on."""
    model = Showo2.default()
    limit = model.config.llm.max_position_embeddings
    question = "what colour is the circle? " * (limit // 6 + 1)
    with pytest.raises(ValueError, match=rf"question has \d+ tokens but at most \d+ fit: the model has {limit} "
                                         r"positions \(max_position_embeddings\)"):
        model.answer(IMAGE, question, max_new_tokens=8)


def test_t2i_rows_are_as_long_as_check_t2i_fits_counts(tokenizer):
    rows = t2i_rows(tokenizer, ["red circle"], num_image_tokens=4, max_text_len=5, guidance=True)
    check_t2i_fits(4, 5, rows.seq_len)
    with pytest.raises(ValueError, match=re.escape(f"a text-to-image row needs {rows.seq_len} positions (a text "
                                                   f"budget of 5 tokens, 5 time and image tokens, 4 special tokens) "
                                                   f"but the model has {rows.seq_len - 1} (max_position_embeddings)")):
        check_t2i_fits(4, 5, rows.seq_len - 1)


def test_generate_images_refuses_a_row_beyond_the_positions(tokenizer):
    cfg = small_config()
    length = cfg.max_text_len + cfg.num_image_tokens + 5
    assert model_with_positions(tokenizer, length).generate_images("red", steps=2, progress=False).shape[0] == 1
    with pytest.raises(ValueError, match=rf"needs {length} positions .* has {length - 1} \(max_position_embeddings\)"):
        model_with_positions(tokenizer, length - 1).generate_images("red", steps=2, progress=False)
