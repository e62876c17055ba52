"""The request timeline: one record per program call, with what that call decided and computed."""

import pytest
import torch

import flashu_compile
from flashu_compile.models.showo2 import Showo2
from flashu_compile.runtime import FlopTally
from flashu_compile.runtime.timeline import CallRecord, record_calls
from tests.conftest import small_config
from tests.passes.reference import latent_noise
from tests.runtime.test_request import user_loop

OPTIONS = {"passes": ["layer_skip", "head_cache"], "skip_ratio": 0.5, "skip_interval": 3, "cache_interval": 2,
           "hybrid_tau": 2, "lowering": "eager"}


@pytest.fixture(scope="module")
def model(tokenizer):
    return Showo2.random(small_config(num_layers=4), seed=7).attach(tokenizer=tokenizer)


def test_one_record_per_call_with_phase_skips_cache_and_flops(model):
    torch._dynamo.reset()
    denoise = torch.compile(model.denoise, backend="flashu", options=OPTIONS)
    noise = latent_noise(model, 1, seed=3)
    with flashu_compile.request("t2i", calls=6), record_calls() as calls, FlopTally():
        user_loop(denoise, model, 7, [2.0] * 6, noise)
    assert [c.step for c in calls] == [1, 2, 3, 4, 5, 6]
    # hybrid_tau=2: the last two of six calls run the unrewritten network.
    assert [c.phase for c in calls] == ["rewritten"] * 4 + ["full"] * 2
    # skip_interval=3: importance is measured on calls 1 and 4 (every layer runs), two of four layers skipped between.
    assert [c.measured for c in calls] == [True, False, False, True, False, False]
    assert [len(c.skipped) for c in calls] == [0, 2, 2, 0, 0, 0]
    # cache_interval=2: the flow head is stored on calls 1 and 3, reused on 2 and 4; the full phase keeps nothing.
    assert [c.actions for c in calls] == [("store",), ("reuse",), ("store",), ("reuse",), (), ()]
    full, skipping_and_reusing = calls[0].flops, calls[1].flops
    assert all(c.flops > 0 for c in calls)
    assert skipping_and_reusing < 0.8 * full and calls[4].flops >= calls[3].flops


def test_nothing_recorded_outside_a_recording(model):
    torch._dynamo.reset()
    denoise = torch.compile(model.denoise, backend="flashu", options=OPTIONS)
    with record_calls() as outer:
        pass
    with flashu_compile.request("t2i", calls=2):
        user_loop(denoise, model, 3, [2.0] * 2, latent_noise(model, 1, seed=3))
    assert outer == []


def test_flops_unknown_without_a_tally_and_phase_checked(model):
    torch._dynamo.reset()
    denoise = torch.compile(model.denoise, backend="flashu", options=OPTIONS)
    with flashu_compile.request("t2i", calls=2), record_calls() as calls:
        user_loop(denoise, model, 3, [2.0] * 2, latent_noise(model, 1, seed=3))
    assert len(calls) == 2 and all(c.flops is None for c in calls)
    with pytest.raises(ValueError, match="phase must be one of"):
        CallRecord("t2i", 1, "halfway", (), False, (), None)
