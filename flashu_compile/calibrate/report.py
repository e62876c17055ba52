"""Specialization report: how much the generation and understanding keep sets overlap, per layer (the numbers
come from :func:`plan.specialization`; this module prints and draws them).

A low Jaccard overlap means the two tasks rely on different FFN neurons in that layer (the
paper's "parameter specialization"); the compiler exploits it by ordering neurons as
[generation-only | shared | understanding-only | neither].
"""

from __future__ import annotations

import os
from pathlib import Path

from .plan import Plan, specialization


def format_specialization(plan: Plan) -> str:
    """A terminal table: per layer, kept counts per task and the t2i/mmu overlap."""
    rows = specialization(plan)
    header = ["layer", "path", "FFN", *(f"kept {t}" for t in plan.tasks)]
    has_pair = rows and rows[0]["jaccard"] is not None
    if has_pair:
        header += ["shared", "t2i only", "mmu only", "Jaccard"]
    table = []
    for row in rows:
        cells = [str(row["layer"]), row["path"], str(row["intermediate_size"]),
                 *(str(row["kept"][t]) for t in plan.tasks)]
        if has_pair:
            cells += [str(row["shared"]), str(row["t2i_only"]), str(row["mmu_only"]), f"{row['jaccard']:.3f}"]
        table.append(cells)
    widths = [max([len(h), *(len(r[c]) for r in table)]) for c, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        # Text columns left-aligned, numbers right-aligned.
        return "  ".join(c.ljust(w) if k == 1 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths,
                                                                                              strict=True)))

    out = [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in table)]
    if has_pair:
        mean = sum(r["jaccard"] for r in rows) / len(rows)
        out.append(f"mean Jaccard(t2i, mmu) = {mean:.3f} over {len(rows)} layers")
    return "\n".join(out)


def draw_specialization(plan: Plan, png_path: str | os.PathLike) -> Path:
    """Save a PNG: the t2i/mmu Jaccard overlap per layer (top) and kept counts per task (bottom)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("drawing the specialization chart needs matplotlib: "
                          "pip install 'flashu-compile[plot]'") from err

    rows = specialization(plan)
    x = list(range(len(rows)))
    # A bare Figure with the Agg canvas: no pyplot global state, works without a display.
    fig = Figure(figsize=(max(6.0, 0.35 * len(rows) + 3), 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    if rows and rows[0]["jaccard"] is not None:
        bars = top.bar(x, [r["jaccard"] for r in rows], color="tab:purple")
        top.bar_label(bars, fmt="%.2f", fontsize="small")
        top.set_ylim(0, 1.1)
        top.set_ylabel("Jaccard(t2i, mmu)")
        top.set_title("overlap of the generation and understanding keep sets")
    else:
        top.text(0.5, 0.5, "needs both t2i and mmu keep sets", ha="center", va="center", transform=top.transAxes)
        top.set_axis_off()
    tasks = plan.tasks
    width = 0.8 / (len(tasks) + 1)
    for k, task in enumerate(tasks):
        bottom.bar([i + (k - len(tasks) / 2) * width for i in x], [r["kept"][task] for r in rows], width,
                   label=f"kept {task}")
    if rows and rows[0]["shared"] is not None:
        bottom.bar([i + len(tasks) / 2 * width for i in x], [r["shared"] for r in rows], width, label="shared",
                   color="tab:gray")
    bottom.plot(x, [r["intermediate_size"] for r in rows], "k_", markersize=12, label="FFN size")
    bottom.set_ylabel("neurons")
    bottom.set_xlabel("decoder layer")
    bottom.set_xticks(x)
    # Headroom above the FFN-size marks keeps the legend clear of the bars.
    bottom.set_ylim(0, 1.3 * max([r["intermediate_size"] for r in rows], default=1))
    bottom.legend(loc="upper center", ncol=len(tasks) + 2, fontsize="small")
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
