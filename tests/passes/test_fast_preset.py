"""The ``fast`` preset end to end (eager lowering) against the hand-written reference of its parts."""

import torch

from flashu_compile.models.showo2 import Showo2
from flashu_compile.options import FlashUOptions
from flashu_compile.runtime import guidance_scales
from tests.conftest import small_config
from tests.passes.reference import assert_close_rel, compiled_generate, latent_noise, reference_generate, zeroed_copy
from tests.passes.test_prune_channels import _plan


def test_fast_preset_equals_pruning_caches_and_guidance_on_the_first_half_by_hand(tokenizer):
    """Pruned FFNs outside the last tau calls, the head cache, the exact prefix cache, and s0 on the first
    half of the calls with the conditional rows alone after (scale 0: half the batch)."""
    size, layers, steps, s0 = 40, 2, 17, 5.0
    model = Showo2.random(small_config(num_layers=layers, intermediate_size=size), seed=3).attach(tokenizer=tokenizer)
    keep = {"t2i": [torch.arange(0, size, 2)] * layers}
    plan = _plan(model, keep)
    pruned = zeroed_copy(model, keep["t2i"])  # original numbering: made before compiling permutes the weights
    full = zeroed_copy(model, [torch.arange(size)] * layers)
    preset = FlashUOptions.from_dict({"preset": "fast"})
    calls = steps - 1
    assert guidance_scales(preset.guidance_schedule, calls, s0) == [s0] * (calls // 2) + [0.0] * (calls // 2)
    prompts = ["red circle", "two green squares left of the blue triangle"]
    noise = latent_noise(model, len(prompts))
    got = compiled_generate(model, {"preset": "fast", "plan": plan, "lowering": "eager", "strict": True}, prompts,
                            steps, noise, guidance=s0)
    want = reference_generate(full, prompts, steps, s0, noise, head_cache=True, tau=preset.hybrid_tau,
                              cache_interval=preset.cache_interval, pruned=pruned,
                              schedule=((calls // 2, s0), (calls // 2, 0.0)))
    assert_close_rel(got, want)
