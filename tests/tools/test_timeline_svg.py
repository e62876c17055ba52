"""The request timeline picture: every call, layer state, cache action and bar is drawn and titled."""

import xml.etree.ElementTree as ET

import pytest

from flashu_compile.runtime.timeline import CallRecord
from flashu_compile.tools.timeline_svg import render_timeline_svg

NS = "{http://www.w3.org/2000/svg}"
CALLS = [
    CallRecord("t2i", 1, "rewritten", (), True, ("store",), 1000),
    CallRecord("t2i", 2, "rewritten", (1, 3), False, ("reuse",), 400),
    CallRecord("t2i", 3, "full", (), False, (), 1200),
]


def _titles(svg: str) -> list[str]:
    return [t.text for t in ET.fromstring(svg).iter(f"{NS}title")]


def test_every_cell_is_titled_with_its_state():
    titles = _titles(render_timeline_svg(CALLS, 4, [1.5, 1.5, 2.0]))
    assert "call 2, layer 1: skipped" in titles and "call 2, layer 0: ran" in titles
    assert "call 1, layer 3: measured" in titles and "call 3, layer 1: ran" in titles
    assert sum(t.startswith("call ") and ", layer " in t for t in titles) == 3 * 4
    assert {"call 1: rewritten", "call 2: rewritten", "call 3: full"} <= set(titles)
    assert "call 1: store" in titles and "call 3: no memoized region ran" in titles
    assert "call 3: guidance 2" in titles and "call 2: FLOPs 400 FLOP" in titles


def test_bars_scale_to_the_largest_value():
    root = ET.fromstring(render_timeline_svg(CALLS, 4))
    heights = {g.find(f"{NS}title").text: float(g.find(f"{NS}rect").get("height")) for g in root.iter(f"{NS}g")
               if "FLOP" in g.find(f"{NS}title").text}
    assert heights["call 3: FLOPs 1.20 kFLOP"] == pytest.approx(40.0)
    assert heights["call 2: FLOPs 400 FLOP"] == pytest.approx(40.0 * 400 / 1200, abs=0.05)
    assert not any("guidance" in t for t in _titles(render_timeline_svg(CALLS, 4)))


def test_flops_lane_left_out_when_unknown():
    calls = [CallRecord("mmu", 1, "rewritten", (), True, (), None)]
    assert not any("FLOP" in t for t in _titles(render_timeline_svg(calls, 2)))


@pytest.mark.parametrize(("calls", "layers", "scales", "error"), [
    ([], 4, None, "the timeline has no calls"),
    (CALLS, 4, [1.0], "1 guidance scales for 3 calls"),
    (CALLS, 2, None, "beyond the model's 2 layers"),
])
def test_bad_input_is_named(calls, layers, scales, error):
    with pytest.raises(ValueError, match=error):
        render_timeline_svg(calls, layers, scales)
