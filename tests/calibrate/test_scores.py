"""Wanda scores, keep-set selection and calibrate() on toy models."""

import copy

import pytest
import torch

from flashu_compile.calibrate import Plan, calibrate
from flashu_compile.calibrate.plan import decoder_layers, keep_count
from flashu_compile.calibrate.scores import DownProjInputs, select_keep, wanda_scores
from flashu_compile.models.showo2 import Showo2
from flashu_compile.tasks import compile_tasks

from ..conftest import small_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tokenizer):
    return Showo2.random(small_config(), seed=3).attach(tokenizer=tokenizer)


@pytest.fixture(scope="module")
def plan(model):
    return calibrate(model, prune_ratio=0.2, multiple=8, steps=3, samples=3, progress=False)


def _hooks(model):
    return sum(len(layer.mlp.down_proj._forward_pre_hooks) for _, layer in decoder_layers(model))


def test_wanda_scores_by_hand():
    sq_sums = torch.tensor([4.0, 9.0, 0.0])
    down = torch.tensor([[1.0, -2.0, 3.0], [-1.0, 0.0, 1.0]])
    # ||X_j|| = [2, 3, 0]; sum_i |W[i, j]| = [2, 2, 4]
    assert wanda_scores(sq_sums, down).tolist() == [4.0, 6.0, 0.0]
    assert wanda_scores(sq_sums, down).dtype == torch.float64
    with pytest.raises(ValueError, match="do not fit"):
        wanda_scores(torch.ones(2), down)


def test_recorded_norms_give_the_formula_over_all_tokens(model):
    layers = [layer for _, layer in decoder_layers(model)]
    captured = {i: [] for i in range(len(layers))}
    spies = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: captured[i].append(a[0].clone()))
             for i, layer in enumerate(layers)]
    embeds = [torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    try:
        with torch.no_grad(), DownProjInputs(layers) as rec:
            for e in embeds:  # two calls: the norm must run over the tokens of both
                model.llm_hidden(e, None)
    finally:
        for spy in spies:
            spy.remove()
    assert _hooks(model) == 0
    for i, layer in enumerate(layers):
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured[i]]).double()
        assert rec.tokens[i] == 2 * 2 * 7
        norm = x.norm(dim=0)
        expected = norm * layer.mlp.down_proj.weight.double().abs().sum(dim=0)
        torch.testing.assert_close(wanda_scores(rec.sq_sums[i], layer.mlp.down_proj.weight), expected)


def test_hooks_are_removed_on_error(model):
    layers = [layer for _, layer in decoder_layers(model)]
    with pytest.raises(RuntimeError, match="boom"), DownProjInputs(layers):
        assert _hooks(model) == len(layers)
        raise RuntimeError("boom")
    assert _hooks(model) == 0


def test_calibrate_removes_hooks_when_a_batch_fails(model, monkeypatch):
    import flashu_compile.models.showo2.sampling as sampling

    def failing(*args, **kwargs):
        assert _hooks(model) == len(decoder_layers(model))  # the hooks were active during the batch
        raise RuntimeError("denoising failed")

    monkeypatch.setattr(sampling, "generate_latents", failing)
    with pytest.raises(RuntimeError, match="denoising failed"):
        calibrate(model, multiple=8, steps=3, samples=1, progress=False)
    assert _hooks(model) == 0


@pytest.mark.parametrize("size, ratio, multiple, kept", [
    (352, 0.2, 64, 256),    # the embedded default model
    (8960, 0.2, 64, 7168),  # Show-o2 1.5B, as in the paper
    (64, 0.2, 8, 48),       # 64 - 12 = 52 -> 48
    (100, 0.3, 1, 70),      # 100 * 0.3 is 30.000000000000004 in floating point
    (10, 0.3, 1, 7),        # 10 * 0.3 is 3.0000000000000004
    (128, 0.9, 64, 64),     # never fewer than one multiple
    (40, 0.5, 64, 40),      # smaller than one multiple: keep everything
    (96, 0.0, 64, 64),      # rounding down applies even without pruning
])
def test_keep_count(size, ratio, multiple, kept):
    assert keep_count(size, ratio, multiple) == kept


def test_select_keep_sorted_top_scores_ties_by_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0, 2.0])
    kept = select_keep(scores, 2)
    assert kept.tolist() == [1, 2] and kept.dtype == torch.int64
    assert select_keep(scores, 4).tolist() == [1, 2, 4, 5]


def test_calibrate_keeps_top_scores_per_task(plan, model):
    assert plan.tasks == ["t2i", "mmu"]
    assert plan.layer_paths == ["showo.model.layers.0", "showo.model.layers.1"]
    assert plan.intermediate_sizes == [64, 64]
    for task in plan.tasks:
        for kept, scores in zip(plan.keep[task], plan.scores[task], strict=True):
            assert len(kept) == 48 and kept.dtype == torch.int64
            assert bool((kept[1:] > kept[:-1]).all())
            dropped = torch.ones(64, dtype=torch.bool)
            dropped[kept] = False
            assert scores[kept].min() >= scores[dropped].max()
    plan.validate()


def test_every_denoising_call_and_prefill_token_counts(plan, model, tokenizer):
    from flashu_compile.models.showo2.sequences import mmu_row
    from flashu_compile.scenes.dataset import make_split

    cfg = model.config
    t2i_len = 1 + cfg.max_text_len + 1 + cfg.num_image_tokens + 1 + 2  # bos text boi time image eoi eos
    # 3 prompts, cond + uncond rows, steps - 1 = 2 model calls.
    assert plan.settings["tokens"]["t2i"] == 3 * 2 * 2 * t2i_len
    scenes = make_split("train", 3, seed=0)
    mmu = sum(mmu_row(tokenizer, s.qa[i % len(s.qa)][0], cfg.num_image_tokens).seq_len for i, s in enumerate(scenes))
    assert plan.settings["tokens"]["mmu"] == mmu


def test_calibrate_is_deterministic_for_a_seed(plan, model):
    again = calibrate(model, prune_ratio=0.2, multiple=8, steps=3, samples=3, progress=False)
    assert again == plan
    other = calibrate(model, prune_ratio=0.2, multiple=8, steps=3, samples=3, seed=1, progress=False)
    assert not torch.equal(other.scores["t2i"][0], plan.scores["t2i"][0])


def test_t2i_and_mmu_scores_differ(plan):
    for t2i, mmu in zip(plan.scores["t2i"], plan.scores["mmu"], strict=True):
        assert not torch.allclose(t2i, mmu, rtol=1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(plan.keep["t2i"], plan.keep["mmu"], strict=True))


def test_explicit_data_and_single_task(model):
    cfg = model.config
    latents = [torch.randn(1, cfg.image_latent_dim, *cfg.latent_size, generator=torch.Generator().manual_seed(s))
               for s in range(2)]
    plan = calibrate(model, tasks=["mmu"], images=latents, questions=["what colour is the circle?", "is the red"],
                     multiple=16, progress=False)
    assert isinstance(plan, Plan) and plan.tasks == ["mmu"]
    assert [len(k) for k in plan.keep["mmu"]] == [48, 48]  # 64 - 12 = 52 -> 48
    assert plan.settings["samples"] == {"mmu": 2}
    gen = calibrate(model, tasks="t2i", prompts=["a red circle"], guidance=0.0, steps=2, multiple=64,
                    progress=False)
    assert [len(k) for k in gen.keep["t2i"]] == [64, 64]  # 52 rounds down below one multiple: keep 64
    assert gen.settings["tokens"]["t2i"] == 1 * 1 * (cfg.max_text_len + cfg.num_image_tokens + 5)  # no uncond row


@pytest.mark.parametrize("kwargs, message", [
    ({"tasks": ["t2i", "vqa"]}, "unknown task"),
    ({"tasks": []}, "at least one task"),
    ({"prune_ratio": 1.0}, "prune_ratio"),
    ({"prune_ratio": -0.1}, "prune_ratio"),
    ({"multiple": 0}, "multiple"),
    ({"images": [torch.zeros(1, 12, 8, 8)]}, "pairs"),
    ({"images": [torch.zeros(1, 12, 8, 8)], "questions": ["a", "b"]}, "1 images for 2 questions"),
    ({"steps": 1}, "steps"),
])
def test_calibrate_rejects_bad_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibrate(model, progress=False, **kwargs)


def test_calibrate_needs_a_tokenizer(model):
    bare = copy.copy(model)  # shallow: shares the weights, own attributes
    bare.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        calibrate(bare, progress=False)


def test_calibrate_needs_a_codec_for_images_but_not_for_latents(model):
    bare = copy.copy(model)
    bare.codec = None
    with pytest.raises(ValueError, match="codec"):
        calibrate(bare, tasks=["mmu"], multiple=8, progress=False)
    latent = torch.zeros(1, model.config.image_latent_dim, *model.config.latent_size)
    plan = calibrate(bare, tasks=["mmu"], images=[latent], questions=["what shape is the red object?"], multiple=8,
                     progress=False)
    assert plan.tasks == ["mmu"] and plan.settings["tokens"]["mmu"] > model.config.num_image_tokens


def test_calibrate_ignores_a_compiled_guidance_schedule(model, plan):
    # Compiling leaves the model as it was: its schedule lives in the compiled object, never reached by calibration.
    compiled = compile_tasks(model, "flashu", {"guidance_schedule": ((1, 0.0), (1, 5.0)), "lowering": "eager"})
    assert compiled.options.guidance_schedule == ((1, 0.0), (1, 5.0))
    again = calibrate(model, prune_ratio=0.2, multiple=8, steps=3, samples=3, progress=False)
    assert again == plan  # the full cond + uncond batch at every step, as without options
