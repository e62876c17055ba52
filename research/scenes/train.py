"""Train the embedded Show-o2 on synthetic scenes, on a CPU, within a budget of optimizer steps.

Both of Show-o2's losses on the official row layouts: flow matching on text-to-image rows
(captions dropped 10% of the time so classifier-free guidance works) and next-token
prediction on understanding rows (the answer after the assistant prefix). Latents are the
images pixel-unshuffled by 4, so no VAE is involved.

    python -m research.scenes.train --out flashu_compile/weights/showo2-scenes
    python -m research.scenes.train --recipe scenes-10 --out runs/showo2-scenes-10   # the 10-layer model
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flashu_compile.files import write_atomic, write_checksums
from flashu_compile.models.showo2 import Showo2, custom_config
from flashu_compile.models.showo2.sampling import shift_time
from flashu_compile.models.showo2.sequences import mmu_row, omni_attention_mask, t2i_rows
from flashu_compile.models.showo2.tokenizer import SceneTokenizer
from flashu_compile.scenes.dataset import KINDS, Scene, draw, to_tensor

CFG_DROP = 0.1
# Fraction of the budget trained on text-to-image rows alone before the understanding rows join (see train()).
ANSWERS_FROM = 0.25
# Fraction of the budget during which relation images are captioned with the subject first (see relation_captions).
READING_ORDER_UNTIL = 0.5
# The shipped weights trained 6,762 steps, then against a 30-minute wall-clock budget (fractions of time, not of
# steps: the answer rows joined at step 2,436); a step budget reproduces a run on any machine, not that one exactly.
DEFAULT_STEPS = 6762
# The runs behind a shipped model, each a sequence of stages run one after another: a stage's keyword arguments of
# train(), each stage but the first starting from the weights the one before saved. All budgets are in steps, so
# ``--recipe NAME`` reproduces the model in one command on any machine (TRAINING.md has the scores of each stage).
RECIPES = {
    # flashu_compile/weights/showo2-scenes-10: run 10e (the 4-layer recipe at 10 layers, a shorter reading-order
    # phase), then run 10f (understanding rows weighted to two-object scenes at a low learning rate, which fixed
    # 10e's colour-binding errors: VQA 0.71 -> 0.85 with GenEval-like 0.657 -> 0.634).
    "scenes-10": (
        {"steps": 6762, "num_layers": 10, "reading_order_until": 0.25},
        {"steps": 2000, "batch": 8, "answer_batch": 16, "answer_weight": 1.0, "lr": 3e-4, "answers_from": 0.0,
         "reading_order_until": 0.0, "answer_kind_weights": {"single": 1, "relation": 3, "count": 1}},
    ),
}


def scenes_config(num_layers: int = 4):
    """Show-o2's structure at a size a 2-core CPU trains in minutes (about 1.6 M parameters at 4 LLM layers).

    The flow head is as wide as the LLM, so it needs no width projections, and has two blocks. In the same
    30 minutes this trained 6,529 steps of 16 + 12 rows where three 160-wide blocks (40-wide attention heads)
    trained 5,331 steps of 16 + 16, and it answered questions better (flashu_compile/scenes/TRAINING.md).
    """
    return custom_config(
        vocab_size=len(SceneTokenizer()), hidden_size=128, num_layers=num_layers, num_heads=4, num_kv_heads=2,
        intermediate_size=352, vision_hidden_size=96, vision_layers=3, vision_heads=4,
        vision_intermediate_size=256, grid=8, head_hidden_size=128, head_heads=4, head_kv_heads=2, head_dim=32,
        head_intermediate_size=352, num_diffusion_layers=2, latent_channels=48, max_text_len=12,
        # Patch size 1 on a 4x pixel-unshuffle latent: output token k is exactly the 4x4 pixel block input token
        # k covers. With 2x2 patches the official unpatchify sends token k to four pixels of one row elsewhere,
        # and the model first has to learn that re-routing through attention before the flow loss falls.
        patch_size=1, latent_codec="pixel-unshuffle-4",
    )


def grid_position_table(side: int, dim: int, scale: float = 0.5) -> torch.Tensor:
    """A ``(side * side, dim)`` 2D sin-cos table: the first half of the channels encodes the row, the second
    half the column, each with frequencies spread from one cycle per token to one per grid.

    Why: the official model inherits SigLIP's pretrained position table, which tells every later layer where
    a patch sits. A random table at embedding init (std 0.05) is several times weaker than the patch
    features here, and a model trained from it read images as a bag of tiles: layout questions at chance,
    objects not placed by the caption. ``scale`` sets the table's amplitude (0.5 is about the patch
    features' own spread).
    """
    if dim % 4:
        raise ValueError(f"a 2D sin-cos table needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    # Periods from 2 tokens (the finest a grid resolves) to 4x the grid, geometrically spaced.
    periods = 2.0 * (2.0 * side) ** (torch.arange(quarter) / max(quarter - 1, 1))
    coords = torch.arange(side, dtype=torch.float32)
    angles = 2 * math.pi * coords[:, None] / periods[None]  # (side, quarter)
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (side, dim / 2)
    rows = axis[:, None].expand(side, side, -1)
    cols = axis[None].expand(side, side, -1)
    return scale * torch.cat([rows, cols], dim=-1).reshape(side * side, dim)


def flow_loss(model: Showo2, tok: SceneTokenizer, scenes, codec, rng: random.Random,
              time_shift: float) -> torch.Tensor:
    cfg = model.config
    prompts = ["" if rng.random() < CFG_DROP else s.caption for s in scenes]
    rows = t2i_rows(tok, prompts, cfg.num_image_tokens, cfg.max_text_len, guidance=False)
    x1 = codec.encode(torch.stack([to_tensor(s.render()) for s in scenes]))
    x0 = torch.randn_like(x1)
    # Logit-normal times concentrate training mid-trajectory; the sampler's shift then moves them towards
    # the noise end as it moves its grid, where the layout (how many objects, and where) is decided.
    t = shift_time(torch.sigmoid(torch.randn(len(scenes))), time_shift)
    xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
    v = model.denoise(rows.text_tokens, xt, t, rows.attention_mask, rows.modality_positions)
    return F.mse_loss(v, x1 - x0)


def answer_loss(model: Showo2, tok: SceneTokenizer, scenes, codec, rng: random.Random) -> torch.Tensor:
    cfg = model.config
    rows, targets = [], []
    for s in scenes:
        question, answer = rng.choice(s.qa)
        row = mmu_row(tok, question, cfg.num_image_tokens)
        answer_ids = tok.encode(answer) + [tok.eos_id]
        rows.append((row, answer_ids))
    length = max(r.seq_len + len(a) for r, a in rows)
    tokens = torch.full((len(rows), length), tok.pad_id)
    labels = torch.full((len(rows), length), -100)
    for i, (row, answer_ids) in enumerate(rows):
        n = row.seq_len
        tokens[i, :n] = row.text_tokens[0]
        tokens[i, n:n + len(answer_ids)] = torch.tensor(answer_ids)
        labels[i, n - 1:n - 1 + len(answer_ids)] = torch.tensor(answer_ids)  # predict from the previous position
        targets.append(answer_ids)
    positions = torch.cat([r.modality_positions for r, _ in rows])
    time_positions = torch.cat([r.time_positions for r, _ in rows])
    latents = codec.encode(torch.stack([to_tensor(s.render()) for s in scenes]))
    embeds, _ = model.embed(tokens, latents, torch.ones(len(scenes)), time_positions)
    hidden = model.llm_hidden(embeds, omni_attention_mask(positions, length))
    logits = model.showo.lm_head(hidden)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def relation_captions(scenes: list[Scene], reading_order: bool) -> list[Scene]:
    """``scenes`` with each relation image stated in reading order if ``reading_order``, else as drawn.

    Why: every relation image has two captions, "A left of B" and "B right of A", so which colour goes
    left depends on the relation word and the naming order together and on neither alone. That is an XOR,
    and gradient descent from a model that ignores both sits at a saddle: a model trained on relations
    alone for 10 minutes moved its mean image by 0.005 of the data's between "left of" and "right of"
    (:func:`~.probes.relation_sensitivity`). Stated in reading order, the first-named object is always the
    left or upper one, which the model can learn on its own; the relation word then only has to flip an
    existing placement. The same 10 minutes with the first half in reading order moved it by 0.82 (0.005
    before; "above"/"below" 1.00 against 0.006) and drew 0.68 of test relation prompts right (0.25 before).
    """
    return [s.in_reading_order() for s in scenes] if reading_order else scenes


def kind_mix(weights: dict[str, int] | None) -> tuple[str, ...]:
    """The kinds sequence :func:`~.dataset.draw` takes: each kind repeated by its integer weight."""
    if weights is None:
        return KINDS
    unknown = set(weights) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown scene kinds {sorted(unknown)}; expected some of {KINDS}")
    if any(not isinstance(w, int) or w < 0 for w in weights.values()) or not any(weights.values()):
        raise ValueError(f"kind weights must be non-negative integers, not all 0, got {weights}")
    return tuple(k for k in KINDS for _ in range(weights.get(k, 0)))


def parse_kind_weights(text: str) -> dict[str, int]:
    """ "single=1,relation=2,count=2" -> {"single": 1, "relation": 2, "count": 2}."""
    weights = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected KIND=WEIGHT pairs such as 'relation=2', got {item!r}")
        weights[name.strip()] = int(value)
    return weights


def save_weights(model: Showo2, out: Path, log: dict) -> None:
    model.save_pretrained(str(out))
    write_atomic(out / "training.json", lambda tmp: tmp.write_text(json.dumps(log, indent=1)))
    write_checksums(out)  # the listing a load verifies now covers the training log too


def plot_losses(log: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("drawing the loss curves needs matplotlib: pip install 'flashu-compile[plot]'") from err

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, title in ((axes[0], "flow", "flow matching (MSE)"), (axes[1], "ntp", "answer tokens (CE)")):
        values = log[key]
        if not values:  # a one-task run
            ax.set_title(f"{title}: not trained")
            continue
        window = max(1, len(values) // 50)
        smooth = [sum(values[max(0, i - window):i + 1]) / len(values[max(0, i - window):i + 1])
                  for i in range(len(values))]
        # Answer rows may join late (answers_from): plot their losses at the steps they were trained on.
        first = (log.get("answers_from_step") or 0) if key == "ntp" else 0
        steps = range(first, first + len(values))
        ax.plot(steps, values, alpha=0.25, color="C0")
        ax.plot(steps, smooth, color="C0")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train(steps: int, out: Path, batch: int = 16, lr: float = 1.5e-3, seed: int = 0,
          init_from: Path | None = None, answer_batch: int = 12, answer_weight: float = 0.5,
          ema_decay: float = 0.998, time_shift: float = 3.0, kind_weights: dict[str, int] | None = None,
          answer_kind_weights: dict[str, int] | None = None, answers_from: float | None = None,
          reading_order_until: float = READING_ORDER_UNTIL, num_layers: int = 4, recipe: dict | None = None) -> dict:
    """Train for ``steps`` optimizer steps of a fresh :func:`scenes_config` model with ``num_layers`` LLM layers
    (ignored with ``init_from``); each step has ``batch`` text-to-image rows and ``answer_batch``
    understanding rows, the answer loss weighted by ``answer_weight``.
    Either batch may be 0 (one task only, e.g. to see how fast that task learns on its own).
    The saved weights are an exponential moving average with ``ema_decay`` (0: the last step's weights).
    Training times are logit-normal, shifted by ``time_shift`` as the sampler shifts its grid (default: the
    sampler's own 3.0; 1: unshifted). ``kind_weights`` draws each scene kind of the text-to-image rows in
    proportion to its weight (default: uniformly). ``answer_kind_weights`` gives the understanding rows
    scenes of their own in that mix; by default they ask about the text-to-image rows' scenes.
    ``answers_from`` is the fraction of the budget trained on text-to-image rows alone before the understanding
    rows join (default :data:`ANSWERS_FROM` when both tasks train, else 0). Answers learned from a generator
    that has already learned to draw the scenes reached 0.96 where joint training from the start reached 0.84,
    with images scoring the same (flashu_compile/scenes/TRAINING.md).
    ``reading_order_until`` is the fraction of the budget during which relation images are captioned only with
    the subject first in reading order ("A left of B", "A above B", never "B right of A"); see
    :func:`relation_captions`. ``recipe`` (which stage of :data:`RECIPES` this is, with its options) is recorded
    in the log as given, so :func:`run_recipe` knows a stage's saved weights when it meets them again."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
    if batch < 0 or answer_batch < 0 or batch + answer_batch == 0:
        raise ValueError(f"batch sizes must be non-negative and not both 0, got {batch} and {answer_batch}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a whole number >= 1, got {num_layers!r}")
    if answers_from is None:
        answers_from = ANSWERS_FROM if batch and answer_batch else 0.0
    if not 0 <= answers_from < 1 or (answers_from and not (batch and answer_batch)):
        raise ValueError(f"answers_from must be in [0, 1) and needs both batch sizes above 0, got {answers_from}")
    if not 0 <= reading_order_until <= 1:
        raise ValueError(f"reading_order_until must be in [0, 1], got {reading_order_until}")
    kinds = kind_mix(kind_weights)
    shared = answer_kind_weights is None
    answer_kinds = kinds if shared else kind_mix(answer_kind_weights)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    # Continuing from saved weights restarts the schedule (optimizer state is not saved).
    if init_from:
        model = Showo2.from_pretrained(str(init_from))
    else:
        model = Showo2.random(scenes_config(num_layers), seed=seed)
        with torch.no_grad():
            table = model.position_embedding.weight
            table.copy_(grid_position_table(int(round(table.shape[0] ** 0.5)), table.shape[1]))
    model.train()
    # Sampling quality after a short run is noisy step to step; an exponential moving average of the
    # weights (saved instead of the last step's) smooths that out at the cost of one copy of the weights.
    ema = [p.detach().clone() for p in model.parameters()] if ema_decay else None
    tok = SceneTokenizer()
    codec = model.codec
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    start = time.perf_counter()
    log = {"flow": [], "ntp": [], "config": model.config.summary(), "batch": batch, "answer_batch": answer_batch,
           "answer_weight": answer_weight, "ema_decay": ema_decay, "lr": lr, "seed": seed,
           "time_shift": time_shift, "kinds": {k: kinds.count(k) for k in KINDS},
           "answer_kinds": {k: answer_kinds.count(k) for k in KINDS},
           "init_from": str(init_from) if init_from else None, "answers_from": answers_from, "answers_from_step": None,
           "reading_order_until": reading_order_until, "recipe": recipe}
    bar = tqdm(total=steps, desc="training", unit="step")
    # Every fraction of the budget counts steps, so a run does the same work on any machine at any load.
    for step in range(steps):
        frac = step / steps
        scale = min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        # Shared, the answer rows ask about the first of the drawn scenes (the recipe of the shipped weights).
        drawn = [draw("train", rng, kinds) for _ in range(max(batch, answer_batch) if shared else batch)]
        drawn = relation_captions(drawn, frac < reading_order_until)
        answering = answer_batch > 0 and frac >= answers_from
        if answering and log["answers_from_step"] is None:
            log["answers_from_step"] = step
        if not answering:
            asked = []
        elif shared:
            asked = drawn[:answer_batch]
        else:
            asked = [draw("train", rng, answer_kinds) for _ in range(answer_batch)]
        lf = flow_loss(model, tok, drawn[:batch], codec, rng, time_shift) if batch else torch.zeros(())
        ln = answer_loss(model, tok, asked, codec, rng) if answering else torch.zeros(())
        opt.zero_grad(set_to_none=True)
        (lf + answer_weight * ln).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if ema is not None:
            decay = min(ema_decay, (1 + step) / (10 + step))  # a young average follows the weights closely
            with torch.no_grad():
                for averaged, p in zip(ema, model.parameters(), strict=True):
                    averaged.lerp_(p, 1 - decay)
        flow, ntp = lf.item(), ln.item()
        if batch:
            log["flow"].append(flow)
        if answering:
            log["ntp"].append(ntp)
        bar.update()
        bar.set_postfix(flow=f"{flow:.3f}", ntp=f"{ntp:.3f}")
    bar.close()
    log["steps"] = steps
    log["seconds"] = time.perf_counter() - start
    if ema is not None:
        with torch.no_grad():
            for p, averaged in zip(model.parameters(), ema, strict=True):
                p.copy_(averaged)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out, {k: v for k, v in log.items()})
    plot_losses(log, out.parent / f"{out.name}-losses.png")
    return log


def run_recipe(name: str, out: Path) -> dict:
    """Train :data:`RECIPES` ``name``'s stages in order into ``out`` (the earlier stages' weights beside it, in
    ``<out>-stage<i>``), each stage from the previous one's weights; returns the last stage's log.

    A stage whose folder already holds that stage's weights (its training log names the same recipe stage with
    the same options) is not trained again, so a run that stopped continues with the stage it was in."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}")
    stages = RECIPES[name]
    previous = None
    for i, stage in enumerate(stages, start=1):
        folder = out if i == len(stages) else out.with_name(f"{out.name}-stage{i}")
        recipe = {"name": name, "stage": i, "of": len(stages), "options": stage}
        done = folder / "training.json"
        if done.is_file():
            log = json.loads(done.read_text())
            if log.get("recipe") == recipe and log.get("init_from") == (str(previous) if previous else None):
                print(f"stage {i}/{len(stages)}: {folder} holds its weights, not trained again")
                previous = folder
                continue
        print(f"stage {i}/{len(stages)}: {json.dumps(stage)} from {previous or 'a fresh model'} -> {folder}")
        log = train(out=folder, recipe=recipe, init_from=previous, **stage)
        previous = folder
    return log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"optimizer steps (default: {DEFAULT_STEPS}, the shipped weights' run)")
    parser.add_argument("--out", type=Path,
                        help="the checkpoint folder to write (default: the shipped 4-layer weights, "
                             "flashu_compile/weights/showo2-scenes; with --recipe it must be given)")
    parser.add_argument("--batch", type=int, default=16, help="text-to-image rows per step")
    parser.add_argument("--answer-batch", type=int, default=12, help="understanding rows per step")
    parser.add_argument("--answer-weight", type=float, default=0.5, help="weight of the answer loss")
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--ema", type=float, default=0.998, help="decay of the saved weights' moving average (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=4, help="LLM layers of a fresh model (default: 4, as shipped)")
    parser.add_argument("--init-from", type=Path, help="continue from a saved checkpoint folder")
    parser.add_argument("--time-shift", type=float, default=3.0,
                        help="shift of the logit-normal training times towards noise, as the sampler shifts its "
                             "grid (default: the sampler's 3.0; 1: unshifted)")
    parser.add_argument("--kinds", type=parse_kind_weights,
                        help="scene kind weights of the text-to-image rows, e.g. 'single=1,relation=2,count=2' "
                             "(default: uniform)")
    parser.add_argument("--answer-kinds", type=parse_kind_weights,
                        help="scene kind weights of the understanding rows, which then draw scenes of their own "
                             "(default: they ask about the text-to-image rows' scenes)")
    parser.add_argument("--answers-from", type=float,
                        help="fraction of the budget trained on text-to-image rows alone before the understanding "
                             f"rows join (default: {ANSWERS_FROM} when both tasks train; 0: both from the start)")
    parser.add_argument("--reading-order-until", type=float, default=READING_ORDER_UNTIL,
                        help="fraction of the budget during which relation images are captioned only with the "
                             "subject first ('A left of B', never 'B right of A'); 0: both captions throughout "
                             f"(default: {READING_ORDER_UNTIL})")
    parser.add_argument("--recipe", choices=sorted(RECIPES),
                        help="train a shipped model's recipe (all its stages, each with its own options and step "
                             "budget) into --out; no other training option may be given with it")
    args = parser.parse_args(argv)
    if args.recipe:
        given = [f"--{key.replace('_', '-')}" for key, value in vars(args).items()
                 if key not in ("recipe", "out") and value != parser.get_default(key)]
        if given:
            parser.error(f"--recipe {args.recipe} sets every training option itself; drop {', '.join(given)}")
        if args.out is None:  # its earlier stages' folders go beside --out: never inside the package
            parser.error(f"--recipe {args.recipe} needs --out, a folder outside flashu_compile/weights")
        log = run_recipe(args.recipe, args.out)
    else:
        args.out = args.out or Path("flashu_compile/weights/showo2-scenes")
        log = train(args.steps, args.out, args.batch, args.lr, args.seed, init_from=args.init_from,
                    answer_batch=args.answer_batch, answer_weight=args.answer_weight, ema_decay=args.ema,
                    time_shift=args.time_shift, kind_weights=args.kinds, answer_kind_weights=args.answer_kinds,
                    answers_from=args.answers_from, reading_order_until=args.reading_order_until,
                    num_layers=args.layers)
    final = ", ".join(f"{key} {sum(log[key][-50:]) / len(log[key][-50:]):.4f}" for key in ("flow", "ntp") if log[key])
    print(f"{log['steps']} steps in {log['seconds']:.0f} s; final {final} -> {args.out}")


if __name__ == "__main__":
    main()
