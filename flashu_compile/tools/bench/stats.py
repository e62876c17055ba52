"""Speedups and savings computed from measured rows, against each task's eager and Inductor baselines."""

from __future__ import annotations

from .rows import Result, split_rows


def _baselines(results: list[Result]) -> dict[tuple[str, str], Result]:
    """The first eager and the first Inductor result of each task, by (task, "eager" | "inductor")."""
    base = {}
    for r in results:
        kind = "eager" if r.name.startswith("eager") else "inductor" if r.name.startswith("inductor") else None
        if kind:
            base.setdefault((r.task, kind), r)
    return base


def speedups(results: list[Result]) -> dict[str, dict[str, float]]:
    """Per result: measured and FLOP-predicted speedup over its task's eager and Inductor baselines."""
    base = _baselines(results)
    out = {}
    for r in results:
        row = {}
        for kind in ("eager", "inductor"):
            b = base.get((r.task, kind))
            if b is not None:
                row[f"vs_{kind}"] = b.median_s / r.median_s
                row[f"flop_ratio_vs_{kind}"] = b.flops / r.flops if r.flops else float("nan")
        out[r.name] = row
    return out


def off_vs_inductor(results: list[Result]) -> dict[str, float]:
    """Warm median of each ``flashu off`` row over its task's Inductor baseline (issue #3: at most 1.05)."""
    base = _baselines(results)
    return {r.name: r.median_s / base[(r.task, "inductor")].median_s for r in results
            if r.name.startswith("flashu off") and (r.task, "inductor") in base}


def technique_savings(results: list[Result]) -> dict[str, dict]:
    """Per-technique row (``split_rows``): its technique and the share of the Inductor baseline's FLOPs it removes."""
    base = _baselines(results).get(("t2i", "inductor"))
    if base is None or not base.flops:
        return {}
    split = split_rows()
    return {r.name: {"technique": split[r.name], "baseline": base.name, "flops_saved": 1 - r.flops / base.flops}
            for r in results if r.name in split}
