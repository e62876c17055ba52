"""Controller decisions that do not need a compiled graph."""

from flashu_compile.runtime.guards import Controller
from flashu_compile.runtime.request import request
from flashu_compile.runtime.schedule import StepRules


def test_only_an_answer_after_its_prefill_has_a_settled_skip_set():
    mmu = Controller("mmu", StepRules(skip_interval=3), num_layers=4, skip_ratio=0.5, phased=False)
    t2i = Controller("t2i", StepRules(skip_interval=3), num_layers=4, skip_ratio=0.5, phased=False)
    assert mmu.settled_skip() is None  # outside a request
    with request("mmu", 4) as req:
        req.advance()
        assert mmu.settled_skip() is None  # the prefill measures the layers
        mmu.state().importance.update({0: 0.01, 1: 0.0, 2: 0.3, 3: 0.05})
        for _ in range(3):
            req.advance()
            assert mmu.settled_skip() == frozenset({1, 3})  # layer 0 always runs in an answer
    with request("t2i", 9) as req:
        for _ in range(9):
            req.advance()
            t2i.state().importance.update({i: i / 10 for i in range(4)})
            assert t2i.settled_skip() is None  # re-measured every 3 steps: never settled
        assert t2i.state().skip  # while layers were being skipped
