"""flashu_compile.summary: what a compiled model did, per request."""

import torch

import flashu_compile
from flashu_compile.models.showo2 import Showo2
from flashu_compile.runtime.summary import group
from flashu_compile.runtime.timeline import CallRecord
from tests.conftest import small_config


def _record(task, step, phase="rewritten", skipped=(), actions=(), flops=10):
    return CallRecord(task, step, phase, skipped, False, actions, flops)


def test_calls_are_grouped_into_requests_by_their_steps():
    records = [_record("t2i", 1, actions=("store",)), _record("t2i", 2, actions=("reuse",), skipped=(2,)),
               _record("mmu", 1), _record("t2i", 3, phase="full"), _record("mmu", 2), _record("t2i", 1),
               _record("t2i", 0, phase="outside")]
    requests = group(records)
    assert [(r.task, [c.step for c in r.calls]) for r in requests] == [
        ("t2i", [1, 2, 3]), ("mmu", [1, 2]), ("t2i", [1]), ("t2i", [0])]
    first = requests[0]
    assert first.phases == {"rewritten": 2, "full": 1} and first.cache == {"store": 1, "reuse": 1}
    assert first.skipped == {(): 2, (2,): 1} and first.flops == 30


def test_the_summary_of_a_compiled_model_says_what_it_did(tokenizer):
    model = Showo2.random(small_config(), seed=3).attach(tokenizer=tokenizer)
    torch._dynamo.reset()
    model.compile(backend="flashu", options={"passes": ["head_cache"], "cache_interval": 2, "hybrid_tau": 2,
                                             "lowering": "eager"})
    with flashu_compile.summary() as done:
        model.generate_images(["red circle"], steps=7, guidance=2.0, progress=False)
        model.answer(torch.rand(3, 32, 32), "what colour is the circle?", max_new_tokens=3)
    t2i, mmu = done.requests
    assert (t2i.task, len(t2i.calls), t2i.phases) == ("t2i", 6, {"rewritten": 4, "full": 2})
    assert t2i.cache == {"store": 2, "reuse": 2}  # calls 1 and 3 refresh the head, 2 and 4 reuse it
    assert mmu.task == "mmu" and 1 <= len(mmu.calls) <= 3 and mmu.flops > 0
    text = str(done)
    assert text.startswith("flashu: 2 request(s)") and "reuse x2" in text and "2 full" in text


def test_totals_take_a_tasks_requests_together_and_say_when_flops_were_not_counted():
    from flashu_compile.runtime.summary import RequestSummary, Summary
    from flashu_compile.runtime.timeline import CallRecord

    def call(step, skipped=(), flops=None):
        return CallRecord("t2i", step, "rewritten", skipped, False, (), flops)

    done = Summary([RequestSummary("t2i", [call(1), call(2, (1,))]), RequestSummary("t2i", [call(1, (1,))])])
    (line,) = done.totals()
    assert line.startswith("2 request(s): t2i      3 calls (3 rewritten)")
    assert "2 call(s) skip [1]" in line and line.endswith("FLOPs not counted")
    counted = Summary([RequestSummary("t2i", [call(1, flops=2_000_000)])])
    assert counted.totals()[0].endswith("| 2.0 MFLOP")
