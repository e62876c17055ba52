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
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm

from flashu_compile.models.showo2 import Showo2

from .dataset import QUESTION_TYPES, Scene, make_split, question_type, to_tensor
from .scoring import geneval_score, normalise_answer, vqa_accuracy


def vqa_items(scenes, n: int) -> list[tuple[Scene, str, str]]:
    """``(scene, question, answer)`` for every question of ``scenes`` in order, the first ``n``."""
    items = [(s, q, a) for s in scenes for q, a in s.qa][:n]
    if len(items) < n:
        raise ValueError(f"{len(scenes)} scenes hold only {len(items)} questions, {n} were asked for")
    return items


@torch.no_grad()
def evaluate(model: Showo2, n_prompts: int = 100, n_questions: int = 200, steps: int = 50, guidance: float = 5.0,
             seed: int = 0, batch: int = 10, images_per_prompt: int = 4) -> dict:
    """Only ``model.generate_images`` ((B, 3, H, W) in [0, 1]) and ``model.answer`` are used."""
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be at least 1, got {images_per_prompt}")
    scenes = make_split("test", max(n_prompts, n_questions), seed=seed)
    # Each caption's images sit side by side; every chunk has its own seed, so no two images share noise.
    prompts = [s for s in scenes[:n_prompts] for _ in range(images_per_prompt)]
    images = []
    for i in tqdm(range(0, len(prompts), batch), desc="generating"):
        chunk = prompts[i:i + batch]
        images.append(model.generate_images([s.caption for s in chunk], steps=steps, guidance=guidance,
                                            seed=seed + i, progress=False))
    images = torch.cat(images)
    gen = geneval_score(images, prompts)

    items = vqa_items(scenes, n_questions)  # every scene has at least 3 questions
    qa, answers = [(q, a) for _, q, a in items], []
    for s, question, _ in tqdm(items, desc="answering"):
        image = (to_tensor(s.render()) + 1) / 2
        answers.append(model.answer(image, question, max_new_tokens=4))
    by_type = defaultdict(list)
    for (question, answer), predicted in zip(qa, answers, strict=True):
        by_type[question_type(question)].append(normalise_answer(predicted) == normalise_answer(answer))
    vqa_by_type = {kind: {"accuracy": float(np.mean(by_type[kind])), "questions": len(by_type[kind])}
                   for kind in QUESTION_TYPES if by_type[kind]}
    examples = list(zip(qa[:5], answers[:5], strict=True))
    return {"geneval": gen, "vqa_accuracy": vqa_accuracy(answers, qa), "vqa_by_type": vqa_by_type,
            "prompts": n_prompts, "images_per_prompt": images_per_prompt, "questions": len(qa), "steps": steps,
            "guidance": guidance, "examples": examples}


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
