"""Compile phases: own times that never count a second twice, and the phases of a real (eager-lowered) compile."""

import time
import warnings

import pytest
import torch

from flashu_compile.models.showo2 import Showo2
from flashu_compile.runtime.compile_profile import DYNAMO, REQUEST, phase, piece_kind, profiled, profiling
from flashu_compile.tasks import compile_tasks
from tests.conftest import small_config


def test_nested_phases_record_their_own_time():
    with profiling() as profile:
        with phase("outer"):
            time.sleep(0.05)
            with phase("inner"):
                time.sleep(0.1)
        with phase("inner"):
            pass
    seconds = {name: p.seconds for name, p in profile.phases.items()}
    counts = {name: p.count for name, p in profile.phases.items()}
    assert counts["outer"] == 1 and counts["inner"] == 2
    assert 0.05 <= seconds["outer"] < 0.1  # the inner sleep is the inner phase's, not the outer's too
    assert seconds["inner"] >= 0.1
    assert DYNAMO not in seconds  # nothing was compiled
    assert sum(seconds.values()) == pytest.approx(profile.total_s)


def test_phases_outside_a_profile_record_nothing():
    @profiled("double")
    def double(x: int) -> int:
        return 2 * x

    assert double(3) == 6
    with profiling() as profile:
        assert double(4) == 8
    assert double(5) == 10
    assert profile.phases["double"].count == 1


def test_piece_kinds():
    def named(name: str) -> torch.nn.Module:
        return torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph(), class_name=name)

    assert [piece_kind(named(n)) for n in ("flashu_layer_12", "segment_0", "flashu_head_trunk", "flashu_prefix")] == [
        "layer", "segment", "head trunk", "prefix"]
    assert piece_kind(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())) == "graph"


def test_a_compile_is_profiled_phase_by_phase(tokenizer, one_thread):
    layers = 4
    model = Showo2.random(small_config(num_layers=layers), seed=5).attach(tokenizer=tokenizer)
    torch._dynamo.reset()
    compiled = compile_tasks(model, "flashu", {"passes": ["layer_skip"], "lowering": "eager", "skip_ratio": 0.5,
                                              "hybrid_tau": 0})
    with warnings.catch_warnings(), profiling() as profile:
        warnings.simplefilter("ignore")
        compiled.generate_images(["a red circle"], steps=3, guidance=1.0, progress=False)
    phases = profile.phases
    # One denoising graph is indexed and rewritten; its layers are outlined once each and lowered on first use.
    assert phases["structure index"].count >= 1 and phases["pass layer_skip"].count == 1
    assert phases["outlining"].count == layers and phases["lowering layer"].count == layers
    assert phases["lowering segment"].count >= 1 and phases[DYNAMO].seconds > 0
    assert all(p.seconds >= 0 for p in phases.values())
    # The phases share out the span: what no phase claims is the request's own run.
    assert sum(p.seconds for p in phases.values()) == pytest.approx(profile.total_s)
    assert phases[REQUEST].seconds < profile.total_s
    data = profile.to_dict()
    assert data["total_s"] == profile.total_s and {"phase": "outlining", "seconds": phases["outlining"].seconds,
                                                   "count": layers} in data["phases"]
    # The eager lowering compiles no kernel: every compile cache counter is there, at zero.
    assert data["caches"] == dict.fromkeys(["fx graph cache hits", "fx graph cache misses", "fx graph cache bypasses",
                                            "aot autograd cache hits", "aot autograd cache misses"], 0)


def test_cache_counts_are_those_of_the_span():
    from torch._dynamo.utils import counters

    counters["inductor"]["fxgraph_cache_hit"] += 5
    with profiling() as profile:
        counters["inductor"]["fxgraph_cache_hit"] += 2
        counters["inductor"]["fxgraph_cache_miss"] += 1
    assert profile.caches["fx graph cache hits"] == 2 and profile.caches["fx graph cache misses"] == 1
