"""calibrate_lm on small random transformers Qwen2 / Llama models (and a Llava VLM): keep sets against Wanda
scores computed here by hand, and prune_channels under generate() against the zeroed-neuron model."""

import copy

import pytest
import torch

from flashu_compile import calibrate_lm
from flashu_compile.calibrate import Plan, model_fingerprint

VOCAB = 64
# (intermediate size, kept neurons at prune_ratio 0.2 and prune_multiple 8): 64 - 12 = 52 -> 48; 96 - 19 = 77 -> 72
SIZES = {"qwen2": (64, 48), "llama": (96, 72)}


pytestmark = pytest.mark.usefixtures("one_thread")


def _lm(family: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[family]
    torch.manual_seed(seed)
    return model_cls(config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=SIZES[family][0],
                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=128)).eval()


def _sequences(lengths=(5, 9, 3, 7, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def _keep(plan):
    return [k.tolist() for k in plan.keep["mmu"]]


def hand_wanda(lm, sequences, kept):
    """Per layer: (scores, keep set) from each sequence run alone (no padding), with hooks written here."""
    layers = lm.model.layers
    sq = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]

    def record(i):
        def hook(module, args):
            sq[i] += args[0].double().pow(2).sum(dim=(0, 1))  # returns None: the input is left as it is
        return hook

    hooks = [layer.mlp.down_proj.register_forward_pre_hook(record(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for seq in sequences:
                lm(input_ids=seq[None], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    scores = [s.sqrt() * layer.mlp.down_proj.weight.double().abs().sum(dim=0)
              for s, layer in zip(sq, layers, strict=True)]
    return scores, [torch.sort(s.argsort(descending=True)[:kept]).values for s in scores]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_keep_sets_are_the_wanda_top_scores(family, tmp_path):
    lm, sequences = _lm(family), _sequences()
    # batch_size 2 pads the shorter sequence of each batch: padding must not count.
    plan = calibrate_lm(lm, sequences, prune_ratio=0.2, prune_multiple=8, batch_size=2)
    scores, keep = hand_wanda(lm, sequences, SIZES[family][1])
    assert plan.tasks == ["mmu"]
    assert plan.layer_paths == [f"model.layers.{i}" for i in range(3)]
    assert plan.settings["tokens"] == {"mmu": sum(len(s) for s in sequences)}
    for i in range(3):
        torch.testing.assert_close(plan.scores["mmu"][i], scores[i], rtol=1e-5, atol=0)
        assert plan.keep["mmu"][i].tolist() == keep[i].tolist()
    assert plan.fingerprint == model_fingerprint(lm)
    plan.validate()
    assert Plan.load(plan.save(tmp_path / "plan"), lm) == plan


def test_strings_through_a_tokenizer_and_2d_batches_match_token_ids():
    lm = _lm("qwen2")
    words = ["red circle", "a blue square left of it", "two"]

    def tokenizer(text):
        return {"input_ids": [[(ord(c) * 7) % VOCAB for c in t] for t in text]}

    ids = [torch.tensor(row) for row in tokenizer(words)["input_ids"]]
    from_strings = calibrate_lm(lm, words, tokenizer=tokenizer, prune_multiple=8, batch_size=3)
    from_ids = calibrate_lm(lm, ids, prune_multiple=8, batch_size=1)
    assert _keep(from_strings) == _keep(from_ids)
    for a, b in zip(from_strings.scores["mmu"], from_ids.scores["mmu"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    # A 2-D tensor is one batch in which every token counts.
    batch = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    as_batch = calibrate_lm(lm, batch, prune_multiple=8)
    as_rows = calibrate_lm(lm, list(batch), prune_multiple=8, batch_size=1)
    assert _keep(as_batch) == _keep(as_rows) and as_batch.settings["tokens"] == {"mmu": 12}


def _llava():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=16, patch_size=8, projection_dim=32)
    text = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=VOCAB - 1,
                                                     vision_feature_select_strategy="default")).eval()


def test_image_and_text_batches_of_a_vision_language_model():
    vlm = _llava()
    images = [torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    texts = ["a", "bcd", "ef"]

    def processor(text, images, return_tensors, padding):
        # Four image tokens (a 2x2 patch grid) then the text, padded on the left as VLM processors often do.
        rows = [[VOCAB - 1] * 4 + [ord(c) % 32 for c in t] for t in text]
        length = max(map(len, rows))
        return {"input_ids": torch.tensor([[0] * (length - len(r)) + r for r in rows]),
                "attention_mask": torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows]),
                "pixel_values": torch.stack(images)}

    plan = calibrate_lm(vlm, texts, images=images, tokenizer=processor, prune_multiple=8, batch_size=2)
    assert plan.layer_paths == ["model.language_model.layers.0", "model.language_model.layers.1"]
    assert plan.settings["tokens"] == {"mmu": 3 * 4 + 6}
    # The same batches given as ready model inputs, one pair at a time (no padding at all).
    singles = [processor([t], [image], "pt", True) for t, image in zip(texts, images, strict=True)]
    ready = calibrate_lm(vlm, inputs=singles, prune_multiple=8)
    assert _keep(ready) == _keep(plan)


def _zeroed(lm, plan):
    """A copy of the model whose pruned neurons are zeroed (their down_proj columns)."""
    ref = copy.deepcopy(lm)
    with torch.no_grad():
        for layer, kept in zip(ref.model.layers, plan.keep["mmu"], strict=True):
            pruned = torch.ones(layer.mlp.down_proj.in_features, dtype=torch.bool)
            pruned[kept] = False
            layer.mlp.down_proj.weight[:, pruned] = 0
    return ref


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_compiled_generate_equals_the_zeroed_neuron_model(family):
    lm = _lm(family)
    plan = calibrate_lm(lm, _sequences(), prune_ratio=0.2, prune_multiple=8)
    # prune_channels reorders the FFN neurons in place: both references are copied before compiling.
    zeroed, full = _zeroed(lm, plan), copy.deepcopy(lm)
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    lm.forward = torch.compile(lm.forward, backend="flashu", options={"plan": plan, "passes": ["prune_channels"],
                                                                      "lowering": "eager", "strict": True})
    with torch.no_grad():
        got = lm.generate(ids, max_new_tokens=8, do_sample=False)
        want = zeroed.generate(ids, max_new_tokens=8, do_sample=False)
        assert got.tolist() == want.tolist()
        logits = lm(input_ids=ids).logits
        torch.testing.assert_close(logits, zeroed(input_ids=ids).logits, rtol=0, atol=1e-5)
        # Pruning 20% of the neurons changes the logits, so the equality above is not vacuous.
        assert (logits - full(input_ids=ids).logits).abs().max() > 1e-3


def test_prune_channels_recompiles_no_more_than_plain_dynamo():
    """Plain dynamo with backend "eager" (the graphs Inductor would be given, without Inductor's compile time)
    against flashu with a calibrate_lm plan, over the same generate() calls at four prompt lengths."""
    counts = {}
    for backend in ("eager", "flashu"):
        lm = _lm("qwen2")
        options = {"options": {"plan": calibrate_lm(lm, _sequences(), prune_multiple=8),
                               "passes": ["prune_channels"], "lowering": "eager"}} if backend == "flashu" else {}
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        lm.forward = torch.compile(lm.forward, backend=backend, **options)
        with torch.no_grad():
            for seed, length in ((0, 5), (1, 9), (2, 6), (3, 11)):
                ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))
                lm.generate(ids, max_new_tokens=4, do_sample=False)
        counts[backend] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 0 < counts["flashu"] <= counts["eager"], counts


class _Unrunnable(torch.nn.Module):
    """Qwen2-shaped weights whose forward must never run: argument errors come before any batch."""

    def __init__(self):
        super().__init__()
        self.model = _lm("qwen2").model

    def forward(self, **kwargs):
        raise AssertionError("the model ran before the arguments were checked")


@pytest.mark.parametrize("kwargs, match", [
    ({}, "no calibration data"),
    ({"texts": []}, "texts is empty"),
    ({"texts": [""], "tokenizer": str}, "empty string"),
    ({"texts": 3}, "texts must be strings or token-id tensors"),
    ({"texts": [torch.rand(4)]}, r"texts\[0\] must hold integer token ids"),
    ({"texts": [torch.tensor(3)]}, r"texts\[0\] must be a non-empty 1-D sequence"),
    ({"texts": [torch.ones(2, 2, 2, dtype=torch.long)]}, r"texts\[0\] must be a non-empty 1-D sequence"),
    ({"texts": ["ab", torch.ones(3, dtype=torch.long)]}, r"texts\[0\] must be a string or a token-id tensor"),
    ({"texts": ["ab"]}, "need tokenizer="),
    ({"texts": ["ab"], "images": [None, None], "tokenizer": str}, "2 images for 1 texts"),
    ({"texts": [torch.ones(3, dtype=torch.long)], "images": [None]}, "images go with string texts"),
    ({"texts": ["ab"], "images": "img", "tokenizer": str}, "images must be a sequence"),
    ({"inputs": {"input_ids": torch.ones(1, 3, dtype=torch.long)}}, "inputs must be an iterable of dicts"),
    ({"inputs": []}, "inputs is empty"),
    ({"inputs": [{}]}, r"inputs\[0\] must be a non-empty dict"),
    ({"texts": ["ab"], "tokenizer": str, "prune_ratio": 1.0}, "prune_ratio"),
    ({"texts": ["ab"], "tokenizer": str, "prune_ratio": -0.1}, "prune_ratio"),
    ({"texts": ["ab"], "tokenizer": str, "prune_multiple": 0}, "prune_multiple"),
    ({"texts": ["ab"], "tokenizer": str, "batch_size": 2.0}, "batch_size"),
    ({"texts": ["ab"], "tokenizer": str, "task": "t2v"}, "task must be one of"),
])
def test_bad_arguments_are_named_before_the_model_runs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibrate_lm(_Unrunnable(), **kwargs)


def test_models_and_masks_that_cannot_be_calibrated():
    with pytest.raises(ValueError, match="expected one decoder stack"):
        calibrate_lm(torch.nn.Linear(2, 2), [torch.ones(3, dtype=torch.long)])
    lm, ids = _lm("qwen2"), torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"batch 1 holds token id {VOCAB}, outside the model's vocabulary"):
        calibrate_lm(lm, [torch.ones(3, dtype=torch.long), torch.tensor([1, VOCAB])], batch_size=1)
    with pytest.raises(ValueError, match="token mask of shape"):
        calibrate_lm(lm, inputs=[{"input_ids": ids, "attention_mask": torch.ones(1, 3, dtype=torch.long)}])
    with pytest.raises(ValueError, match="no tokens"):
        calibrate_lm(lm, inputs=[{"input_ids": ids, "attention_mask": torch.zeros(1, 4, dtype=torch.long)}])


def test_a_compiled_model_is_refused():
    lm = _lm("qwen2")
    lm.forward = torch.compile(lm.forward, backend="flashu", options={"lowering": "eager"})
    with pytest.raises(ValueError, match="already compiled"):
        calibrate_lm(lm, texts=[torch.arange(5)])
