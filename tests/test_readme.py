"""Every Python snippet of the README runs, in order, in one namespace, as a reader pasting them would run them.

What the README leaves to the reader (a transformers causal LM ``lm``, its ``tokenizer`` and a prompt's
``input_ids``) is given fresh to each snippet that names it: a small random Qwen2 of six layers (so the default
``skip_ratio`` 0.2 skips one) and a character tokenizer. The options the snippets write are used as written,
except that a snippet naming no lowering gets the eager one: the rewritten graphs run as they are, where
Inductor's C++ build would take minutes on a CI machine (tests/backends covers Inductor).
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from flashu_compile.options import FlashUOptions

README = Path(__file__).resolve().parents[1] / "README.md"
VOCAB = 96


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _reader_names() -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256)).eval()

    def tokenizer(text):
        return {"input_ids": [[(ord(c) * 7) % VOCAB for c in t] for t in text]}

    return {"lm": lm, "tokenizer": tokenizer, "input_ids": torch.tensor(tokenizer(["Once upon a"])["input_ids"])}


@pytest.fixture
def eager_by_default(monkeypatch):
    parse = FlashUOptions.from_dict.__func__

    def from_dict(cls, options):
        if isinstance(options, dict) and "lowering" not in options:
            options = {**options, "lowering": "eager"}
        return parse(cls, options)

    monkeypatch.setattr(FlashUOptions, "from_dict", classmethod(from_dict))


def test_the_readme_has_the_snippets_this_test_checks():
    found = snippets()
    assert len(found) == 5, f"the README now has {len(found)} Python snippets; check each below"
    assert "model.compile(backend=\"flashu\"" in found[0]  # the first one is the call users write


def test_every_readme_snippet_runs_and_does_what_it_says(eager_by_default):
    torch._dynamo.reset()
    counters.clear()
    namespace: dict = {}
    printed = []
    results = []
    for i, code in enumerate(snippets(), 1):
        if re.search(r"\blm\b", code):
            namespace.update(_reader_names())
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"README.md python snippet {i}", "exec"), namespace)
        printed.append(out.getvalue())
        results.append({k: namespace[k] for k in ("images", "x", "plan") if k in namespace})
        if i == 3:
            graphs = counters["stats"]["unique_graphs"]
    # 1: the in-place compile runs every step compiled (denoise, embed, prefill, decode), and answers.
    images = results[0]["images"]
    assert graphs >= 4 and images.shape == (1, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert printed[0].strip() != ""
    # 2: the hand-written loop ends on a finite latent of the model's shape.
    x = results[1]["x"]
    model = namespace["model"]
    assert x.shape == (1, model.config.image_latent_dim, *model.config.latent_size) and torch.isfinite(x).all()
    # 3: compile_tasks with the same options and seed gives the in-place form's images and answer.
    torch.testing.assert_close(results[2]["images"], images, rtol=1e-5, atol=1e-6)
    assert printed[2] == printed[0]
    # 4, 5: generate() ran compiled with the LM's passes, and the LM's plan holds a keep set per decoder layer.
    assert counters["stats"]["unique_graphs"] > graphs
    assert len(namespace["plan"].layer_paths) == 6
