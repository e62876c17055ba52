"""One compiled program serves every batch size a user sends, in any order, with the same results.

Dynamo traces the first size statically and the second with a symbolic batch, then reuses that
graph for every later size; each piece the program compiles (segments, guarded regions, the
full-network graph of the final phase) must therefore serve every size the graph admits.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.sampling import generate_latents
from flashu_compile.tasks import compile_tasks
from tests.conftest import small_config
from tests.passes.reference import assert_close_rel, latent_noise, reference_generate

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a red square"]
STEPS = 7
# Both phases occur within STEPS - 1 = 6 calls: rewritten steps 1-4, the full network for 5-6.
SETTINGS = {"skip_ratio": 0.5, "skip_interval": 3, "cache_interval": 2, "hybrid_tau": 3}


@pytest.fixture(scope="module")
def model(tokenizer):
    return Showo2.random(small_config(num_layers=4), seed=5).attach(tokenizer=tokenizer)


def _serve(model, options, sizes):
    """Latents for one request per batch size in ``sizes``, all from one compilation."""
    torch._dynamo.reset()
    compiled = compile_tasks(model, "flashu", options)
    return [generate_latents(model, model.tokenizer, PROMPTS[:b], steps=STEPS, guidance=4.0,
                             noise=latent_noise(model, b, seed=b), progress=False, denoise=compiled.entries["denoise"],
                             rules=compiled.rules) for b in sizes]


def _reference(model, b, passes):
    return reference_generate(model, PROMPTS[:b], STEPS, 4.0, latent_noise(model, b, seed=b),
                              layer_skip="layer_skip" in passes, head_cache="head_cache" in passes,
                              tau=SETTINGS["hybrid_tau"], skip_interval=SETTINGS["skip_interval"],
                              skip_ratio=SETTINGS["skip_ratio"], cache_interval=SETTINGS["cache_interval"])


def test_inductor_serves_three_batch_sizes(model):
    # Before the full-network graph compiled on fakes, the third request (batch 1 after 3) failed in
    # Inductor's size assertion: that graph had been compiled for the second request's batch alone.
    passes = ("layer_skip", "head_cache")
    got = _serve(model, {**SETTINGS, "passes": list(passes), "lowering": "inductor"}, [1, 3, 1])
    for b, latents in zip([1, 3, 1], got, strict=True):
        assert latents.shape[0] == b
        assert_close_rel(latents, _reference(model, b, passes), rel=1e-4)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 3), min_size=2, max_size=4),
       passes=st.sampled_from([("head_cache",), ("layer_skip",), ("layer_skip", "head_cache")]))
def test_any_batch_sequence_equals_the_reference(model, sizes, passes):
    got = _serve(model, {**SETTINGS, "passes": list(passes), "lowering": "eager"}, sizes)
    for b, latents in zip(sizes, got, strict=True):
        assert_close_rel(latents, _reference(model, b, passes))
