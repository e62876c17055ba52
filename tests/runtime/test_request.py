"""Step state without the project's samplers: a user's own loop and transformers ``generate()``.

A compiled flashu program finds the request it serves from its inputs (a denoising graph's flow
time, a prefill against a decode step) or from ``flashu_compile.request``, so the plain
``torch.compile`` call accelerates by itself and gives what the project's samplers give.
"""

import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashu_compile
import flashu_compile.runtime
from flashu_compile.calibrate.plan import Plan, decoder_layers
from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.sampling import generate_latents, time_grid
from flashu_compile.models.showo2.sequences import t2i_rows
from flashu_compile.options import FlashUOptions
from flashu_compile.runtime import FlopTally, guidance_scales
from flashu_compile.runtime.request import end_implicit_requests, serving
from flashu_compile.tasks import compile_tasks
from tests.conftest import small_config
from tests.passes.reference import assert_close_rel, latent_noise

PROMPTS = ["a red circle", "two blue square"]
GUIDANCE = 3.0


@pytest.fixture(scope="module")
def model(tokenizer):
    return Showo2.random(small_config(num_layers=4), seed=7).attach(tokenizer=tokenizer)


def _plan(model):
    """Keep every other FFN neuron for both tasks (the prune pass reads only the keep sets)."""
    layers = decoder_layers(model)
    sizes = [layer.mlp.gate_proj.out_features for _, layer in layers]
    keep = {task: [torch.arange(0, size, 2) for size in sizes] for task in ("t2i", "mmu")}
    scores = {task: [torch.zeros(size, dtype=torch.float64) for size in sizes] for task in keep}
    return Plan.for_model(model, keep, scores)


def user_loop(denoise, model, steps, scales, noise):
    """Euler flow matching with classifier-free guidance, written as a user would against ``model.denoise``."""
    b = noise.shape[0]
    rows = t2i_rows(model.tokenizer, PROMPTS[:b], model.config.num_image_tokens, model.config.max_text_len,
                    guidance=True)
    grid, x = time_grid(steps), noise.clone()
    with torch.no_grad():
        for i in range(steps - 1):
            n = 2 * b if scales[i] > 0 else b
            v = denoise(rows.text_tokens[:n], torch.cat([x, x])[:n], grid[i].expand(n), rows.attention_mask[:n],
                        rows.modality_positions[:n]).float()
            if n > b:
                cond, uncond = v.chunk(2)
                v = uncond + scales[i] * (cond - uncond)
            x = x + (grid[i + 1] - grid[i]) * v
    return x


def _sampler_latents(model, options, steps, noise):
    torch._dynamo.reset()
    compiled = compile_tasks(model, "flashu", options)
    return generate_latents(model, model.tokenizer, PROMPTS[:noise.shape[0]], steps=steps, guidance=GUIDANCE,
                            noise=noise, progress=False, denoise=compiled.entries["denoise"], rules=compiled.rules)


CONFIGS = {
    "head_cache": {"passes": ["head_cache"]},
    "layer_skip": {"passes": ["layer_skip"], "skip_ratio": 0.5},
    "prefix_cache": {"passes": ["prefix_cache"]},
    "paper": {"preset": "paper"},
}


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(CONFIGS)), steps=st.integers(4, 12), skip_interval=st.integers(1, 4),
       cache_interval=st.integers(1, 4), tau=st.integers(0, 3))
def test_a_users_loop_equals_the_sampler(model, name, steps, skip_interval, cache_interval, tau):
    options = {**CONFIGS[name], "lowering": "eager", "hybrid_tau": tau, "skip_interval": skip_interval,
               "cache_interval": cache_interval}
    if name == "paper":
        options["plan"] = _plan(model)
    noise = latent_noise(model, 2, seed=steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the paper preset's own schedule overrides GUIDANCE, with a warning
        want = _sampler_latents(model, options, steps, noise)
    opts = FlashUOptions.from_dict(options)
    scales = guidance_scales(opts.guidance_schedule, steps - 1, GUIDANCE, opts.step_semantics)
    torch._dynamo.reset()
    denoise = torch.compile(model.denoise, backend="flashu", options=options)
    with flashu_compile.request("t2i", calls=steps - 1):
        got = user_loop(denoise, model, steps, scales, noise)
    assert_close_rel(got, want)


def test_the_passes_save_flops_in_a_users_loop(model):
    noise, steps = latent_noise(model, 1), 9
    scales = [GUIDANCE] * (steps - 1)
    flops = {}
    for name, passes in (("off", []), ("skip+cache", ["layer_skip", "head_cache"])):
        torch._dynamo.reset()
        denoise = torch.compile(model.denoise, backend="flashu", options={
            "passes": passes, "lowering": "eager", "skip_ratio": 0.5, "skip_interval": 4, "cache_interval": 2,
            "hybrid_tau": 2})
        with FlopTally() as tally, flashu_compile.request("t2i", calls=steps - 1):
            user_loop(denoise, model, steps, scales, noise)
        assert tally.calls == steps - 1
        flops[name] = tally.total
    assert flops["skip+cache"] < 0.8 * flops["off"]


def test_without_a_request_the_inputs_start_each_one(model):
    # hybrid_tau=0: nothing depends on the request's length, so no context is needed at all.
    options = {"passes": ["layer_skip", "head_cache"], "lowering": "eager", "hybrid_tau": 0, "skip_ratio": 0.5,
               "skip_interval": 3, "cache_interval": 2}
    noise, steps = latent_noise(model, 2, seed=4), 8
    want = _sampler_latents(model, options, steps, noise)
    torch._dynamo.reset()
    end_implicit_requests()
    denoise = torch.compile(model.denoise, backend="flashu", options=options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is ambiguous here
        first = user_loop(denoise, model, steps, [GUIDANCE] * (steps - 1), noise)
        again = user_loop(denoise, model, steps, [GUIDANCE] * (steps - 1), noise)
    assert_close_rel(first, want)
    assert torch.equal(first, again)


def test_an_unknown_request_length_is_said_once(model):
    torch._dynamo.reset()
    end_implicit_requests()
    denoise = torch.compile(model.denoise, backend="flashu", options={"passes": ["head_cache"], "lowering": "eager",
                                                                     "hybrid_tau": 2})
    with pytest.warns(UserWarning, match=r"flashu_compile.request\('t2i', calls=N\)") as caught:
        with flashu_compile.summary(flops=False) as unplaced:
            user_loop(denoise, model, 6, [GUIDANCE] * 5, latent_noise(model, 1))
        user_loop(denoise, model, 6, [GUIDANCE] * 5, latent_noise(model, 1))
    assert sum("hybrid_tau=2" in str(w.message) for w in caught) == 1
    # The summary of such a loop says it, on every request (a benchmark of it measures less than its options ask).
    (req,) = unplaced.requests
    assert req.unplaced_final and req.phases == {"rewritten": 5} and "no final full-network phase" in str(unplaced)
    with flashu_compile.summary(flops=False) as placed, flashu_compile.request("t2i", calls=5):
        user_loop(denoise, model, 6, [GUIDANCE] * 5, latent_noise(model, 1))
    (req,) = placed.requests
    assert not req.unplaced_final and req.phases == {"rewritten": 3, "full": 2}
    assert "no final full-network phase" not in str(placed)


def test_flow_time_tells_steps_and_requests_apart():
    end_implicit_requests()
    seen = []
    for t in (0.0, 0.0, 0.3, 0.7, 0.0, 0.5):
        with serving("t2i", time=t) as req:
            seen.append((id(req), req.step))
    first, second = seen[0][0], seen[4][0]
    assert [step for _, step in seen] == [1, 1, 2, 3, 1, 2]
    assert first == second  # the implicit request restarts in place
    with serving("mmu", starts=True) as req:
        assert req.task == "mmu" and req.step == 1
    with serving("mmu", starts=False) as req:
        assert req.step == 2


def _rows(model, prompt):
    return t2i_rows(model.tokenizer, [prompt], model.config.num_image_tokens, model.config.max_text_len,
                    guidance=True)


def _call(denoise, model, prompt, t, seed=0):
    rows = _rows(model, prompt)
    x = latent_noise(model, 1, seed=seed)
    return denoise(rows.text_tokens, torch.cat([x, x]), torch.full((2,), t), rows.attention_mask,
                   rows.modality_positions)


def test_an_aborted_loop_does_not_lend_its_prefix_to_the_next_prompt(model):
    """A loop stopped after its first call, then another prompt's loop from t = 0: nothing of the first is reused."""
    noise, steps = latent_noise(model, 1, seed=5), 6
    torch._dynamo.reset()
    end_implicit_requests()
    denoise = torch.compile(model.denoise, backend="flashu", options={"passes": ["prefix_cache"],
                                                                     "lowering": "eager"})
    with torch.no_grad():
        _call(denoise, model, "two blue square", 0.0)  # the aborted loop's only call
        got = user_loop(denoise, model, steps, [GUIDANCE] * (steps - 1), noise)
        want = user_loop(model.denoise, model, steps, [GUIDANCE] * (steps - 1), noise)
    assert_close_rel(got, want)


def test_the_prefix_cache_recomputes_for_other_prompts_inside_one_request(model):
    """Even a request the caller advances by hand (as the samplers do) never reuses another prompt's prefix."""
    from flashu_compile.runtime.request import request

    torch._dynamo.reset()
    denoise = torch.compile(model.denoise, backend="flashu", options={"passes": ["prefix_cache"],
                                                                     "lowering": "eager"})
    with torch.no_grad(), request("t2i", 2) as req:
        req.advance()
        _call(denoise, model, "a red circle", 0.2)
        req.advance()
        got = _call(denoise, model, "two blue square", 0.4)
    with torch.no_grad():
        want = _call(model.denoise, model, "two blue square", 0.4)
    assert_close_rel(got, want)


def test_conditioning_tells_implicit_requests_apart():
    end_implicit_requests()
    a, b = (torch.tensor([[1, 2, 3]]),), (torch.tensor([[1, 2, 4]]),)
    steps = []
    for cond, t in ((a, 0.0), (b, 0.0), (a, 0.5), (b, 0.5), (b, 0.7), (a, 0.0)):
        with serving("t2i", time=t, conditioning=cond) as req:
            steps.append((req.conditioning[0][0, 2].item(), req.step))
    # Each prompt keeps its own request; an earlier t restarts only that prompt's request.
    assert steps == [(3, 1), (4, 1), (3, 2), (4, 2), (4, 3), (3, 1)]
    # The conditional rows alone at a later t (guidance switched off) continue the latest request.
    guided = (torch.tensor([[5, 6], [0, 0]]),)
    with serving("t2i", time=0.0, conditioning=guided) as first:
        pass
    with serving("t2i", time=0.3, conditioning=(guided[0][:1],)) as req:
        assert req is first and req.step == 2


def test_the_same_prompts_again_at_the_same_t_start_a_request_and_say_so_once():
    end_implicit_requests()
    cond = (torch.tensor([[7, 8]]),)
    with pytest.warns(UserWarning, match=r"flashu_compile.request\('t2i', calls=N\)") as caught:
        for t in (0.0, 0.4, 0.0, 0.0, 0.0):
            with serving("t2i", time=t, conditioning=cond) as req:
                assert req.step == 1 or t == 0.4
    assert len([w for w in caught if "repeated t=0" in str(w.message)]) == 1


def test_interleaved_loops_in_one_request_context_are_refused():
    with flashu_compile.request("t2i", calls=4):
        with serving("t2i", time=0.0, conditioning=(torch.tensor([[1]]),)):
            pass
        with pytest.raises(RuntimeError, match=r"interleaved in one request context.*flashu_compile.request"), \
                serving("t2i", time=0.3, conditioning=(torch.tensor([[2]]),)):
            pass


def test_request_contexts_left_out_of_order_are_refused_and_all_closed():
    def loop():
        with flashu_compile.request("t2i", calls=2):
            yield

    first, second = loop(), loop()
    next(first)
    next(second)
    with pytest.raises(RuntimeError, match="contexts were interleaved"):
        next(first)
    with pytest.raises(StopIteration):  # once the first has gone, the second ends as the current one
        next(second)
    assert flashu_compile.runtime.current_request() is None


def test_a_wrong_call_count_names_the_right_one_at_the_users_line():
    with pytest.warns(UserWarning, match=r"calls=3\) ended after 2 model call\(s\).*declare calls=2") as caught:
        with flashu_compile.request("t2i", calls=3):
            for t in (0.0, 0.5):
                with serving("t2i", time=t):
                    pass
    assert caught[0].filename == __file__  # the user's line, not the library's
    with flashu_compile.request("t2i", calls=1), pytest.raises(
            RuntimeError, match=r"model call 2 of a request declared with calls=1: calls counts model calls"):
        for t in (0.0, 0.5):
            with serving("t2i", time=t):
                pass


def test_library_warnings_point_at_the_users_line(model):
    torch._dynamo.reset()
    end_implicit_requests()
    denoise = torch.compile(model.denoise, backend="flashu", options={"passes": ["token_drop"], "lowering": "eager"})
    with pytest.warns(UserWarning, match="flashu pass 'token_drop' skipped") as caught, torch.no_grad():
        _call(denoise, model, "a red circle", 0.0)
    assert {w.filename for w in caught if "token_drop" in str(w.message)} == {__file__}


# ------------------------------------------------------------------ transformers generate()

def _lm(family):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[family]
    torch.manual_seed(0)
    return model_cls(config_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()


class _Identity(torch.nn.Module):
    """A decoder layer that is skipped: the residual stream passes, nothing is written to the KV cache."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def reference_skip_generate(lm, ids, new_tokens, skip_ratio):
    """Greedy decoding with the answer skip rule applied by hand: the prefill runs every layer and measures
    1 - cos(h_in, h_out) on the last token; decoding skips the int(L * r) least important layers but layer 0."""
    from transformers import DynamicCache

    lm = copy.deepcopy(lm)
    layers = lm.model.layers
    importance, hooks = {}, []
    for i, layer in enumerate(layers):
        def measure(module, args, kwargs, out, i=i):
            h_in = (args[0] if args else kwargs["hidden_states"])[:, -1].float()
            h_out = (out[0] if isinstance(out, tuple) else out)[:, -1].float()
            importance[i] = float(1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).mean())
        hooks.append(layer.register_forward_hook(measure, with_kwargs=True))
    cache = DynamicCache()
    with torch.no_grad():
        logits = lm(input_ids=ids, past_key_values=cache, use_cache=True).logits
    for hook in hooks:
        hook.remove()
    order = sorted((i for i in importance if i != 0), key=lambda i: (importance[i], i))
    for i in order[: int(len(layers) * skip_ratio)]:
        layers[i] = _Identity()
    tokens = [int(logits[0, -1].argmax())]
    with torch.no_grad():
        for _ in range(new_tokens - 1):
            logits = lm(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits
            tokens.append(int(logits[0, -1].argmax()))
    return tokens


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_generate_of_a_model_compiled_in_place_skips_layers_like_the_reference(family):
    """lm.compile(backend="flashu", ...), PyTorch's in-place form: generate() calls the module, so it runs compiled."""
    lm, ids, new = _lm(family), torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1)), 8
    want = reference_skip_generate(lm, ids, new, 0.5)
    torch._dynamo.reset()
    end_implicit_requests()
    lm.compile(backend="flashu", options={"passes": ["layer_skip"], "lowering": "eager", "skip_ratio": 0.5})
    with torch.no_grad(), FlopTally() as tally:
        got = lm.generate(ids, max_new_tokens=new, do_sample=False)[0, 7:].tolist()
    assert got == want and tally.calls == new  # a prefill and new - 1 decode steps, all compiled


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_generate_skips_layers_like_the_reference(family):
    lm, ids, new = _lm(family), torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1)), 8
    want = reference_skip_generate(lm, ids, new, 0.5)
    with torch.no_grad():
        plain = lm.generate(ids, max_new_tokens=new, do_sample=False)[0, 7:].tolist()
    torch._dynamo.reset()
    end_implicit_requests()
    lm.forward = torch.compile(lm.forward, backend="flashu", options={"passes": ["layer_skip"], "lowering": "eager",
                                                                      "skip_ratio": 0.5})
    flops = {}
    with torch.no_grad():
        for n in (1, new):
            with FlopTally() as tally:
                got = lm.generate(ids, max_new_tokens=n, do_sample=False)[0, 7:].tolist()
            flops[n] = tally.total
    assert got == want
    assert got != plain  # the skip set changes this toy model's answer, so the comparison is not vacuous
    # Per decoded token, two of the four layers run; the LM head (2 * H * V per token) always does.
    decode = (flops[new] - flops[1]) / (new - 1)
    torch._dynamo.reset()
    full = torch.compile(lm.forward, backend="flashu", options={"passes": [], "lowering": "eager"})
    lm.forward = full
    with torch.no_grad():
        with FlopTally() as one:
            lm.generate(ids, max_new_tokens=1, do_sample=False)
        with FlopTally() as many:
            lm.generate(ids, max_new_tokens=new, do_sample=False)
    full_decode = (many.total - one.total) / (new - 1)
    head = 2 * 32 * 64
    assert decode - head == pytest.approx((full_decode - head) * 2 / 4)


def test_generate_with_layer_skip_makes_the_graphs_plain_dynamo_makes_and_none_after_warm_up():
    """Plain dynamo (backend "eager": the graphs Inductor is given) against flashu with layer_skip on an 8-layer
    Qwen2: the same graph count after a warm-up (two prompt lengths, two batch sizes), then 20 new prompts of other
    lengths and batch sizes, whose skip sets change, under set_stance("fail_on_recompile"): nothing compiles.
    (A skipped layer's KV cache once kept the prompt length while the others grew: one more graph per skip set.)"""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    counts, skip_sets = {}, set()
    for backend, options in (("eager", {}), ("flashu", {"options": {"passes": ["layer_skip"], "lowering": "eager",
                                                                     "skip_ratio": 0.25}})):
        torch.manual_seed(0)
        lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=128)).eval()
        torch._dynamo.reset()
        end_implicit_requests()
        torch._dynamo.utils.counters.clear()
        lm.forward = torch.compile(lm.forward, backend=backend, **options)
        draw = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for batch, length in ((1, 5), (1, 9), (2, 6), (2, 11)):
                lm.generate(torch.randint(0, 64, (batch, length), generator=draw), max_new_tokens=5, do_sample=False)
            counts[backend] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            with torch.compiler.set_stance("fail_on_recompile"), flashu_compile.summary() as done:
                for _ in range(20):
                    batch = int(torch.randint(1, 4, (), generator=draw))
                    length = int(torch.randint(3, 15, (), generator=draw))
                    lm.generate(torch.randint(0, 64, (batch, length), generator=draw), max_new_tokens=5,
                                do_sample=False)
        skip_sets |= {s for r in done.requests for s in r.skipped if s}
    assert counts["flashu"] == counts["eager"], counts
    assert len(skip_sets) >= 2, skip_sets  # the skip sets did change from prompt to prompt


def test_show_o2_answers_with_layer_skip_compile_nothing_after_warm_up(tokenizer):
    """The Show-o2 answer path: after two answers, new images and questions of other lengths compile nothing."""
    model = Showo2.random(small_config(num_layers=4), seed=3).attach(tokenizer=tokenizer)
    torch._dynamo.reset()
    end_implicit_requests()
    compiled = compile_tasks(model, "flashu", {"passes": ["layer_skip"], "lowering": "eager", "skip_ratio": 0.5})
    draw = torch.Generator().manual_seed(0)
    questions = ["what colour is the circle?", "what is left of the square?", "two?", "what colour is it?",
                 "what is the circle left of the blue square?"]
    for question in questions[:2]:
        compiled.answer(torch.rand(3, 32, 32, generator=draw), question, max_new_tokens=6)
    with torch.compiler.set_stance("fail_on_recompile"), flashu_compile.summary() as done:
        for i in range(10):
            compiled.answer(torch.rand(3, 32, 32, generator=draw), questions[i % len(questions)], max_new_tokens=6)
    assert len({s for r in done.requests for s in r.skipped if s}) >= 2
