"""A transformers causal LM's own generate() through the flashu backend (a small random model: no download).

    python examples/hf_generate.py [--arch qwen2|llama] [--lowering eager|inductor] [--options JSON]
                                   [--calibrate] [--max-new-tokens 16] [--prompt-length 8] [--seed 0]

The model's forward is compiled with ``torch.compile(model.forward, backend="flashu", options=...)``
and driven by ``model.generate()``, greedy. Default options: ``layer_skip`` with ``skip_ratio`` 0.25
(the prefill measures every layer's importance, the decode steps skip the least important quarter);
``--calibrate`` adds ``prune_channels`` with a plan from ``flashu_compile.calibrate_lm`` on random token
sequences; ``--options`` replaces the defaults with any flashu options (a preset, passes, knobs) as JSON.

Printed: the eager and the compiled tokens, the graphs dynamo built and how many times it recompiled,
and the FLOPs per generated token of both runs (prefill included). FLOPs are counted on the dispatched
ops of each compiled program, which is exact for ``--lowering eager``; Inductor's kernels bypass the
dispatcher, so with the default Inductor lowering the compiled count is not reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

ARCHS = ("qwen2", "llama")
DEFAULT_OPTIONS = {"passes": ["layer_skip"], "skip_ratio": 0.25}
MAX_POSITIONS = 256
CALIBRATION_SEQUENCES = 8


@dataclass
class Result:
    eager_tokens: list[int]
    flashu_tokens: list[int]
    graphs: int
    recompiles: int
    graph_breaks: int
    eager_flops_per_token: float
    flashu_flops_per_token: float | None  # None: not countable with this lowering


def build_model(arch: str, seed: int):
    """A random 8-layer causal LM of the given family; 8 layers so that skip_ratio 0.25 skips two."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS)
    return model_cls(config).eval()


def compile_options(text: str | None, lowering: str | None, calibrate: bool) -> dict[str, Any]:
    """The flashu options of the command line, checked (ValueError naming the problem); no plan yet."""
    from flashu_compile.options import FlashUOptions

    if text is None:
        options = dict(DEFAULT_OPTIONS)
    else:
        try:
            options = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--options is not valid JSON: {err}") from None
        if not isinstance(options, dict):
            raise ValueError(f"--options must be a JSON object of flashu options, got {type(options).__name__}")
    if lowering is not None:
        options["lowering"] = lowering
    if calibrate:
        if options.get("plan") is not None:
            raise ValueError("--calibrate makes the plan: leave 'plan' out of --options")
        passes = list(options.get("passes", ()))
        options["passes"] = passes if "prune_channels" in passes else ["prune_channels", *passes]
    FlashUOptions.from_dict(options)  # every knob checked before a model is built
    return options


def generate(lm, ids, new_tokens: int, options: dict[str, Any] | None) -> tuple[list[int], int]:
    """Greedy ``generate()`` tokens and the FLOPs of its forward calls: eager (``options`` None) or compiled."""
    import torch

    from flashu_compile.runtime.flops import FlopTally, counted

    eager_forward = lm.forward
    lm.forward = counted(eager_forward) if options is None else torch.compile(eager_forward, backend="flashu",
                                                                              options=options)
    try:
        with torch.no_grad(), FlopTally() as tally:
            out = lm.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    finally:
        lm.forward = eager_forward
    return out[0, ids.shape[1]:].tolist(), tally.total


def run(arch: str, options: dict[str, Any], calibrate: bool, new_tokens: int, prompt_length: int,
        seed: int) -> Result:
    import torch
    from torch._dynamo.utils import counters

    from flashu_compile import calibrate_lm
    from flashu_compile.calibrate import Plan

    lm = build_model(arch, seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, lm.config.vocab_size, (1, prompt_length), generator=g)
    if isinstance(options.get("plan"), str):
        # Loaded (and checked against the model) here: an error inside the compile would reach the user wrapped
        # in dynamo's own exception.
        options = {**options, "plan": Plan.load(options["plan"], lm)}
    if calibrate:
        sequences = [torch.randint(0, lm.config.vocab_size, (16,), generator=g) for _ in range(CALIBRATION_SEQUENCES)]
        options = {**options, "plan": calibrate_lm(lm, sequences, prune_multiple=16)}
    eager_tokens, eager_flops = generate(lm, ids, new_tokens, None)
    torch._dynamo.reset()
    counters.clear()
    flashu_tokens, flashu_flops = generate(lm, ids, new_tokens, options)
    frames = counters["frames"]["total"]
    breaks = sum(counters["graph_break"].values())
    countable = options.get("lowering", "inductor") == "eager"
    return Result(eager_tokens, flashu_tokens, graphs=counters["stats"]["unique_graphs"],
                  # Each graph break adds a resumed frame whose first compile is not a recompile.
                  recompiles=max(frames - 1 - breaks, 0), graph_breaks=breaks,
                  eager_flops_per_token=eager_flops / new_tokens,
                  flashu_flops_per_token=flashu_flops / new_tokens if countable else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf_generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=ARCHS, default="qwen2", help="model family (default: qwen2)")
    parser.add_argument("--lowering", choices=("eager", "inductor"),
                        help="flashu lowering (default: the options' own, Inductor unless set)")
    parser.add_argument("--options", metavar="JSON",
                        help=f"flashu options as a JSON object (default: {json.dumps(DEFAULT_OPTIONS)})")
    parser.add_argument("--calibrate", action="store_true", help="add prune_channels with a calibrate_lm plan")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated (default: 16)")
    parser.add_argument("--prompt-length", type=int, default=8, help="random prompt tokens (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt (default: 0)")
    args = parser.parse_args(argv)

    from flashu_compile.validate import check_int

    try:
        new_tokens = check_int("--max-new-tokens", args.max_new_tokens, 1, MAX_POSITIONS - 1)
        prompt_length = check_int("--prompt-length", args.prompt_length, 1, MAX_POSITIONS - new_tokens)
        seed = check_int("--seed", args.seed, 0, 2**32 - 1)
        options = compile_options(args.options, args.lowering, args.calibrate)
        result = run(args.arch, options, args.calibrate, new_tokens, prompt_length, seed)
    except (ValueError, OSError) as err:  # a bad option value, or a plan path that cannot be read
        parser.error(str(err))

    shown = {key: value for key, value in options.items() if key != "plan"}
    print(f"model: random {args.arch}, 8 layers; options {json.dumps(shown)}" + (" + calibrate_lm plan"
                                                                                  if args.calibrate else ""))
    print(f"eager tokens:  {result.eager_tokens}")
    same = "same as eager" if result.flashu_tokens == result.eager_tokens else "differs from eager"
    print(f"flashu tokens: {result.flashu_tokens} ({same})")
    print(f"graphs: {result.graphs}, recompiles: {result.recompiles}, graph breaks: {result.graph_breaks}")
    if result.flashu_flops_per_token is None:
        print(f"FLOPs per generated token: eager {result.eager_flops_per_token / 1e6:.3f} M, flashu not counted "
              "(Inductor kernels bypass the dispatcher; use --lowering eager)")
    else:
        ratio = result.flashu_flops_per_token / result.eager_flops_per_token
        print(f"FLOPs per generated token: eager {result.eager_flops_per_token / 1e6:.3f} M, "
              f"flashu {result.flashu_flops_per_token / 1e6:.3f} M ({ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
