"""The bench's reports: the markdown table, bench.json and the chart."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

from ...files import write_atomic
from ...passes.manager import outcomes_text
from .rows import Result
from .stats import _baselines, off_vs_inductor, speedups, technique_savings


def _num(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.2f}"


def _fidelity(r: Result) -> str:
    if r.fidelity is None:
        return "-"
    return f"rel. err {r.fidelity:.3g}" if r.task == "t2i" else f"tokens {r.fidelity:.0%}"


def markdown(results: list[Result], machine: str, command: str) -> str:
    ups = speedups(results)
    gpu = any(r.peak_gpu_mb is not None for r in results)  # the column is there only for runs on a GPU
    lines = [f"Machine: {machine}. Command: `{command}`.", "",
             "| configuration | warm median (s) | spread (s) | × eager | × inductor | FLOPs (G) | FLOP-predicted × "
             "inductor | reached | compile cold (s) | compile warm (s) | peak RSS (MB) | "
             + ("peak GPU (MB) | " if gpu else "") + "graphs | recompiles | fidelity | task score |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
             + ("---: | " if gpu else "") + "---: | ---: | --- | --- |"]
    for r in results:
        u = ups[r.name]
        ideal = u.get("flop_ratio_vs_inductor", float("nan"))
        reached = (u["vs_inductor"] - 1) / (ideal - 1) if ideal and ideal > 1.001 else float("nan")
        score = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.scores.items()) or "-"
        warm = "-" if r.compile_warm_s is None else f"{r.compile_warm_s:.1f}"
        lines.append(
            f"| {r.name} | {r.median_s:.3f} | {min(r.runs_s):.3f}-{max(r.runs_s):.3f} | {_num(u.get('vs_eager'))} | "
            f"{_num(u.get('vs_inductor'))} | {r.flops / 1e9:.2f} | {_num(ideal)} | "
            f"{'-' if reached != reached else f'{reached:.0%}'} | {r.compile_cold_s:.1f} | {warm} | "
            f"{r.peak_rss_mb:.0f} | " + (f"{r.peak_gpu_mb or 0:.0f} | " if gpu else "")
            + f"{r.graphs} | {r.recompiles} | {_fidelity(r)} | {score} |")
    lines += ["", "`reached`: the share of the FLOP-predicted gain over Inductor that the measured time realises, "
              "(measured − 1) / (predicted − 1). `compile cold`: the first request, compilation included, with "
              "empty Inductor caches (the first compiled configuration also pays Inductor's one-time imports); "
              "`compile warm`: the first request again after `torch._dynamo.reset()`, with the on-disk caches the "
              "cold request filled, as a restarted process would see it; `-` where nothing was compiled."]
    answers = [r for r in results if r.prefill_s]
    if answers:
        lines += ["", "Prefill (image + question into the KV cache) within each answer, warm median: " + "; ".join(
            f"{r.name} {statistics.median(r.prefill_s):.4f} s" for r in answers) + ". Tokens per answer: " + "; ".join(
            f"{r.name} {r.tokens}" for r in answers) + "."]
    off = off_vs_inductor(results)
    if off:
        base = _baselines(results)
        ratios = "; ".join(f"{r.name} / {base[(r.task, 'inductor')].name}: {off[r.name]:.3f} "
                           f"({'within' if off[r.name] <= 1.05 else 'over'} 5%)" for r in results if r.name in off)
        lines += ["", f"No pass enabled, warm median over Inductor's (goal at most 1.05): {ratios}."]
    saved = technique_savings(results)
    if saved:
        by_name = {r.name: r for r in results}
        baseline = next(iter(saved.values()))["baseline"]
        lines += ["", f"Savings by technique, each at the paper preset's settings on its own, against {baseline}:", "",
                  f"| technique | configuration | FLOPs (G) | FLOPs saved vs {baseline} | × inductor | fidelity |",
                  "| --- | --- | ---: | ---: | ---: | --- |"]
        for name, row in saved.items():
            r = by_name[name]
            lines.append(f"| {row['technique']} | {name} | {r.flops / 1e9:.2f} | {row['flops_saved']:.1%} | "
                         f"{_num(ups[name].get('vs_inductor'))} | {_fidelity(r)} |")
    did = [r for r in results if r.did]
    if did:
        # Which techniques acted on each row, so a row cannot silently measure less than its name says.
        lines += ["", "What the compiler did on each flashu row: the passes while it compiled, then its FLOP-counted "
                  "request (`flashu_compile.summary()`):",
                  "", "```", *(f"{r.name}: {_passes_text(r)}\n{r.did}" for r in did), "```"]
    for r in results:
        if r.compile_profile:
            lines += ["", *compile_phases(r)]
    return "\n".join(lines)


def _passes_text(r: Result) -> str:
    if not r.techniques and not r.graphs:
        return "compiled no graph: served by the programs an earlier row compiled with the same options"
    return outcomes_text(r.techniques)


def compile_phases(r: Result) -> list[str]:
    """The markdown table of ``r``'s compile phases, cold and warm side by side (``--profile-compile``)."""
    spans = {key: {row["phase"]: row for row in r.compile_profile[key]["phases"]}
             for key in ("cold", "warm") if key in r.compile_profile}
    names = list(dict.fromkeys(name for rows in spans.values() for name in rows))
    lines = [f"Compile time by phase, {r.name} (own time of each phase; `n`: times it ran):", "",
             "| phase | " + " | ".join(f"{key} (s) | {key} n" for key in spans) + " |",
             "| --- | " + " | ".join("---: | ---:" for _ in spans) + " |"]
    for name in names:
        cells = [f"{rows[name]['seconds']:.2f} | {rows[name]['count']}" if name in rows else "- | -"
                 for rows in spans.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| total | " + " | ".join(f"{r.compile_profile[key]['total_s']:.2f} | " for key in spans) + " |")
    caches = {key: r.compile_profile[key].get("caches", {}) for key in spans}
    labels = list(dict.fromkeys(label for counts in caches.values() for label in counts))
    if labels:
        lines += ["", "Compile caches (" + "; ".join(
            f"{key}: " + ", ".join(f"{label} {caches[key].get(label, 0)}" for label in labels) for key in spans) + ")"]
    return lines


def draw(results: list[Result], path: Path) -> None:
    draw_models({"": results}, path)


def draw_models(results: dict[str, list[Result]], path: Path) -> None:
    """One row of charts (text-to-image, answer) per model, titled with its name where it has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(len(results), 2, figsize=(12, 4.5 * len(results)), squeeze=False)
    for axes, (model, rows) in zip(grid, results.items(), strict=True):
        plot(axes, rows, f"{model}: " if model else "")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # The format is named: the temporary file's name has no .png for matplotlib to go by.
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def plot(axes, results: list[Result], prefix: str = "") -> None:
    """The text-to-image and the answer rows of ``results`` on a pair of matplotlib axes."""
    for ax, task, title in ((axes[0], "t2i", "text-to-image request"), (axes[1], "mmu", "answer request")):
        rows = [r for r in results if r.task == task]
        if not rows:
            ax.set_visible(False)
            continue
        names = [r.name for r in rows]
        med = [r.median_s for r in rows]
        err = [[m - min(r.runs_s) for m, r in zip(med, rows, strict=True)],
               [max(r.runs_s) - m for m, r in zip(med, rows, strict=True)]]
        ax.barh(names, med, xerr=err, color="#4c78a8")
        ax.invert_yaxis()
        ax.set_xlabel("warm wall-clock, median and min-max (s)")
        ax.set_title(prefix + title)
        for y, r in enumerate(rows):
            ax.text(r.median_s, y, f" {r.flops / 1e9:.1f} GFLOP", va="center", fontsize=8)


def summary(results: list[Result], machine: str, command: str) -> dict:
    """What bench.json holds for one model's results."""
    return {"machine": machine, "command": command, "speedups": speedups(results),
            "flashu_off_vs_inductor": off_vs_inductor(results), "savings_by_technique": technique_savings(results),
            "results": [asdict(r) | {"median_s": r.median_s, "compile_warm_s": r.compile_warm_s} for r in results]}


def write(results: list[Result], out: Path, machine: str, command: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results, machine, command)
    payload = json.dumps(summary(results, machine, command), indent=2) + "\n"
    write_atomic(out / "bench.md", lambda tmp: tmp.write_text(table + "\n"))
    write_atomic(out / "bench.json", lambda tmp: tmp.write_text(payload))
    try:
        draw(results, out / "bench.png")
    except ImportError as err:  # the table and JSON are the product; the chart needs matplotlib
        print(f"note: no chart ({err})")
    return table
