"""prune_channels against pruning by masking: the eager model with the dropped neurons zeroed."""

import contextlib
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from flashu_compile.calibrate import Plan, PlanError, calibrate
from flashu_compile.calibrate.plan import decoder_layers
from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.sampling import generate_latents
from flashu_compile.models.showo2.sequences import t2i_rows
from flashu_compile.models.showo2.understanding import answer_tokens, prefill, prepare
from flashu_compile.passes.prune_channels import ffn_layout
from flashu_compile.runtime import FlopTally
from flashu_compile.runtime.request import request
from flashu_compile.tasks import compile_tasks
from tests.conftest import small_config
from tests.passes.reference import assert_close_rel as _close
from tests.passes.reference import reference_generate, zeroed_copy

PROMPTS = ["a red circle", "two blue squares"]
QUESTION = "what colour is the circle?"


def _plan(model, keep):
    """A plan with the given keep sets, fingerprinted for ``model`` (scores are not used by the pass)."""
    layers = decoder_layers(model)
    sizes = [layer.mlp.gate_proj.out_features for _, layer in layers]
    scores = {task: [torch.zeros(size, dtype=torch.float64) for size in sizes] for task in keep}
    return Plan.for_model(model, keep, scores)


def _latents(model, n, seed):
    c, (h, w) = model.config.image_latent_dim, model.config.latent_size
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


@st.composite
def keep_sets(draw, size, num_layers):
    """Random sorted keep indices per task and layer, overlapping arbitrarily (at least one neuron each)."""
    out = {}
    for task in ("t2i", "mmu"):
        out[task] = []
        for _ in range(num_layers):
            chosen = draw(st.sets(st.integers(0, size - 1), min_size=1, max_size=size))
            out[task].append(torch.tensor(sorted(chosen), dtype=torch.int64))
    return out


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), num_layers=st.integers(1, 3), size=st.sampled_from([16, 40, 64]),
       steps=st.integers(3, 6), tau=st.integers(0, 3),
       with_generation_passes=st.booleans())
def test_pruned_model_equals_zeroed_neurons(tokenizer, data, num_layers, size, steps, tau, with_generation_passes):
    model = Showo2.random(small_config(num_layers=num_layers, intermediate_size=size), seed=size + num_layers)
    model.attach(tokenizer=tokenizer)
    keep = data.draw(keep_sets(size, num_layers))
    plan = _plan(model, keep)
    # Zeroed copies use the original neuron numbering: made before compiling permutes the weights.
    zeroed = {task: zeroed_copy(model, keep[task]) for task in keep}
    full = zeroed_copy(model, [torch.arange(size)] * num_layers)
    passes = ["prune_channels"] + (["layer_skip", "head_cache"] if with_generation_passes else [])
    options = {"passes": passes, "plan": plan, "lowering": "eager", "hybrid_tau": tau, "skip_interval": 2,
               "skip_ratio": 0.5, "cache_interval": 2}
    noise, image = _latents(model, len(PROMPTS), 0), _latents(model, 1, 1)

    torch._dynamo.reset()
    compiled = compile_tasks(model, "flashu", options)
    got = generate_latents(model, tokenizer, PROMPTS, steps=steps, guidance=5.0, noise=noise, progress=False,
                           denoise=compiled.entries["denoise"], rules=compiled.rules)
    want = reference_generate(full, PROMPTS, steps, 5.0, noise, layer_skip=with_generation_passes,
                              head_cache=with_generation_passes, tau=tau, skip_interval=2, skip_ratio=0.5,
                              cache_interval=2, pruned=zeroed["t2i"])
    _close(got, want)

    with torch.no_grad():
        rows, embeds = prepare(model, tokenizer, image, QUESTION)
        logits = compiled.entries["prefill"](model, embeds, rows.attention_mask,
                                             DynamicCache(config=model.config.llm))
        expected = prefill(zeroed["mmu"], embeds, rows.attention_mask, DynamicCache(config=model.config.llm))
    _close(logits, expected)
    assert answer_tokens(model, tokenizer, image, QUESTION, max_new_tokens=8, entries=compiled.entries) == \
        answer_tokens(zeroed["mmu"], tokenizer, image, QUESTION, max_new_tokens=8)


def test_layout_makes_every_task_a_contiguous_range():
    keep = {"t2i": torch.tensor([0, 2, 3, 7]), "mmu": torch.tensor([2, 5, 7, 8])}
    order, ranges = ffn_layout(10, keep)
    assert sorted(order.tolist()) == list(range(10))
    for task, kept in keep.items():
        start, stop = ranges[task]
        assert sorted(order[start:stop].tolist()) == kept.tolist()
    assert order[:2].tolist() == [0, 3] and ranges["full"] == (0, 10)  # generation-only first


@pytest.fixture(scope="module")
def calibrated(tokenizer):
    # An FFN of 320 neurons: r_p = 0.2 with a rounding multiple of 32 keeps 256.
    model = Showo2.random(small_config(num_layers=2, intermediate_size=320), seed=5).attach(tokenizer=tokenizer)
    plan = calibrate(model, prompts=PROMPTS, images=[_latents(model, 1, 2)], questions=[QUESTION], prune_ratio=0.2,
                     multiple=32, steps=3, progress=False)
    return model, plan


def test_ffn_flops_fall_with_the_prune_ratio(calibrated):
    from torch.utils.flop_counter import FlopCounterMode

    model, plan = calibrated
    cfg = model.config
    rows = t2i_rows(model.tokenizer, PROMPTS[:1], cfg.num_image_tokens, cfg.max_text_len, guidance=False)
    args = (rows.text_tokens, _latents(model, 1, 3), torch.full((1,), 0.5), rows.attention_mask,
            rows.modality_positions)
    with FlopCounterMode(display=False) as mode, torch.no_grad():
        model.denoise(*args)
    ffn = sum(sum(ops.values()) for name, ops in mode.get_flop_counts().items()
              if name.startswith("Qwen2Model.layers.") and name.endswith(".mlp"))
    torch._dynamo.reset()
    compiled = compile_tasks(model, "flashu", {"passes": ["prune_channels"], "plan": plan, "lowering": "eager",
                                              "hybrid_tau": 0})
    with request("t2i", 1), torch.no_grad(), FlopTally() as tally:
        compiled.entries["denoise"](*args)
    assert tally.calls == 1
    # Only the LLM FFNs change, so the whole-model difference is the FFN saving.
    assert (mode.get_total_flops() - tally.total) / ffn >= 0.19


def test_both_plans_and_the_full_network_share_one_weight_set(calibrated, tokenizer):
    model, plan = calibrated
    params = dict(model.named_parameters())
    before = {name: (p.data_ptr(), p.numel() * p.element_size()) for name, p in params.items()}
    storages = {p.untyped_storage().data_ptr() for p in params.values()}
    torch._dynamo.reset()
    compiled = compile_tasks(model, "flashu", {"passes": ["prune_channels"], "plan": plan, "lowering": "eager",
                                              "hybrid_tau": 1})
    run = {"denoise": compiled.entries["denoise"], "rules": compiled.rules, "progress": False}
    narrowed = []

    class Views(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.narrow:
                narrowed.append(out)
            return out

    # Generation with a full-network final step, then an answer: all three weight uses are live.
    generate_latents(model, tokenizer, PROMPTS, steps=3, guidance=5.0, noise=_latents(model, 2, 4), **run)
    with Views():
        generate_latents(model, tokenizer, PROMPTS, steps=3, guidance=5.0, noise=_latents(model, 2, 4), **run)
        answer_tokens(model, tokenizer, _latents(model, 1, 5), QUESTION, max_new_tokens=2, entries=compiled.entries)
    # Every parameter is where it was, with its size: the permutation happened in place.
    assert {name: (p.data_ptr(), p.numel() * p.element_size()) for name, p in model.named_parameters()} == before
    # The pruned FFNs read views of those parameters, never copies.
    assert narrowed and all(v.untyped_storage().data_ptr() in storages for v in narrowed)
    hidden = model.config.llm.hidden_size
    assert all(sorted(v.shape) == sorted((256, hidden)) for v in narrowed)


def test_a_second_plan_on_the_same_weights_is_refused(calibrated, tokenizer):
    model, plan = calibrated
    other = _plan(model, {"t2i": [torch.arange(0, 320, 2)] * 2})
    for options, error in (({"plan": plan}, None), ({"plan": other}, "already reordered for a different plan")):
        torch._dynamo.reset()
        _compile_and_generate(model, tokenizer, options, error)


def _compile_and_generate(model, tokenizer, options, error):
    compiled = compile_tasks(model, "flashu", {"passes": ["prune_channels"], "lowering": "eager", "hybrid_tau": 0,
                                              **options})
    with pytest.raises(Exception, match=error) if error else contextlib.nullcontext():
        generate_latents(model, tokenizer, PROMPTS, steps=2, guidance=0.0, noise=_latents(model, 2, 6),
                         progress=False, denoise=compiled.entries["denoise"], rules=compiled.rules)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_plain_transformers_llms_are_pruned_too(family):
    """The pass needs only a SwiGLU decoder stack: a transformers Qwen2 or Llama model with a plan."""
    from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2Model), "llama": (LlamaConfig, LlamaModel)}[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=50)).eval()
    keep = [torch.arange(0, 64, 2), torch.arange(10, 58)]
    plan = _plan(model, {"mmu": keep})
    assert plan.layer_paths == ["layers.0", "layers.1"]
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for (_, layer), kept in zip(decoder_layers(zeroed), keep, strict=True):
            drop = torch.ones(64, dtype=torch.bool)
            drop[kept] = False
            layer.mlp.gate_proj.weight[drop] = 0
            layer.mlp.up_proj.weight[drop] = 0
            layer.mlp.down_proj.weight[:, drop] = 0
    ids = torch.randint(0, 50, (2, 7))
    torch._dynamo.reset()
    fast = torch.compile(model, backend="flashu", options={"passes": ["prune_channels"], "plan": plan,
                                                          "lowering": "eager", "strict": True})
    with torch.no_grad():
        got = fast(input_ids=ids).last_hidden_state
        want = zeroed(input_ids=ids).last_hidden_state
    _close(got, want)
    assert model.layers[1].mlp.gate_proj.weight.shape == (64, 32)  # permuted in place, never resized


def _qwen2(num_layers, seed):
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(seed)
    return Qwen2Model(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=50)).eval()


@pytest.mark.parametrize("mismatch, message", [
    ("late layer", r"layer layers\.2: FFN weights up_proj differ from the ones the plan was calibrated on"),
    ("layer count", r"the plan covers 2 decoder layers but the model has 3"),
])
def test_a_plan_for_other_weights_is_an_error_and_permutes_nothing(mismatch, message):
    """Every layer is verified before the first is permuted, and a wrong plan fails the compilation."""
    model = _qwen2(3, seed=0)
    keep = {"mmu": [torch.arange(0, 64, 2)] * 3}
    if mismatch == "late layer":
        plan = _plan(_qwen2(3, seed=0), keep)
        with torch.no_grad():  # the model the plan was made for differs from this one in its last FFN only
            model.layers[2].mlp.up_proj.weight.mul_(1.5)
    else:
        plan = _plan(_qwen2(2, seed=0), {"mmu": keep["mmu"][:2]})
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch._dynamo.reset()
    fast = torch.compile(model, backend="flashu", options={"passes": ["prune_channels"], "plan": plan,
                                                          "lowering": "eager"})
    with pytest.raises(PlanError, match=message), torch.no_grad():
        fast(input_ids=torch.randint(0, 50, (1, 5)))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed"
