"""SceneTokenizer: no text is dropped; what is not in the vocabulary becomes <unk>, with a warning."""

import warnings

import pytest

from flashu_compile.models.showo2.tokenizer import SceneTokenizer


@pytest.mark.parametrize("text, pieces", [
    ("a red 🍎", ["🍎"]),  # emoji encoded to nothing before
    ("一个红色的圆", ["一个红色的圆"]),  # CJK likewise
    ("red café circle", ["café"]),  # was split into a known "caf" piece and a dropped "é"
    ("red-ish purple", ["-", "ish", "purple"]),
])
def test_unknown_words_and_symbols_become_unk_with_a_warning(tokenizer, text, pieces):
    with pytest.warns(UserWarning, match="encoded as <unk>") as record:
        ids = tokenizer.encode(text)
    assert str(pieces) in str(record[0].message)
    assert ids.count(tokenizer.unk_id) == len(pieces)
    assert all(i != tokenizer.unk_id for i in tokenizer.encode("red circle"))


def test_known_text_encodes_as_before_and_silently(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tokenizer.encode("Red circle, left of the blue square?\n<|im_end|>")
    assert tokenizer.decode(ids, skip_special_tokens=False) == "red circle, left of the blue square?\n<|im_end|>"


def test_the_unk_token_is_part_of_the_embedded_vocabulary():
    """<unk> was always a special token of the scenes vocabulary: encoding unknown text adds no id."""
    from flashu_compile.models.showo2 import Showo2

    scenes = SceneTokenizer()
    assert scenes.unk_id < len(scenes) == Showo2.default().config.llm_vocab_size
    with pytest.warns(UserWarning):
        assert max(scenes.encode("🙂 zebra")) < len(scenes)
