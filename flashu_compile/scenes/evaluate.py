"""Score a Show-o2 on held-out scenes: GenEval-like image checks and VQA accuracy.

    python -m flashu_compile.scenes.evaluate MODEL_DIR --prompts 60 --questions 200

GenEval-like: ``--images-per-prompt`` images (GenEval's 4 by default, each from its own seed) per
test-scene caption, scored by :func:`~.scoring.geneval_score`; its ``overall`` is the mean of the
per-kind success rates over all images, as GenEval's overall is the mean of its task scores. (The
test split holds only 19 single-object scenes, yet that kind weighs a third of ``overall``: with
one image per caption, a few seeds decide it.)

VQA: every question of consecutive test scenes -- colour, shape, count and, for relation scenes,
a yes/no position question -- until ``--questions`` are asked, scored by exact match and averaged
over questions, as VQA benchmarks do; ``vqa_by_type`` breaks it down. (Asking only each scene's
first question, as this script once did, measures colour recognition alone.)

Intervals: :func:`compare` gives every score a 95% percentile-bootstrap interval, resampling
captions (each with all its images) and questions with a fixed RNG seed, and every difference
from a baseline configuration an interval from the same resamples applied to both (a paired
bootstrap): evaluated on the same captions, questions and noise, two configurations differ by
what they compute, and the interval says how much of a difference this sample can resolve.
``flashu-compile evaluate`` runs it for any set of flashu configurations.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from flashu_compile.models.showo2 import Showo2

from .dataset import KINDS, QUESTION_TYPES, Scene, make_split, question_type, to_tensor
from .scoring import geneval_score, normalise_answer, score_image, vqa_accuracy

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def vqa_items(scenes, n: int) -> list[tuple[Scene, str, str]]:
    """``(scene, question, answer)`` for every question of ``scenes`` in order, the first ``n``."""
    items = [(s, q, a) for s in scenes for q, a in s.qa][:n]
    if len(items) < n:
        raise ValueError(f"{len(scenes)} scenes hold only {len(items)} questions, {n} were asked for")
    return items


@torch.no_grad()
def evaluate(model: Showo2 | Any, n_prompts: int = 100, n_questions: int = 200, steps: int = 50,
             guidance: float = 5.0, seed: int = 0, batch: int = 10, images_per_prompt: int = 4, label: str = "",
             progress: bool = True, solver: str = "euler", split: str = "test") -> dict:
    """Only ``model.generate_images`` ((B, 3, H, W) in [0, 1]) and ``model.answer`` are used: a model, or one
    compiled with ``flashu_compile.compile_tasks``; ``solver`` is the sampler's ("euler" or "heun"). Captions
    and questions come from ``split``: "test" to report, "validation" to choose settings without reading the
    test split.

    Image ``j`` of the run comes from the noise of seed ``seed + batch * (j // batch)`` at row
    ``j % batch``: the same for every model given the same arguments, so configurations compared
    on one ``seed`` and ``batch`` see the same noise per caption and image. ``per_prompt`` (the
    fraction of each caption's images passing every check, with its kind) and ``per_question``
    (right or wrong, with its type) are what :func:`compare` resamples.
    """
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be at least 1, got {images_per_prompt}")
    scenes = make_split(split, max(n_prompts, n_questions), seed=seed)
    # Each caption's images sit side by side; every chunk has its own seed, so no two images share noise.
    prompts = [s for s in scenes[:n_prompts] for _ in range(images_per_prompt)]
    prefix = f"{label}: " if label else ""
    images = []
    for i in tqdm(range(0, len(prompts), batch), desc=f"{prefix}generating", disable=not progress):
        chunk = prompts[i:i + batch]
        images.append(model.generate_images([s.caption for s in chunk], steps=steps, guidance=guidance,
                                            seed=seed + i, progress=False, solver=solver))
    images = torch.cat(images)
    gen = geneval_score(images, prompts)
    passed = [score_image(image, scene)["correct"] for image, scene in zip(images, prompts, strict=True)]
    per_prompt = [float(np.mean(passed[i:i + images_per_prompt])) for i in range(0, len(passed), images_per_prompt)]

    items = vqa_items(scenes, n_questions)  # every scene has at least 3 questions
    qa, answers = [(q, a) for _, q, a in items], []
    for s, question, _ in tqdm(items, desc=f"{prefix}answering", disable=not progress):
        image = (to_tensor(s.render()) + 1) / 2
        answers.append(model.answer(image, question, max_new_tokens=4))
    right = [normalise_answer(predicted) == normalise_answer(answer)
             for (_, answer), predicted in zip(qa, answers, strict=True)]
    by_type = defaultdict(list)
    for (question, _), hit in zip(qa, right, strict=True):
        by_type[question_type(question)].append(hit)
    vqa_by_type = {kind: {"accuracy": float(np.mean(by_type[kind])), "questions": len(by_type[kind])}
                   for kind in QUESTION_TYPES if by_type[kind]}
    examples = list(zip(qa[:5], answers[:5], strict=True))
    return {"geneval": gen, "vqa_accuracy": vqa_accuracy(answers, qa), "vqa_by_type": vqa_by_type,
            "prompts": n_prompts, "images_per_prompt": images_per_prompt, "questions": len(qa), "steps": steps,
            "guidance": guidance, "examples": examples,
            "per_prompt": {"correct": per_prompt, "kind": [s.kind for s in scenes[:n_prompts]]},
            "per_question": {"correct": right, "type": [question_type(q) for q, _ in qa]}}


def grouped_mean(values: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """The mean over the groups present of each group's mean, along the last axis (plain mean without groups).

    GenEval's overall is this over its tasks; a row where a group has no item leaves that group out,
    as :func:`~.scoring.geneval_score` leaves out a kind without prompts.
    """
    values = np.asarray(values, dtype=np.float64)
    if groups is None:
        return values.mean(-1)
    means = []
    for group in np.unique(groups):
        inside = groups == group
        count = inside.sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            means.append(np.where(count > 0, (values * inside).sum(-1) / count, np.nan))
    return np.nanmean(np.stack(means), axis=0)


def bootstrap_interval(values: Sequence[float] | np.ndarray, groups: Sequence | np.ndarray | None = None, *,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of :func:`grouped_mean` over ``values`` (one per item: a caption or question).

    Items are drawn with replacement by ``numpy.random.default_rng(seed)``, so two calls with the
    same number of items draw the same resamples: differences of paired items (the same caption or
    question under two configurations) then get the paired bootstrap's interval, and a difference
    of identical configurations is exactly [0, 0]. Constant values give exactly that value twice.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or not len(values):
        raise ValueError(f"bootstrap needs a non-empty 1-d list of values, got shape {values.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    index = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    group_index = None
    if groups is not None:
        codes = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
        if len(codes) != len(values):
            raise ValueError(f"{len(codes)} groups for {len(values)} values")
        group_index = codes[index]
    stats = grouped_mean(values[index], group_index)
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def score_items(result: dict) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Each reported score of an :func:`evaluate` result as (per-item values, groups or None).

    ``geneval/overall`` is the mean of per-kind means over captions; ``geneval/<kind>`` and
    ``vqa/<type>`` the means over that kind's captions or that type's questions; ``vqa/overall``
    the mean over all questions.
    """
    prompts, questions = result["per_prompt"], result["per_question"]
    kinds, types = np.array(prompts["kind"]), np.array(questions["type"])
    correct, right = np.array(prompts["correct"], dtype=np.float64), np.array(questions["correct"], dtype=np.float64)
    items = {"geneval/overall": (correct, kinds)}
    items.update({f"geneval/{kind}": (correct[kinds == kind], None) for kind in KINDS if (kinds == kind).any()})
    items["vqa/overall"] = (right, None)
    items.update({f"vqa/{kind}": (right[types == kind], None) for kind in QUESTION_TYPES if (types == kind).any()})
    return items


def compare(results: dict[str, dict], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """Scores with 95% intervals per configuration, and differences from the first with paired intervals.

    ``results`` maps a configuration's name to its :func:`evaluate` result; all must have scored
    the same captions and questions (the same ``seed``, counts and ``images_per_prompt``), else a
    ValueError. Returns ``{"scores": {name: {score: {"value", "low", "high"}}}, "differences":
    {name: {score: {"value", "low", "high"}}}}`` with differences for every name but the first.
    """
    if not results:
        raise ValueError("no results to compare")
    names = list(results)
    items = {name: score_items(results[name]) for name in names}
    base = names[0]
    for name in names[1:]:
        for key in ("per_prompt", "per_question"):
            field = "kind" if key == "per_prompt" else "type"
            if results[name][key][field] != results[base][key][field]:
                raise ValueError(f"configurations {base!r} and {name!r} were scored on different {key[4:]}s: "
                                 "compare needs the same seed and counts")

    def summary(values: np.ndarray, groups: np.ndarray | None) -> dict[str, float]:
        low, high = bootstrap_interval(values, groups, resamples=resamples, seed=seed)
        return {"value": float(grouped_mean(values, groups)), "low": low, "high": high}

    scores = {name: {score: summary(*item) for score, item in items[name].items()} for name in names}
    differences = {name: {score: summary(values - items[base][score][0], groups)
                          for score, (values, groups) in items[name].items()} for name in names[1:]}
    return {"baseline": base, "resamples": resamples, "seed": seed, "scores": scores, "differences": differences}


def markdown_tables(comparison: dict) -> str:
    """The scores table, and the differences table when there is more than one configuration."""
    scores = comparison["scores"]
    columns = list(next(iter(scores.values())))

    def cell(s: dict, signed: bool = False) -> str:
        fmt = "{:+.3f}" if signed else "{:.3f}"
        return f"{fmt.format(s['value'])} [{fmt.format(s['low'])}, {fmt.format(s['high'])}]"

    def table(rows: dict, signed: bool) -> list[str]:
        lines = ["| configuration | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
        return lines + [f"| {name} | " + " | ".join(cell(row[c], signed) for c in columns) + " |"
                        for name, row in rows.items()]

    lines = table(scores, signed=False)
    if comparison["differences"]:
        lines += ["", f"Differences from {comparison['baseline']} (paired):", "", *table(comparison["differences"],
                                                                                          signed=True)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="checkpoint folder, or 'default'")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--images-per-prompt", type=int, default=4, help="images scored per caption (GenEval: 4)")
    args = parser.parse_args(argv)
    model = Showo2.default() if args.model == "default" else Showo2.from_pretrained(args.model)
    print(json.dumps(evaluate(model, args.prompts, args.questions, args.steps, args.guidance,
                              images_per_prompt=args.images_per_prompt), indent=1))


if __name__ == "__main__":
    main()
