"""Tokenizers with Show-o2's special-token roles.

Real checkpoints use the Qwen2.5 tokenizer from a local folder, extended the way the official
code extends it. The embedded default model uses :class:`SceneTokenizer`, a word-level
tokenizer over the synthetic-scenes vocabulary with the same special tokens and roles.
"""

from __future__ import annotations

import os
import re
import reprlib
from typing import Protocol

from ...validate import warn_user

# Roles as the official Qwen2.5 setup assigns them.
BOS = "<|im_start|>"
EOS = "<|im_end|>"
BOI = "<|vision_start|>"
EOI = "<|vision_end|>"
IMG_PAD = "<|image_pad|>"
PAD = "[PAD]"
# Tokens the official code adds to the Qwen vocabulary (besides [PAD]).
SHOWO2_ADDED = ("<image>", "<|vid_start|>", "<|vid_end|>")

SYSTEM_PROMPT = "system\nYou are a helpful assistant.<|im_end|>"
USER_PREFIX = "\n<|im_start|>user\n"
ASSISTANT_PREFIX = "\n<|im_start|>assistant\n"


class Showo2Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    boi_id: int
    eoi_id: int
    img_pad_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def __len__(self) -> int: ...


# Every word of the synthetic scenes' captions, questions and answers, frozen with the embedded weights: a word's
# position here fixes its token id, so the order never changes (tests/scenes checks the dataset uses exactly these).
SCENE_WORDS = ("a", "the", "is", "are", "there", "what", "colour", "shape", "object", "objects", "how", "many",
               "yes", "no", "left", "right", "of", "above", "below", "zero", "one", "two", "three",
               "red", "green", "blue", "yellow", "circle", "square", "triangle", "circles", "squares", "triangles")


class SceneTokenizer:
    """Word-level tokenizer for the embedded model: special tokens, newline, punctuation, words."""

    SPECIALS = (PAD, BOS, EOS, BOI, EOI, IMG_PAD, *SHOWO2_ADDED, "<unk>")
    PUNCTUATION = ("\n", ".", ",", "?", "!", "'", ":")
    CHAT_WORDS = ("system", "you", "are", "a", "helpful", "assistant", "user")
    # Every character but whitespace lands in some piece: letters and digits of any script form words,
    # any other symbol (an emoji, a dash) is a piece of its own. Pieces outside the vocabulary become <unk>.
    _split = re.compile(r"(<\|[a-z_]+\|>|\[PAD\]|<image>|<unk>|\n|[.,?!':]|[^\W_]+|\S)")

    def __init__(self, words: list[str] | tuple[str, ...] = SCENE_WORDS) -> None:
        ordered = list(dict.fromkeys([*self.SPECIALS, *self.PUNCTUATION, *self.CHAT_WORDS,
                                      *(w.lower() for w in words)]))
        self.id_to_token = ordered
        self.token_to_id = {tok: i for i, tok in enumerate(ordered)}
        self.special_ids = {self.token_to_id[t] for t in self.SPECIALS}
        self.bos_id, self.eos_id = self.token_to_id[BOS], self.token_to_id[EOS]
        self.boi_id, self.eoi_id = self.token_to_id[BOI], self.token_to_id[EOI]
        self.img_pad_id, self.pad_id = self.token_to_id[IMG_PAD], self.token_to_id[PAD]
        self.unk_id = self.token_to_id["<unk>"]

    def __len__(self) -> int:
        return len(self.id_to_token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; words and symbols outside the vocabulary become ``<unk>``, with a warning."""
        ids, unknown = [], []
        for piece in self._split.findall(text):
            key = piece if piece in self.token_to_id else piece.lower()
            if key not in self.token_to_id:
                unknown.append(piece)
            ids.append(self.token_to_id.get(key, self.unk_id))
        if unknown:
            warn_user(f"{len(unknown)} piece(s) of {reprlib.repr(text)} are not in the scenes vocabulary and "
                      f"are encoded as <unk>: {list(dict.fromkeys(unknown))}")
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out = ""
        for i in ids:
            if skip_special_tokens and i in self.special_ids:
                continue
            tok = self.id_to_token[i]
            glue = out == "" or out.endswith("\n") or tok in self.PUNCTUATION
            out += tok if glue else " " + tok
        return out


class QwenTokenizer:
    """A local Qwen2.5 tokenizer folder, extended exactly like the official Show-o2 code."""

    def __init__(self, path: str | os.PathLike) -> None:
        from transformers import AutoTokenizer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist")
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        tok.add_special_tokens({"pad_token": PAD})
        for added in SHOWO2_ADDED:
            tok.add_tokens(added)
        vocab = tok.get_vocab()
        missing = [t for t in (BOS, BOI, EOI, IMG_PAD) if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer at {str(path)!r} lacks Show-o2 special tokens {missing}")
        self._tok = tok
        self.bos_id, self.eos_id = vocab[BOS], tok.eos_token_id
        self.boi_id, self.eoi_id = vocab[BOI], vocab[EOI]
        self.img_pad_id, self.pad_id = vocab[IMG_PAD], tok.pad_token_id

    def __len__(self) -> int:
        return len(self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
