"""Views of a :class:`~flashu_compile.tools.graph_diff.report.GraphDiff`: a 100-column terminal text and one HTML page.

The HTML page is self-contained (inline CSS and script, no external resource), so it opens from
disk or an archived CI artifact without a network.
"""

from __future__ import annotations

import html
import re
import textwrap

from .report import GraphDiff, GuardInfo, ModuleChange, PassDiff

WIDTH = 100
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "blue": "34", "cyan": "36"}
_PATH = 44  # module column of the terminal view
DETAIL_LINES = 4  # node changes shown per module in the terminal; the JSON and HTML have all of them


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _flops(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _arrow(before: str, after: str) -> str:
    return before if before == after else f"{before} → {after}"


def _shape(shape: list[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _fit(text: str, width: int) -> str:
    """Shorten a module path from the left, where paths repeat their prefix."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1:]


def _cut(text: str, width: int) -> str:
    """Shorten a node description from the right: its op comes first."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _first_line(diverged) -> str:
    if diverged is None:
        return "none"
    return f"{_fit(diverged.node, 50)}  max-abs {diverged.max_abs:.2e}  cos {diverged.cosine:.4f}"


# ----------------------------------------------------------------------------- terminal


class _Term:
    def __init__(self, color: bool) -> None:
        self.color = color
        self.lines: list[str] = []

    def c(self, text: str, *styles: str) -> str:
        if not self.color or not styles:
            return text
        return f"\x1b[{';'.join(_CODES[s] for s in styles)}m{text}\x1b[0m"

    def add(self, text: str = "") -> None:
        self.lines.append(text)

    def wrap(self, label: str, text: str, indent: int) -> None:
        pad = " " * indent
        first = f"{pad}{label}"
        body = textwrap.wrap(text, WIDTH - len(first) - 1) or [""]
        self.add(first + " " + body[0])
        for line in body[1:]:
            self.add(" " * (len(first) + 1) + line)


def render_terminal(diff: GraphDiff, title: str, color: bool = True) -> str:
    """The diff as text no wider than 100 columns, with ANSI colour when ``color``."""
    t = _Term(color)
    t.add(t.c(title, "bold"))
    opts = diff.options
    t.add(f"passes {', '.join(opts['passes']) or 'none'} · preset {opts['preset']} · task {opts['task']} · "
          f"lowering eager")
    t.add(f"{len(diff.graphs)} graph(s) compiled in {diff.compile_seconds:.2f} s · {diff.recompiles} recompiles "
          f"serving calls 1-{diff.step} · numbers at call {diff.step} · tolerance {diff.tolerance:.0e}")
    for graph in diff.graphs:
        t.add()
        head = (f"━━ graph {graph.index} · {graph.task or 'no pass ran'} · {graph.nodes} nodes · params "
                f"{_bytes(graph.param_bytes)} · {_flops(graph.flops)}FLOP per call ")
        t.add(t.c(head + "━" * max(0, WIDTH - len(head)), "bold", "blue"))
        for p in graph.passes:
            _term_pass(t, p)
    return "\n".join(t.lines) + "\n"


def _term_pass(t: _Term, p: PassDiff) -> None:
    t.add()
    state = t.c("changed", "green") if p.changed else t.c("skipped: " + (p.skipped_reason or "no change"), "yellow")
    t.add(f"{t.c('▶ ' + p.name, 'bold', 'cyan')}  {state}  {p.seconds * 1000:.1f} ms")
    t.add(f"  nodes {_arrow(str(p.nodes_before), str(p.nodes_after))} · params "
          f"{_arrow(_bytes(p.param_bytes_before), _bytes(p.param_bytes_after))} · FLOPs "
          f"{_arrow(_flops(p.flops_before), _flops(p.flops_after))}")
    if p.stats:
        t.wrap("stats", " ".join(f"{k}={v}" for k, v in p.stats.items()), 2)
    structural = [m for m in p.modules if m.added or m.removed or m.replaced or m.reshaped or m.params]
    if structural:
        t.add(t.c(f"  {'module':<{_PATH}} {'nodes':<8} {'params':<22} FLOPs", "dim"))
    for m in structural:
        _term_module(t, m)
    flops_only = [m for m in p.modules if m not in structural]
    if flops_only:
        before, after = sum(m.flops_before for m in flops_only), sum(m.flops_after for m in flops_only)
        t.add(f"  FLOPs only, {len(flops_only)} modules: {_arrow(_flops(before), _flops(after))}")
        largest = sorted(flops_only, key=lambda m: m.flops_after - m.flops_before)[:3]
        for m in largest:
            t.add(t.c(f"      {_fit(m.path, _PATH):<{_PATH}} {_arrow(_flops(m.flops_before), _flops(m.flops_after))}",
                      "dim"))
    described: set[tuple[str, str, str]] = set()
    for g in p.guards:
        _term_guard(t, g, brief=(g.kind, g.refresh, g.shapes) in described)
        described.add((g.kind, g.refresh, g.shapes))
    d = p.divergence
    if d is not None:
        t.add(f"  divergence at call {d.step}: {d.compared} nodes compared, {d.shape_changed} reshaped, "
              f"{d.diverging} beyond tolerance")
        t.add(f"    first:          {t.c(_first_line(d.first), 'red' if d.first else 'green')}")
        t.add(f"    first new here: {t.c(_first_line(d.first_new), 'red' if d.first_new else 'green')}")


def _term_module(t: _Term, m: ModuleChange) -> None:
    counts = " ".join(s for s in (f"+{len(m.added)}" if m.added else "", f"-{len(m.removed)}" if m.removed else "",
                                  f"~{len(m.replaced) + len(m.reshaped)}" if m.replaced or m.reshaped else "") if s)
    size_b, size_a = sum(x.bytes_before for x in m.params), sum(x.bytes_after for x in m.params)
    params = _arrow(_bytes(size_b), _bytes(size_a)) if m.params else ""
    flops = _arrow(_flops(m.flops_before), _flops(m.flops_after)) if m.flops_before != m.flops_after else ""
    path = _fit(m.path, _PATH)
    t.add(f"  {t.c(path, 'bold')}{' ' * (_PATH - len(path))} {counts:<8} {params:<22} {flops}".rstrip())
    for x in m.params:
        t.add(f"      {x.name.rsplit('.', 1)[-1]} {_shape(x.shape_before)} → {_shape(x.shape_after)}")
    changes = [(t.c("+", "green"), c.after, None) for c in m.added] + [
        (t.c("-", "red"), c.before, None) for c in m.removed] + [
        (t.c("~", "yellow"), c.before, c.after) for c in m.replaced + m.reshaped]
    for sign, text, new in changes[:DETAIL_LINES]:
        t.add(f"      {sign} {_cut(text, WIDTH - 8)}")
        if new is not None:
            t.add(f"      {t.c('⇒', 'yellow')} {_cut(new, WIDTH - 8)}")
    if len(changes) > DETAIL_LINES:
        t.add(t.c(f"      … {len(changes) - DETAIL_LINES} more (JSON / HTML have them all)", "dim"))


def _term_guard(t: _Term, g: GuardInfo, brief: bool) -> None:
    """``brief``: a guard of a kind already shown with the same schedule (the next decoder layer's)."""
    if g.region == "-":  # an in-graph op (token_drop), not a guard around a region
        t.add(f"  {t.c('op ' + g.kind, 'bold', 'yellow')} after {_fit(g.module, 40)} ({g.nodes} nodes added)")
    else:
        t.add(f"  {t.c('guard ' + g.kind, 'bold', 'yellow')} → {g.region} for {_fit(g.module, 30)} "
              f"({g.nodes} nodes, {len(g.modules)} modules)" + (", as above" if brief else ""))
    if brief:
        return
    t.wrap("reads:  ", g.reads, 6)
    t.wrap("refresh:", g.refresh, 6)
    t.wrap("shapes: ", g.shapes, 6)


def visible_width(text: str) -> int:
    """Columns ``text`` takes on a terminal (ANSI escapes take none)."""
    return len(_ANSI.sub("", text))


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2330;background:#fbfbfd}
h1{font-size:1.3em}h2{font-size:1.15em;border-bottom:2px solid #3b5bdb;padding-bottom:.2em}
h3{font-size:1.05em;margin-bottom:.3em}code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #d5d9e2;padding:.2em .5em;vertical-align:top}
th{background:#eef1f7;text-align:left}.num{text-align:right}
details{margin:.25em 0 .25em 1em}summary{cursor:pointer}summary .mono{font-weight:600}
.side{table-layout:fixed;width:calc(100% - 1em);margin:.3em 0 .6em 1em;background:#fff}
.side td{width:50%;overflow-wrap:anywhere}
.add{color:#1b7f3b}.del{color:#b42318}.chg{color:#9a6700}.badge{font-size:.8em;padding:0 .4em;border-radius:.6em;
background:#eef1f7;margin-left:.4em}.bad{background:#fde2e1;color:#b42318}.ok{background:#dcf5e3;color:#1b7f3b}
.guard{background:#fff8e6;border:1px solid #f0d48a;padding:.4em .7em;margin:.4em 0 .4em 1em}
"""

_SCRIPT = """
function setAll(open){document.querySelectorAll('details.module').forEach(d=>{d.open=open;});}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def render_html(diff: GraphDiff, title: str) -> str:
    """One self-contained page: per pass, modules side by side (before | after), collapsible."""
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
           f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>",
           f"<h1>{_e(title)}</h1>",
           f"<p>passes <code>{_e(', '.join(diff.options['passes']) or 'none')}</code> · preset "
           f"<code>{_e(diff.options['preset'])}</code> · task <code>{_e(diff.options['task'])}</code> · "
           f"{len(diff.graphs)} graph(s) compiled in {diff.compile_seconds:.2f} s · {diff.recompiles} recompiles "
           f"serving calls 1-{diff.step} · numbers at call {diff.step}, tolerance {diff.tolerance:.0e}</p>",
           "<p><button onclick='setAll(true)'>expand all modules</button> "
           "<button onclick='setAll(false)'>collapse all modules</button></p>"]
    for graph in diff.graphs:
        out.append(f"<h2>graph {graph.index} · {_e(graph.task or 'no pass ran')} · {graph.nodes} nodes · params "
                   f"{_bytes(graph.param_bytes)} · {_flops(graph.flops)}FLOP per call</h2>")
        out.append("<table><tr><th>pass</th><th>result</th><th class='num'>compile time</th><th>nodes</th>"
                   "<th>params</th><th>FLOPs</th><th>stats</th></tr>")
        for p in graph.passes:
            result = "changed" if p.changed else f"skipped: {p.skipped_reason or 'no change'}"
            out.append(f"<tr><td><a href='#g{graph.index}-{_e(p.name)}'>{_e(p.name)}</a></td><td>{_e(result)}</td>"
                       f"<td class='num'>{p.seconds * 1000:.1f} ms</td>"
                       f"<td>{_arrow(str(p.nodes_before), str(p.nodes_after))}</td>"
                       f"<td>{_arrow(_bytes(p.param_bytes_before), _bytes(p.param_bytes_after))}</td>"
                       f"<td>{_arrow(_flops(p.flops_before), _flops(p.flops_after))}</td>"
                       f"<td class='mono'>{_e(', '.join(f'{k}={v}' for k, v in p.stats.items()))}</td></tr>")
        out.append("</table>")
        for p in graph.passes:
            out.extend(_html_pass(graph.index, p))
    out.append("</body></html>\n")
    return "\n".join(out)


def _html_pass(graph: int, p: PassDiff) -> list[str]:
    out = [f"<h3 id='g{graph}-{_e(p.name)}'>{_e(p.name)}</h3>"]
    for g in p.guards:
        modules = "".join(f"<li class='mono'>{_e(m)}: {n}</li>" for m, n in g.modules.items())
        where = (f"after <code>{_e(g.module)}</code>" if g.region == "-" else
                 f"→ region <code>{_e(g.region)}</code> for <code>{_e(g.module)}</code>")
        out.append(f"<div class='guard'><b>{'op' if g.region == '-' else 'guard'} <code>{_e(g.kind)}</code></b> "
                   f"{where}<br>reads: {_e(g.reads)}<br>refresh: {_e(g.refresh)}"
                   f"<br>shapes: {_e(g.shapes)}<details><summary>{g.nodes} nodes of {len(g.modules)} modules moved "
                   f"into the region</summary><ul>{modules}</ul></details></div>")
    for m in p.modules:
        out.append(_html_module(m))
    d = p.divergence
    if d is not None:
        verdict = "".join(
            f"<span class='badge bad'>{label}: <code>{_e(n.node)}</code> max-abs {n.max_abs:.2e}, "
            f"cos {n.cosine:.4f}</span>" if n else f"<span class='badge ok'>{label}: none</span>"
            for label, n in (("first beyond tolerance", d.first), ("first new in this pass", d.first_new)))
        rows = "".join(
            f"<tr class='{'del' if n.diverges else ''}'><td class='mono'>{_e(n.node)}</td>"
            f"<td class='mono'>{_arrow(_shape(n.shape_before), _shape(n.shape_after))}</td>"
            f"<td class='num'>{'' if n.max_abs is None else f'{n.max_abs:.2e}'}</td>"
            f"<td class='num'>{'' if n.cosine is None else f'{n.cosine:.5f}'}</td></tr>" for n in d.nodes)
        out.append(f"<p>divergence at call {d.step} versus the unrewritten graph: {d.compared} nodes compared, "
                   f"{d.shape_changed} reshaped, {d.diverging} beyond tolerance {verdict}</p>"
                   f"<details><summary>every compared node</summary><table><tr><th>node</th><th>shape</th>"
                   f"<th>max-abs</th><th>cosine</th></tr>{rows}</table></details>")
    return out


def _html_module(m: ModuleChange) -> str:
    badges = "".join(f"<span class='badge'>{label} {n}</span>" for label, n in (
        ("+", len(m.added)), ("−", len(m.removed)), ("replaced", len(m.replaced)), ("reshaped", len(m.reshaped)))
        if n)
    if m.flops_before != m.flops_after:
        badges += f"<span class='badge'>FLOPs {_arrow(_flops(m.flops_before), _flops(m.flops_after))}</span>"
    # One row per change, so a node's before and after sit on the same line.
    rows = [(c.before, "", c.after, "chg") for c in m.replaced + m.reshaped]
    rows += [("", "", c.after, "add") for c in m.added] + [(c.before, "del", "", "") for c in m.removed]
    rows += [(f"{x.name} {_shape(x.shape_before)} · {_bytes(x.bytes_before)}", "",
              f"{x.name} {_shape(x.shape_after)} · {_bytes(x.bytes_after)}", "chg") for x in m.params]
    rows.append((f"FLOPs {_flops(m.flops_before)}", "", f"FLOPs {_flops(m.flops_after)}", ""))
    body = "".join(f"<tr><td class='mono {bc}'>{_e(b)}</td><td class='mono {ac}'>{_e(a)}</td></tr>"
                   for b, bc, a, ac in rows)
    return (f"<details class='module'><summary><span class='mono'>{_e(m.path)}</span>{badges}</summary>"
            f"<table class='side'><tr><th>before</th><th>after</th></tr>{body}</table></details>")
