"""The request timeline as an SVG picture: one column per model call.

Lanes, top to bottom: the phase the call ran in, each decoder layer (ran, skipped, or ran to
measure importance), what the memoized regions did (store, reuse, compute), the guidance scale
and the call's FLOPs (bars against the largest). Every cell carries a ``<title>`` so a browser
shows the exact value on hover. The SVG is inline text: the HTML page stays self-contained.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from ..runtime.timeline import CallRecord

PHASE_COLOURS = {"rewritten": "#4c78a8", "full": "#9d9d9d", "specialized": "#54a24b", "outside": "#ffffff"}
LAYER_COLOURS = {"ran": "#c6d7ea", "skipped": "#ffffff", "measured": "#f58518"}
ACTION_LETTERS = {"store": "S", "reuse": "R", "compute": "C", "prefix store": "PS", "prefix reuse": "PR"}
_CELL, _LABEL, _BAR = 22, 92, 40


def _flops(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}FLOP"
    return f"{n} FLOP"


def render_timeline_svg(calls: Sequence[CallRecord], num_layers: int, scales: Sequence[float] | None = None) -> str:
    """An SVG of ``calls`` (records of one request, in order) for a model of ``num_layers`` decoder layers.

    ``scales`` are the guidance scales of the calls (as the sampler computed them); the guidance lane
    is left out without them. Raises ValueError when there is nothing to draw or the lengths disagree.
    """
    if not calls:
        raise ValueError("the timeline has no calls: no flashu program served a request while recording")
    if scales is not None and len(scales) != len(calls):
        raise ValueError(f"{len(scales)} guidance scales for {len(calls)} calls")
    if any(i >= num_layers for c in calls for i in c.skipped):
        raise ValueError(f"a call skipped a layer beyond the model's {num_layers} layers")
    x0 = _LABEL
    width = x0 + _CELL * len(calls) + 8
    out: list[str] = []
    y = 4

    def label(text: str, top: float, height: float) -> None:
        out.append(f'<text x="4" y="{top + height / 2 + 4:.1f}" font-size="11">{escape(text)}</text>')

    def cell(i: int, top: float, height: float, fill: str, title: str, text: str = "") -> None:
        x = x0 + i * _CELL
        out.append(f'<g><title>{escape(title)}</title><rect x="{x}" y="{top:.1f}" width="{_CELL - 2}" '
                   f'height="{height:.1f}" fill="{fill}" stroke="#555" stroke-width="0.5"/>')
        if text:
            out.append(f'<text x="{x + (_CELL - 2) / 2}" y="{top + height / 2 + 4:.1f}" font-size="9" '
                       f'text-anchor="middle">{escape(text)}</text>')
        out.append("</g>")

    label("call", y, _CELL)
    for i, c in enumerate(calls):
        out.append(f'<text x="{x0 + i * _CELL + (_CELL - 2) / 2}" y="{y + _CELL / 2 + 4}" font-size="9" '
                   f'text-anchor="middle">{c.step}</text>')
    y += _CELL
    label("phase", y, _CELL)
    for i, c in enumerate(calls):
        cell(i, y, _CELL - 2, PHASE_COLOURS[c.phase], f"call {c.step}: {c.phase}")
    y += _CELL
    for layer in range(num_layers):
        label(f"layer {layer}", y, _CELL - 4)
        for i, c in enumerate(calls):
            state = "skipped" if layer in c.skipped else ("measured" if c.measured else "ran")
            cell(i, y, _CELL - 6, LAYER_COLOURS[state], f"call {c.step}, layer {layer}: {state}")
        y += _CELL - 4
    y += 4
    label("cache", y, _CELL)
    for i, c in enumerate(calls):
        text = "+".join(ACTION_LETTERS.get(a, a) for a in c.actions)
        cell(i, y, _CELL - 2, "#ffffff", f"call {c.step}: {', '.join(c.actions) or 'no memoized region ran'}", text)
    y += _CELL
    bars = [("guidance", list(scales), lambda v: f"{v:g}")] if scales is not None else []
    if all(c.flops is not None for c in calls):
        bars.append(("FLOPs", [c.flops for c in calls], _flops))
    for name, values, fmt in bars:
        label(name, y, _BAR)
        top = max(values) or 1
        for i, (c, v) in enumerate(zip(calls, values, strict=True)):
            h = _BAR * v / top
            out.append(f'<g><title>{escape(f"call {c.step}: {name} {fmt(v)}")}</title><rect '
                       f'x="{x0 + i * _CELL}" y="{y + _BAR - h:.1f}" width="{_CELL - 2}" height="{h:.1f}" '
                       f'fill="#72b7b2"/></g>')
        out.append(f'<line x1="{x0}" y1="{y + _BAR}" x2="{width - 8}" y2="{y + _BAR}" stroke="#555"/>')
        y += _BAR + 8
    legend = [(PHASE_COLOURS[p], p) for p in ("rewritten", "full", "specialized")]
    legend += [(LAYER_COLOURS[s], f"layer {s}") for s in ("ran", "skipped", "measured")]
    x = 4
    for colour, text in legend:
        out.append(f'<rect x="{x}" y="{y}" width="10" height="10" fill="{colour}" stroke="#555" stroke-width="0.5"/>'
                   f'<text x="{x + 14}" y="{y + 9}" font-size="10">{escape(text)}</text>')
        x += 24 + 6 * len(text)
    out.append(f'<text x="4" y="{y + 26}" font-size="10">cache: S store, R reuse, C compute, '
               'PS/PR text prefix store/reuse</text>')
    y += 32
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{max(width, x)}" height="{y}" '
            f'font-family="sans-serif">' + "".join(out) + "</svg>")
