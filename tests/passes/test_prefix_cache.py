"""prefix_cache against a hand-written sampler that caches each row's prefix and computes only its image span."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.sampling import generate_latents
from flashu_compile.models.showo2.sequences import t2i_rows
from flashu_compile.models.showo2.understanding import prefill, prepare
from flashu_compile.options import FlashUOptions
from flashu_compile.runtime import FlopTally
from flashu_compile.runtime.request import current_request, request
from flashu_compile.tasks import compile_tasks
from tests.conftest import WORDS, small_config
from tests.passes.reference import assert_close_rel as _close
from tests.passes.reference import (
    compiled_generate,
    latent_noise,
    reference_generate,
    reference_prefix_generate,
    zeroed_copy,
)
from tests.passes.test_prune_channels import _plan

SCHEDULES = [None, ((3, 2.0), (2, 4.0)), ((2, 0.0), (3, 5.0)), ((1, 3.0), (1, 0.0))]


@pytest.fixture(scope="module")
def model(tokenizer):
    return Showo2.random(small_config(num_layers=3), seed=4).attach(tokenizer=tokenizer)


prompt_words = st.lists(st.sampled_from(WORDS), max_size=12).map(" ".join)  # "" is the empty prompt


def test_reference_equals_the_unrewritten_model(model):
    """The semantics the pass relies on, checked on the eager model: prefix once, span only, no tail."""
    for prompts in (["red circle", ""], ["two blue squares left of the green triangle above"]):
        noise = latent_noise(model, len(prompts))
        for schedule in (None, ((2, 0.0), (3, 5.0))):
            _close(reference_prefix_generate(model, prompts, 6, 5.0, noise, schedule),
                   reference_generate(model, prompts, 6, 5.0, noise, schedule=schedule))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(prompt_words, min_size=1, max_size=2), steps=st.integers(3, 8),
       schedule=st.sampled_from(SCHEDULES), guided=st.booleans(), tau=st.integers(0, 3),
       head_cache=st.booleans(), cache_interval=st.integers(1, 3))
def test_compiled_trajectory_equals_reference(model, prompts, steps, schedule, guided, tau, head_cache,
                                              cache_interval):
    """Prompt lengths (empty too), guidance on/off within a request, with and without head_cache."""
    guidance = 5.0 if guided else 0.0
    schedule = schedule if guided else None
    options = {"passes": ["prefix_cache"] + (["head_cache"] if head_cache else []), "lowering": "eager",
               "strict": True, "hybrid_tau": tau, "cache_interval": cache_interval, "guidance_schedule": schedule}
    noise = latent_noise(model, len(prompts))
    got = compiled_generate(model, options, prompts, steps, noise, guidance)
    if head_cache:
        want = reference_generate(model, prompts, steps, guidance, noise, head_cache=True, tau=tau,
                                  cache_interval=cache_interval, schedule=schedule)
    else:
        want = reference_prefix_generate(model, prompts, steps, guidance, noise, schedule)
    _close(got, want)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), steps=st.integers(3, 6), tau=st.integers(0, 3), head_cache=st.booleans())
def test_composes_with_pruned_ffns(tokenizer, data, steps, tau, head_cache):
    """prune_channels: the cache is filled by the pruned network and dropped when the full phase begins."""
    size, layers = 40, 2
    model = Showo2.random(small_config(num_layers=layers, intermediate_size=size), seed=7).attach(tokenizer=tokenizer)
    keep = {"t2i": [torch.tensor(sorted(data.draw(st.sets(st.integers(0, size - 1), min_size=1))))
                    for _ in range(layers)]}
    plan = _plan(model, keep)
    pruned = zeroed_copy(model, keep["t2i"])  # original numbering: made before compiling permutes the weights
    full = zeroed_copy(model, [torch.arange(size)] * layers)
    prompts = ["red circle", "two green squares left of the blue triangle"]
    noise = latent_noise(model, len(prompts))
    passes = ["prune_channels", "prefix_cache"] + (["head_cache"] if head_cache else [])
    options = {"passes": passes, "plan": plan, "lowering": "eager", "strict": True, "hybrid_tau": tau,
               "cache_interval": 2}
    got = compiled_generate(model, options, prompts, steps, noise)
    want = reference_generate(full, prompts, steps, 5.0, noise, head_cache=head_cache, tau=tau, cache_interval=2,
                              pruned=pruned)
    _close(got, want)


def test_prefix_is_computed_once_per_request_and_batch(model):
    torch._dynamo.reset()
    compiled = compile_tasks(model, "flashu", {"passes": ["prefix_cache"], "lowering": "eager",
                                              "guidance_schedule": ((2, 5.0), (2, 0.0), (2, 5.0))})
    histories = []
    fn = compiled.entries["denoise"]

    def denoise(*args):
        out = fn(*args)
        histories.append([h for st in current_request().scratch.values() for h in st.history])
        return out

    generate_latents(model, model.tokenizer, ["red circle"], steps=7, noise=latent_noise(model, 1), progress=False,
                     denoise=denoise, rules=compiled.rules)
    # Guided calls (2 rows) and unguided ones (1 row) each fill their own cache once.
    assert histories[-1] == [(1, "prefix store"), (2, "prefix reuse"), (3, "prefix store"), (4, "prefix reuse"),
                             (5, "prefix reuse"), (6, "prefix reuse")]


def test_step_flops_fall_by_the_prefix_and_tail_share(tokenizer):
    """A long text budget (40 tokens) around 17 span positions: most per-token work is prefix and tail."""
    model = Showo2.random(small_config(num_layers=2, max_text_len=40), seed=2).attach(tokenizer=tokenizer)
    cfg = model.config
    rows = t2i_rows(tokenizer, ["red circle left of the blue square"], cfg.num_image_tokens, cfg.max_text_len,
                    guidance=True)
    latents = latent_noise(model, 2)
    flops = {}
    for name, passes in (("full", []), ("prefix_cache", ["prefix_cache"])):
        torch._dynamo.reset()
        fn = torch.compile(model.denoise, backend="flashu", options={"passes": passes, "lowering": "eager"})
        flops[name] = []
        with torch.no_grad(), request("t2i", 3) as req:
            for step in range(3):
                req.advance()
                with FlopTally() as tally:
                    fn(rows.text_tokens, latents, torch.full((2,), 0.2 * step), rows.attention_mask,
                       rows.modality_positions)
                flops[name].append(tally.total)
    with torch.no_grad(), FlopTally() as features:
        torch.compile(model.image_features, backend="flashu", options={"lowering": "eager"})(latents)
    seq, span = rows.seq_len, cfg.num_image_tokens + 1
    full, first, later = flops["full"][0], flops["prefix_cache"][0], flops["prefix_cache"][1]
    # Everything after the image features is per token (attention included: span x (P + span) = span x S).
    expected = features.total + (full - features.total) * span / seq
    print(f"per-step FLOPs: {full / 1e6:.2f} M -> first {first / 1e6:.2f} M, later {later / 1e6:.2f} M "
          f"(expected {expected / 1e6:.2f} M; sequence {seq}, span {span})")
    assert flops["prefix_cache"][1:] == [later, later]
    assert abs(later - expected) <= 0.03 * full
    assert later <= 0.45 * full and first <= full


def test_no_recompiles_after_the_first_request(model):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = compile_tasks(model, "flashu", {"passes": ["prefix_cache", "head_cache"], "lowering": "eager",
                                              "guidance_schedule": ((24, 7.5), (11, 10.0))})
    run = {"denoise": compiled.entries["denoise"], "rules": compiled.rules, "progress": False}
    generate_latents(model, model.tokenizer, ["red circle", ""], steps=20, noise=latent_noise(model, 2), **run)
    first = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for seed, prompts in ((1, ["two blue squares above the green triangle", "red"]), (2, ["", "circle"])):
        generate_latents(model, model.tokenizer, prompts, steps=20, noise=latent_noise(model, 2, seed), **run)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == first == 1


def test_inductor_lowering_matches_eager_lowering(model):
    options = {"passes": ["prefix_cache", "head_cache"], "cache_interval": 2, "hybrid_tau": 2,
               "guidance_schedule": ((2, 0.0), (3, 5.0))}
    prompts = ["red circle", "two blue squares"]
    noise = latent_noise(model, 2)
    eager = compiled_generate(model, {**options, "lowering": "eager"}, prompts, 6, noise)
    inductor = compiled_generate(model, {**options, "lowering": "inductor"}, prompts, 6, noise)
    _close(inductor, eager, rel=1e-4)


def test_refused_combinations_and_graphs_are_clear_errors(small_model, tokenizer):
    with pytest.raises(ValueError, match="prefix_cache does not compose with layer_skip"):
        FlashUOptions.from_dict({"passes": ["prefix_cache", "layer_skip"]})
    assert "prefix_cache" not in FlashUOptions.from_dict({"preset": "paper"}).passes
    assert "prefix_cache" not in FlashUOptions.from_dict({"preset": "flashu-reference"}).passes
    # An understanding prefill forced through the t2i passes: no image span scattered into the LLM's input.
    c, (h, w) = small_model.config.image_latent_dim, small_model.config.latent_size
    rows, embeds = prepare(small_model, tokenizer, torch.randn(1, c, h, w), "what colour is the circle?")
    args = (small_model, embeds, rows.attention_mask)
    for strict in (True, False):
        torch._dynamo.reset()
        fast = torch.compile(prefill, backend="flashu", options={"passes": ["prefix_cache"], "task": "t2i",
                                                                 "lowering": "eager", "strict": strict})
        with torch.no_grad():
            if strict:
                with pytest.raises(Exception, match="'prefix_cache' does not apply: .*not a denoising graph"):
                    fast(*args, DynamicCache(config=small_model.config.llm))
            else:
                with pytest.warns(UserWarning, match="flashu pass 'prefix_cache' skipped"):
                    got = fast(*args, DynamicCache(config=small_model.config.llm))
                assert torch.equal(got, prefill(*args, DynamicCache(config=small_model.config.llm)))


def test_a_mask_that_lets_the_prefix_see_the_span_is_refused(small_model, tokenizer):
    """Exactness rests on causal omni-attention; a bidirectional mask would make the prefix depend on t."""
    cfg = small_model.config
    rows = t2i_rows(tokenizer, ["red circle"], cfg.num_image_tokens, cfg.max_text_len, guidance=False)
    torch._dynamo.reset()
    fast = torch.compile(small_model.denoise, backend="flashu", options={"passes": ["prefix_cache"],
                                                                         "lowering": "eager"})
    with torch.no_grad(), pytest.raises(RuntimeError, match="positions before the image span see neither"):
        fast(rows.text_tokens, latent_noise(small_model, 1), torch.full((1,), 0.5),
             torch.zeros_like(rows.attention_mask), rows.modality_positions)
