"""Score a Show-o2 on held-out scenes: GenEval-like image checks and VQA accuracy.

    python -m flashu_compile.scenes.evaluate MODEL_DIR --prompts 100 --questions 200
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm.auto import tqdm

from flashu_compile.models.showo2 import Showo2

from .dataset import make_split, to_tensor
from .scoring import geneval_score, vqa_accuracy


@torch.no_grad()
def evaluate(model: Showo2, n_prompts: int = 100, n_questions: int = 200, steps: int = 50, guidance: float = 5.0,
             seed: int = 0, batch: int = 10) -> dict:
    scenes = make_split("test", max(n_prompts, n_questions), seed=seed)
    prompts = scenes[:n_prompts]
    images = []
    for i in tqdm(range(0, len(prompts), batch), desc="generating"):
        chunk = prompts[i:i + batch]
        images.append(model.generate_images([s.caption for s in chunk], steps=steps, guidance=guidance,
                                            seed=seed + i, progress=False))
    images = torch.cat(images)
    gen = geneval_score(images, prompts)

    qa, answers = [], []
    for s in tqdm(scenes[:n_questions], desc="answering"):
        question, answer = s.qa[0]
        image = (to_tensor(s.render()) + 1) / 2
        answers.append(model.answer(image, question, max_new_tokens=4))
        qa.append((question, answer))
    examples = list(zip(qa[:5], answers[:5], strict=True))
    return {"geneval": gen, "vqa_accuracy": vqa_accuracy(answers, qa), "prompts": len(prompts),
            "questions": len(qa), "steps": steps, "guidance": guidance, "examples": examples}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="checkpoint folder, or 'default'")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=5.0)
    args = parser.parse_args(argv)
    model = Showo2.default() if args.model == "default" else Showo2.from_pretrained(args.model)
    print(json.dumps(evaluate(model, args.prompts, args.questions, args.steps, args.guidance), indent=1))


if __name__ == "__main__":
    main()
