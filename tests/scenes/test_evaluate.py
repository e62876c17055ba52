"""The evaluation harness, with stand-in models whose true abilities are known."""

from collections import Counter

import numpy as np
import pytest
import torch

from flashu_compile.scenes import make_split, to_tensor
from flashu_compile.scenes.dataset import QUESTION_TYPES, question_type
from flashu_compile.scenes.evaluate import evaluate, vqa_items
from flashu_compile.scenes.scoring import normalise_answer


class Oracle:
    """Draws each caption's test scene exactly; answers the question types in ``knows`` correctly
    and says "no" to everything else. Looks scenes up by caption, as a real model only sees text."""

    def __init__(self, n: int, knows=QUESTION_TYPES):
        self.scenes = make_split("test", n, seed=0)
        self.knows = set(knows)

    def generate_images(self, prompts, steps, guidance, seed, progress):
        by_caption = {s.caption: s for s in self.scenes}
        return torch.stack([(to_tensor(by_caption[p].render()) + 1) / 2 for p in prompts])

    def answer(self, image, question, max_new_tokens):
        if question_type(question) not in self.knows:
            return "no"
        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        scene = next(s for s in self.scenes if (s.render() == pixels).all() and question in dict(s.qa))
        return dict(scene.qa)[question]


def test_vqa_asks_every_question_type():
    qa = [(q, a) for _, q, a in vqa_items(make_split("test", 200, seed=0), 200)]
    kinds = Counter(question_type(q) for q, _ in qa)
    assert set(kinds) == set(QUESTION_TYPES) and len(qa) == 200
    # Colour questions are about a third of all questions, not all of them.
    assert 0.2 < kinds["colour"] / len(qa) < 0.45


def test_a_model_that_only_knows_colours_does_not_pass_vqa():
    result = evaluate(Oracle(60, knows=("colour",)), n_prompts=6, n_questions=60)
    assert result["vqa_by_type"]["colour"]["accuracy"] == 1.0
    assert result["vqa_by_type"]["shape"]["accuracy"] == 0.0
    assert result["vqa_accuracy"] < 0.6


def test_an_oracle_scores_one_everywhere():
    result = evaluate(Oracle(60), n_prompts=30, n_questions=60)
    assert result["vqa_accuracy"] == 1.0
    assert result["geneval"]["overall"] == result["geneval"]["correct"] == 1.0
    assert sum(v["questions"] for v in result["vqa_by_type"].values()) == result["questions"] == 60


def test_vqa_items_are_the_scenes_own_questions_in_order():
    scenes = make_split("test", 50, seed=0)
    items = vqa_items(scenes, 100)
    assert [(q, a) for _, q, a in items] == [pair for s in scenes for pair in s.qa][:100]
    assert all((q, a) in s.qa for s, q, a in items)
    assert all(normalise_answer(a) == a for _, _, a in items)
    with pytest.raises(ValueError, match="hold only"):
        vqa_items(scenes[:2], 100)


@pytest.mark.parametrize("question", ["what is this?", ""])
def test_unknown_questions_have_no_type(question):
    with pytest.raises(ValueError, match="not a scenes question"):
        question_type(question)


def test_the_oracle_reads_exact_pixels():
    s = make_split("test", 1, seed=0)[0]
    image = (to_tensor(s.render()) + 1) / 2
    assert np.array_equal((image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy(), s.render())


class EvenSeedsOnly(Oracle):
    """Draws a caption's scene for even seeds and an empty image for odd ones."""

    def generate_images(self, prompts, steps, guidance, seed, progress):
        images = super().generate_images(prompts, steps, guidance, seed, progress)
        return images if seed % 2 == 0 else torch.zeros_like(images)


def test_every_prompt_gets_its_own_images_each_from_its_own_seed():
    result = evaluate(EvenSeedsOnly(60), n_prompts=15, n_questions=60, batch=1, images_per_prompt=4)
    assert result["images_per_prompt"] == 4 and result["prompts"] == 15
    # Batch 1 gives image i the seed i: half of each caption's four images are drawn, half are empty.
    assert result["geneval"]["correct"] == 0.5
    with pytest.raises(ValueError, match="images_per_prompt must be at least 1"):
        evaluate(Oracle(60), n_prompts=6, n_questions=60, images_per_prompt=0)
