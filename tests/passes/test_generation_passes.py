"""Compiled layer_skip / head_cache / guidance schedule against the eager reference semantics."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.sampling import generate_latents
from flashu_compile.options import FlashUOptions
from flashu_compile.tasks import compile_tasks
from tests.conftest import small_config
from tests.passes.reference import assert_close_rel as _close
from tests.passes.reference import compiled_generate, latent_noise, reference_generate

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def model(tokenizer):
    # Four decoder layers so that skip ratios select different numbers of layers.
    return Showo2.random(small_config(num_layers=4), seed=3).attach(tokenizer=tokenizer)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    semantics=st.sampled_from(["project", "flashu-reference"]),
    passes=st.sampled_from([("layer_skip",), ("head_cache",), ("layer_skip", "head_cache")]),
    steps=st.integers(4, 14),
    skip_interval=st.integers(1, 5),
    skip_ratio=st.sampled_from([0.0, 0.25, 0.5, 0.75]),
    cache_interval=st.integers(1, 4),
    tau=st.integers(0, 5),
    schedule=st.sampled_from([None, ((3, 2.0), (2, 4.0)), ((2, 0.0), (3, 5.0)), ((1, 3.0), (1, 0.0))]),
)
def test_compiled_trajectory_equals_reference(model, semantics, passes, steps, skip_interval, skip_ratio,
                                              cache_interval, tau, schedule):
    options = {"passes": list(passes), "lowering": "eager", "step_semantics": semantics, "hybrid_tau": tau,
               "skip_interval": skip_interval, "skip_ratio": skip_ratio, "cache_interval": cache_interval,
               "guidance_schedule": schedule}
    noise = latent_noise(model, len(PROMPTS))
    got = compiled_generate(model, options, PROMPTS, steps, noise, 5.0)
    want = reference_generate(model, PROMPTS, steps, 5.0, noise, layer_skip="layer_skip" in passes,
                              head_cache="head_cache" in passes, semantics=semantics, tau=tau,
                              skip_interval=skip_interval, skip_ratio=skip_ratio, cache_interval=cache_interval,
                              schedule=schedule)
    _close(got, want)


def test_passes_change_the_result(model):
    # Guards that never fire would pass the equivalence test trivially; these settings must act.
    noise = latent_noise(model, len(PROMPTS))
    plain = reference_generate(model, PROMPTS, 8, 5.0, noise)
    for passes in (["layer_skip"], ["head_cache"]):
        got = compiled_generate(model, {"passes": passes, "lowering": "eager", "skip_ratio": 0.5, "skip_interval": 3,
                                        "cache_interval": 3, "hybrid_tau": 0}, PROMPTS, 8, noise, 5.0)
        assert float((got - plain).abs().max()) > 1e-3, passes


def test_inductor_lowering_matches_eager_lowering(model):
    options = {"passes": ["layer_skip", "head_cache"], "skip_ratio": 0.5, "skip_interval": 3, "cache_interval": 2,
               "hybrid_tau": 2, "guidance_schedule": ((2, 0.0), (3, 5.0))}
    noise = latent_noise(model, len(PROMPTS))
    eager = compiled_generate(model, {**options, "lowering": "eager"}, PROMPTS, 8, noise, 5.0)
    inductor = compiled_generate(model, {**options, "lowering": "inductor"}, PROMPTS, 8, noise, 5.0)
    _close(inductor, eager, rel=1e-4)


def test_no_recompiles_after_first_request(model):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    options = {"passes": ["layer_skip", "head_cache"], "lowering": "eager", "skip_ratio": 0.5,
               "skip_interval": 10, "cache_interval": 5, "guidance_schedule": ((24, 7.5), (11, 10.0))}
    compiled = compile_tasks(model, "flashu", options)
    run = {"denoise": compiled.entries["denoise"], "rules": compiled.rules, "progress": False}
    generate_latents(model, model.tokenizer, PROMPTS, steps=50, noise=latent_noise(model, len(PROMPTS)), **run)
    first = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for seed in (1, 2, 3):
        generate_latents(model, model.tokenizer, PROMPTS, steps=50, noise=latent_noise(model, len(PROMPTS), seed),
                         **run)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == first
    assert first <= 2  # at most one graph per batch size (cond + uncond, cond only)


def test_options_reach_the_sampler(model):
    compiled = compile_tasks(model, "flashu", {"guidance_schedule": ((1, 0.0), (1, 5.0)), "lowering": "eager"})
    assert compiled.options == FlashUOptions.from_dict({"guidance_schedule": ((1, 0.0), (1, 5.0)),
                                                        "lowering": "eager"})
