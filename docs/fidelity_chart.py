"""The speed-quality chart of docs/fidelity.md, drawn from the runs' own JSON files (needs matplotlib).

Left: GenEval-like overall (95% interval) against the bench's warm median per text-to-image
request. Right (when --understanding is given): VQA accuracy (95% interval) against the prefill FLOPs of one
question, for the token_drop ablation and the presets. Usage (the files the report names):

    python docs/fidelity_chart.py --generation gen-50.json --bench bench.json \
        --speed off="eager 50" --speed paper="flashu paper 50" ... \
        --understanding vqa-300.json --flops off=335.48 --flops drop_r0.25_l1=288.29 ... --out docs/fidelity-chart.png

In the right panel, configurations whose names contain "drop" (the token_drop ablation) are coloured, the
others black.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def pairs(items: list[str], convert=str) -> dict[str, object]:
    """NAME=VALUE arguments as a dict, in order."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: {item!r} is not NAME=VALUE")
        out[name] = convert(value)
    return out


def interval(scores: dict, name: str, key: str) -> tuple[float, float, float]:
    s = scores[name][key]
    return s["value"], s["value"] - s["low"], s["high"] - s["value"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generation", type=Path, required=True, help="evaluate --json of the generation run")
    parser.add_argument("--bench", type=Path, required=True, help="bench.json of the speed run")
    parser.add_argument("--speed", action="append", default=[], help="CONFIG=BENCH ROW (repeatable)")
    parser.add_argument("--understanding", type=Path, nargs="+", default=[],
                        help="evaluate --json of VQA runs (none: the text-to-image panel alone)")
    parser.add_argument("--flops", action="append", default=[], help="CONFIG=prefill MFLOP (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if args.understanding:
        fig, (gen_ax, vqa_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    else:
        fig, gen_ax = plt.subplots(figsize=(5.8, 4.2))
    generation = json.loads(args.generation.read_text())["comparison"]["scores"]
    medians = {r["name"]: r["median_s"] for r in json.loads(args.bench.read_text())["results"]}
    for i, (name, row) in enumerate(pairs(args.speed).items()):
        y, low, high = interval(generation, name, "geneval/overall")
        gen_ax.errorbar(medians[row], y, yerr=[[low], [high]], fmt="o", capsize=4)
        # Points at nearly the same speed and score would print their names over each other: stagger them.
        gen_ax.annotate(name, (medians[row], y), textcoords="offset points", xytext=(6, 10 * (i % 3) - 10),
                        fontsize=8)
    gen_ax.margins(x=0.3)  # room for the labels right of the points
    gen_ax.set(xlabel="warm median per request (s, bench)", ylabel="GenEval-like overall (95% interval)",
               title="text to image")

    flops = pairs(args.flops, float)
    for path in args.understanding:
        scores = json.loads(path.read_text())["comparison"]["scores"]
        for name in scores:
            if name not in flops or (name == "off" and path != args.understanding[0]):
                continue  # every run has its own off row; the first one's is drawn
            y, low, high = interval(scores, name, "vqa/overall")
            vqa_ax.errorbar(flops[name], y, yerr=[[low], [high]], fmt="o", capsize=3,
                            color=None if "drop" in name else "black")
            vqa_ax.annotate(name, (flops[name], y), textcoords="offset points", xytext=(5, 3), fontsize=7)
    if args.understanding:
        vqa_ax.set(xlabel="prefill MFLOP per question (graph-diff)", ylabel="VQA accuracy (95% interval)",
                   title="understanding: token_drop rho-K and presets")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
