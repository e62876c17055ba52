"""``flashu-compile bench-ffn``: does a pruned FFN run faster, in proportion to the FLOPs it drops?

One Qwen2 decoder layer at a chosen size (default: Show-o2 1.5B's, hidden 1536, FFN 8960) is
compiled through the ``flashu`` backend with ``prune_channels`` at several prune ratios and
timed on the same tokens. The layer is the unit the pass rewrites; its attention is unchanged,
so the FFN's share of the layer's FLOPs bounds what pruning can save. Which neurons are kept
does not change the cost, so the plan keeps the neurons with the largest down-projection
columns instead of calibrating a randomly initialised layer.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from ..calibrate import Plan
from ..calibrate.plan import decoder_layers, keep_count
from ..runtime.flops import FlopTally
from ..validate import check_float, check_int


@dataclass
class FfnResult:
    prune_ratio: float
    kept: int
    flops: int
    median_s: float
    runs_s: list[float]


def decoder_layer(hidden: int, ffn: int, heads: int, kv_heads: int, seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=1, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2Model(config).eval()


def magnitude_plan(model: torch.nn.Module, prune_ratio: float, multiple: int) -> Plan:
    """An understanding plan keeping, per layer, the neurons with the largest |W_down| column sums."""
    keep, scores, sizes = [], [], []
    for _, layer in decoder_layers(model):
        score = layer.mlp.down_proj.weight.detach().abs().sum(0).double()
        n = keep_count(score.numel(), prune_ratio, multiple)
        keep.append(score.topk(n).indices.sort().values)
        scores.append(score)
        sizes.append(score.numel())
    return Plan.for_model(model, {"mmu": keep}, {"mmu": scores},
                          {"prune_ratio": prune_ratio, "multiple": multiple, "scores": "|W_down| column sums"})


def run(hidden: int = 1536, ffn: int = 8960, heads: int = 12, kv_heads: int = 2, tokens: int = 256,
        ratios: tuple[float, ...] = (0.0, 0.2, 0.4), runs: int = 10, multiple: int = 64,
        lowering: str = "inductor") -> list[FfnResult]:
    """Median warm latency and FLOPs of one decoder layer per prune ratio (0 = no pass)."""
    embeds = torch.randn(1, tokens, hidden, generator=torch.Generator().manual_seed(0))
    results = []
    for ratio in ratios:
        model = decoder_layer(hidden, ffn, heads, kv_heads)  # fresh: the pass permutes FFN neurons in place
        options = {"passes": ["prune_channels"], "plan": magnitude_plan(model, ratio, multiple)} if ratio else {}
        with torch.no_grad():
            torch._dynamo.reset()
            counting = torch.compile(model, backend="flashu", options={**options, "lowering": "eager"})
            with FlopTally() as tally:  # the same rewritten graph, run eagerly so every op is counted
                counting(inputs_embeds=embeds)
            torch._dynamo.reset()
            fast = torch.compile(model, backend="flashu", options={**options, "lowering": lowering})
            for _ in range(3):  # compile, then let caches and the thread pool settle
                fast(inputs_embeds=embeds)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fast(inputs_embeds=embeds)
                times.append(time.perf_counter() - t0)
        kept = keep_count(ffn, ratio, multiple) if ratio else ffn
        results.append(FfnResult(ratio, kept, tally.total, statistics.median(times), times))
    return results


def markdown(results: list[FfnResult], header: str) -> str:
    base = results[0]
    lines = [header, "", "| prune ratio | FFN neurons kept | FLOPs (G) | warm median (ms) | × unpruned | "
             "FLOP-predicted × |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.prune_ratio:.2f} | {r.kept} | {r.flops / 1e9:.2f} | {r.median_s * 1e3:.1f} | "
                     f"{base.median_s / r.median_s:.2f} | {base.flops / r.flops:.2f} |")
    return "\n".join(lines)


# Far beyond any real layer (Show-o2 7B: hidden 3584, FFN 18944) or request (1024 tokens), so that a typo is
# reported instead of failing to allocate terabytes.
MAX_WIDTH = 1 << 16


def check_args(args: argparse.Namespace) -> None:
    """Every argument of ``bench-ffn`` checked before any work: a layer Qwen2 can build, with RoPE's pairs."""
    hidden = check_int("--hidden", args.hidden, 1, MAX_WIDTH)
    check_int("--ffn", args.ffn, 1, MAX_WIDTH)
    heads = check_int("--heads", args.heads, 1, hidden)
    check_int("--kv-heads", args.kv_heads, 1, heads)
    check_int("--tokens", args.tokens, 1, MAX_WIDTH)
    check_int("--runs", args.runs, 1)
    for ratio in args.ratios:
        check_float("--ratios", ratio, 0.0, 1.0, high_open=True)
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"--hidden {hidden} must be --heads {heads} times an even head size (rotary embeddings "
                         "turn pairs of channels)")
    if heads % args.kv_heads:
        raise ValueError(f"--heads {heads} must be a multiple of --kv-heads {args.kv_heads}")


def cmd_bench_ffn(args: argparse.Namespace) -> int:
    from .bench import machine_line

    check_args(args)
    ratios = tuple(sorted(set([0.0, *args.ratios])))
    results = run(args.hidden, args.ffn, args.heads, args.kv_heads, args.tokens, ratios, args.runs)
    print(markdown(results, f"One Qwen2 decoder layer (hidden {args.hidden}, FFN {args.ffn}, {args.tokens} tokens), "
                            f"Inductor. Machine: {machine_line()}. Command: `{args.command_line}`."))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench-ffn", help="latency and FLOPs of a decoder layer with its FFN pruned at several ratios",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--ffn", type=int, default=8960)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4], help="prune ratios besides 0")
    p.add_argument("--runs", type=int, default=10)
    p.set_defaults(func=cmd_bench_ffn)
