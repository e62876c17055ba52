"""The evaluation harness, with stand-in models whose true abilities are known."""

from collections import Counter

import numpy as np
import pytest
import torch

from flashu_compile.scenes import make_split, to_tensor
from flashu_compile.scenes.dataset import QUESTION_TYPES, question_type
from flashu_compile.scenes.evaluate import (
    bootstrap_interval,
    compare,
    evaluate,
    grouped_mean,
    markdown_tables,
    vqa_items,
)
from flashu_compile.scenes.scoring import normalise_answer


class Oracle:
    """Draws each caption's test scene exactly; answers the question types in ``knows`` correctly
    and says "no" to everything else. Looks scenes up by caption, as a real model only sees text."""

    def __init__(self, n: int, knows=QUESTION_TYPES):
        self.scenes = make_split("test", n, seed=0)
        self.knows = set(knows)

    def generate_images(self, prompts, steps, guidance, seed, progress, solver="euler"):
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

    def generate_images(self, prompts, steps, guidance, seed, progress, solver="euler"):
        images = super().generate_images(prompts, steps, guidance, seed, progress, solver)
        return images if seed % 2 == 0 else torch.zeros_like(images)


def test_every_prompt_gets_its_own_images_each_from_its_own_seed():
    result = evaluate(EvenSeedsOnly(60), n_prompts=15, n_questions=60, batch=1, images_per_prompt=4)
    assert result["images_per_prompt"] == 4 and result["prompts"] == 15
    # Batch 1 gives image i the seed i: half of each caption's four images are drawn, half are empty.
    assert result["geneval"]["correct"] == 0.5
    with pytest.raises(ValueError, match="images_per_prompt must be at least 1"):
        evaluate(Oracle(60), n_prompts=6, n_questions=60, images_per_prompt=0)


def test_an_all_correct_sample_has_the_interval_one_one():
    assert bootstrap_interval([1.0] * 40) == (1.0, 1.0)
    assert bootstrap_interval([1.0] * 12, ["single", "count", "relation"] * 4) == (1.0, 1.0)


def test_a_fifty_fifty_interval_holds_one_half_and_narrows_with_n():
    widths = []
    for n in (20, 200, 2000):
        low, high = bootstrap_interval([0.0, 1.0] * (n // 2))
        assert low < 0.5 < high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    # The normal approximation: 2 x 1.96 x sqrt(0.25 / n).
    assert widths[2] == pytest.approx(2 * 1.96 * (0.25 / 2000) ** 0.5, rel=0.1)


def test_the_interval_is_of_the_mean_of_group_means():
    values, groups = [0.0, 0.0, 0.0, 1.0], ["a", "a", "a", "b"]  # group means 0 and 1: overall 0.5, not 0.25
    assert grouped_mean(np.array(values), np.array(groups)) == 0.5
    low, high = bootstrap_interval(values, groups)
    # A resample with both groups scores 0.5, one without "b" (a third of them) scores "a" alone: 0.
    assert (low, high) == (0.0, 0.5)
    with pytest.raises(ValueError, match="3 groups for 4 values"):
        bootstrap_interval(values, groups[:3])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_interval([])


def test_the_bootstrap_is_reproducible_and_seeded():
    values = np.random.default_rng(3).random(50)
    assert bootstrap_interval(values) == bootstrap_interval(values)
    assert bootstrap_interval(values, seed=1) != bootstrap_interval(values)


def _result(correct, kinds, right, types):
    return {"per_prompt": {"correct": correct, "kind": kinds}, "per_question": {"correct": right, "type": types}}


def test_compare_pairs_items_so_identical_configurations_differ_by_exactly_zero():
    rng = np.random.default_rng(0)
    kinds, types = ["single", "count", "relation"] * 10, ["colour", "shape", "count"] * 20
    base = _result(list(rng.random(30) * 0.9), kinds, list(rng.random(60) < 0.5), types)
    shifted = _result([c + 0.05 for c in base["per_prompt"]["correct"]], kinds,
                      base["per_question"]["correct"], types)
    comparison = compare({"off": base, "same": base, "shifted": shifted}, resamples=500)
    assert comparison["differences"]["same"] == {key: {"value": 0.0, "low": 0.0, "high": 0.0}
                                                 for key in comparison["scores"]["off"]}
    assert set(comparison["differences"]) == {"same", "shifted"}  # none for the baseline itself
    # Paired: every caption gains 0.05, so the difference is 0.05 in every resample, while the unpaired intervals
    # of the two scores overlap widely.
    overall = comparison["differences"]["shifted"]["geneval/overall"]
    assert overall == pytest.approx({"value": 0.05, "low": 0.05, "high": 0.05})
    assert comparison["differences"]["shifted"]["vqa/overall"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    a, b = comparison["scores"]["off"]["geneval/overall"], comparison["scores"]["shifted"]["geneval/overall"]
    assert a["high"] > b["low"]
    assert comparison["scores"]["off"]["geneval/overall"]["value"] == pytest.approx(
        np.mean([np.mean(base["per_prompt"]["correct"][i::3]) for i in range(3)]))
    tables = markdown_tables(comparison)
    assert "| shifted | +0." in tables and "Differences from off (paired)" in tables


def test_compare_refuses_results_on_different_items():
    a = _result([1.0, 0.0], ["single", "count"], [True], ["colour"])
    b = _result([1.0, 0.0], ["count", "single"], [True], ["colour"])
    with pytest.raises(ValueError, match="'a' and 'b' were scored on different prompts"):
        compare({"a": a, "b": b})


def test_evaluate_keeps_the_items_compare_resamples():
    result = evaluate(EvenSeedsOnly(60), n_prompts=6, n_questions=9, batch=1, images_per_prompt=2, progress=False)
    assert result["per_prompt"]["correct"] == [0.5] * 6  # per caption: one drawn image of two
    assert result["per_prompt"]["kind"] == [s.kind for s in make_split("test", 9, seed=0)[:6]]
    assert result["per_question"]["correct"] == [True] * 9 and len(result["per_question"]["type"]) == 9
    scores = compare({"x": result})["scores"]["x"]
    assert scores["geneval/overall"] == {"value": 0.5, "low": 0.5, "high": 0.5}
    assert scores["vqa/overall"]["value"] == result["vqa_accuracy"] == 1.0
