import warnings

import numpy as np
import pytest
import torch

from flashu_compile.models.showo2.sampling import generate_latents, integrate_cfg, time_grid
from flashu_compile.models.showo2.sequences import t2i_rows


def test_time_grid_is_the_shifted_official_grid():
    grid = time_grid(5, shift=3.0)
    s = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    torch.testing.assert_close(grid, s / (s + 3 - 3 * s))
    assert grid[0] == 0 and grid[-1] == 1
    assert torch.equal(time_grid(4, shift=1.0), torch.linspace(0, 1, 4))
    with pytest.raises(ValueError, match=r"steps must be an int in \[2, 10000\], got 1"):
        time_grid(1)


def test_zero_guidance_equals_plain_euler_loop(small_model, tokenizer):
    cfg = small_model.config
    noise = torch.randn(2, cfg.image_latent_dim, *cfg.latent_size, generator=torch.Generator().manual_seed(3))
    prompts = ["red circle", "blue square left of green triangle"]
    out = generate_latents(small_model, tokenizer, prompts, steps=4, guidance=0.0, noise=noise, progress=False)

    rows = t2i_rows(tokenizer, prompts, cfg.num_image_tokens, cfg.max_text_len, guidance=False)
    assert rows.text_tokens.shape[0] == 2  # no unconditional rows without guidance
    grid = time_grid(4)
    x = noise.clone()
    with torch.no_grad():
        for i in range(3):
            t = torch.full((2,), float(grid[i]))
            _, v = small_model(rows.text_tokens, image_latents=x, t=t, attention_mask=rows.attention_mask,
                               modality_positions=rows.modality_positions)
            x = x + (grid[i + 1] - grid[i]) * v
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)


def test_guidance_combines_cond_first_then_uncond(tokenizer):
    rows = t2i_rows(tokenizer, ["red"], 4, 3, guidance=True)
    calls = []

    def fake(tokens, x, t, mask, positions):
        calls.append((tokens.clone(), x.clone(), t.clone()))
        v = torch.zeros_like(x)
        v[0], v[1] = 3.0, 1.0  # cond row, then uncond row
        return v

    noise = torch.zeros(1, 2, 2, 2)
    out = integrate_cfg(fake, rows, noise, torch.tensor([0.0, 0.5, 1.0]), guidance=2.0, progress=False)
    # v = v_u + s (v_c - v_u) = 1 + 2 * 2 = 5, integrated over a total time of 1.
    torch.testing.assert_close(out, torch.full_like(noise, 5.0))
    assert len(calls) == 2
    tokens, x, t = calls[0]
    assert torch.equal(tokens, rows.text_tokens) and x.shape[0] == 2 and torch.equal(x[0], x[1])
    assert torch.equal(t, torch.tensor([0.0, 0.0])) and torch.equal(calls[1][2], torch.tensor([0.5, 0.5]))


def test_scale_one_runs_the_cond_rows_alone(tokenizer):
    """v_uncond + 1 (v_cond - v_uncond) is v_cond: at scale 1 (the embedded model's best) the batch halves, the
    result is the cond velocity, and rows without unconditional ones are enough."""
    guided = t2i_rows(tokenizer, ["red"], 4, 3, guidance=True)
    batches = []

    def fake(tokens, x, t, mask, positions):
        batches.append(x.shape[0])
        v = torch.full_like(x, 1.0)
        v[0] = 3.0  # cond row; an uncond row, if any, gives 1
        return v

    noise = torch.zeros(1, 2, 2, 2)
    grid = torch.tensor([0.0, 0.5, 1.0])
    out = integrate_cfg(fake, guided, noise, grid, guidance=[1.0, 2.0], progress=False)
    # first interval v_cond = 3 (no uncond row run), second 1 + 2 (3 - 1) = 5; each over half the time.
    torch.testing.assert_close(out, torch.full_like(noise, 4.0))
    assert batches == [1, 2]
    plain = t2i_rows(tokenizer, ["red"], 4, 3, guidance=False)
    assert torch.equal(integrate_cfg(fake, plain, noise, grid, guidance=1.0, progress=False),
                       torch.full_like(noise, 3.0))
    with pytest.raises(ValueError, match="guidance other than 0 and 1 needs rows with unconditional rows"):
        integrate_cfg(fake, plain, noise, grid, guidance=1.5, progress=False)


def test_generation_is_deterministic_per_seed(small_model, tokenizer):
    a = generate_latents(small_model, tokenizer, ["red circle"], steps=3, guidance=5.0, seed=1, progress=False)
    b = generate_latents(small_model, tokenizer, ["red circle"], steps=3, guidance=5.0, seed=1, progress=False)
    c = generate_latents(small_model, tokenizer, ["red circle"], steps=3, guidance=5.0, seed=2, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.shape == (1, 12, 8, 8)


def test_generate_images_decodes_with_the_pixel_codec(small_model):
    images = small_model.generate_images(["red circle", "blue"], steps=2, guidance=1.0, progress=False)
    assert images.shape == (2, 3, 16, 16)
    assert images.min() >= 0 and images.max() <= 1


def test_bad_generation_arguments(small_model, tokenizer):
    with pytest.raises(ValueError, match=r"guidance must be in \[0, 1000\], got -1.0"):
        generate_latents(small_model, tokenizer, ["red"], steps=3, guidance=-1.0)
    with pytest.raises(ValueError, match="noise must be"):
        generate_latents(small_model, tokenizer, ["red"], steps=3, noise=torch.zeros(1, 3, 3, 3))


def test_inputs_follow_the_model_device(tokenizer):
    """Rows, noise and the time grid are built on the CPU; they must reach the model's device (e.g. CUDA)."""
    import copy

    from flashu_compile.models.showo2 import Showo2
    from flashu_compile.models.showo2.understanding import prepare
    from tests.conftest import small_config

    model = copy.deepcopy(Showo2.random(small_config())).attach(tokenizer=tokenizer).to("meta")
    seen = []

    def denoise(*args):
        seen.extend(a.device.type for a in args)
        return torch.zeros_like(args[1])

    out = generate_latents(model, tokenizer, ["red circle"], steps=3, denoise=denoise, progress=False)
    assert set(seen) == {"meta"} and out.device.type == "meta"
    c, (h, w) = model.config.image_latent_dim, model.config.latent_size
    rows, embeds = prepare(model, tokenizer, torch.zeros(1, c, h, w), "what colour is the circle?")
    assert {rows.text_tokens.device.type, rows.attention_mask.device.type, rows.time_positions.device.type,
            embeds.device.type} == {"meta"}


@pytest.mark.parametrize("kwargs, message", [
    ({"guidance": float("nan")}, "guidance must be a finite number, got nan"),  # was silently unguided
    ({"guidance": float("inf")}, "guidance must be a finite number, got inf"),  # was a black image
    ({"shift": float("nan")}, "shift must be a finite number, got nan"),  # were NaN images
    ({"shift": float("inf")}, "shift must be a finite number, got inf"),
    ({"shift": 0.0}, r"shift must be in \(0, 1e\+06\]"),
    ({"steps": 2.7}, "steps must be an int, got float 2.7"),
    ({"steps": True}, "steps must be an int, got bool True"),
    ({"steps": "3"}, "steps must be an int, got str '3'"),
    ({"steps": 10**9}, r"steps must be an int in \[2, 10000\]"),
    ({"seed": -1}, r"seed must be an int in \[0, 18446744073709551615\], got -1"),
    ({"seed": 1.5}, "seed must be an int, got float"),
    ({"max_text_len": -5}, "max_text_len must be an int >= 1, got -5"),
    ({"prompts": []}, "prompts must be a str or a non-empty list"),
    ({"prompts": ["red", None]}, r"prompts\[1\] must be a str, got NoneType"),
])
def test_generation_arguments_are_checked_before_any_work(small_model, tokenizer, kwargs, message):
    def denoise(*args):
        raise AssertionError("the model ran before the arguments were checked")

    kwargs = {"prompts": ["red"], "steps": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_latents(small_model, tokenizer, denoise=denoise, progress=False, **kwargs)


def test_numpy_scalars_are_accepted_as_numbers(small_model, tokenizer):
    ref = generate_latents(small_model, tokenizer, ["red"], steps=3, guidance=2.0, shift=3.0, seed=1, progress=False)
    out = generate_latents(small_model, tokenizer, ["red"], steps=np.int64(3), guidance=np.float32(2.0),
                           shift=np.float64(3.0), seed=np.uint8(1), progress=False)
    assert torch.equal(ref, out)


def test_integrate_cfg_rejects_non_finite_scales(tokenizer):
    rows = t2i_rows(tokenizer, ["red"], 4, 3, guidance=True)
    with pytest.raises(ValueError, match=r"guidance\[1\] must be a finite number, got nan"):
        integrate_cfg(lambda *a: a[1], rows, torch.zeros(1, 2, 2, 2), torch.tensor([0.0, 0.5, 1.0]),
                  guidance=[1.0, float("nan")], progress=False)


def test_a_relative_schedule_honours_guidance_as_s0(small_model, tokenizer, monkeypatch):
    """The paper preset scales the request's guidance (0.75 s0, then s0) without a warning; no guidance: 7.5."""
    from flashu_compile.backend import sampler_rules
    from flashu_compile.models.showo2 import sampling
    from flashu_compile.options import FlashUOptions

    seen = []
    monkeypatch.setattr(sampling, "integrate_cfg",
                        lambda denoise, rows, noise, grid, scales, progress, rules, solver: seen.append(scales))
    paper = FlashUOptions.from_dict({"preset": "paper"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate_latents(small_model, tokenizer, ["red"], steps=11, guidance=3.0,
                         rules=sampler_rules(paper), progress=False)
        generate_latents(small_model, tokenizer, ["red"], steps=11,
                         rules=sampler_rules(paper), progress=False)
    assert seen == [[2.25] * 7 + [3.0] * 3, [5.625] * 7 + [7.5] * 3]


def test_an_absolute_schedule_does_not_silently_override_an_explicit_guidance(small_model, tokenizer):
    """An absolute schedule sets every scale itself: ``guidance=`` cannot take effect, so say so."""
    from flashu_compile.backend import sampler_rules
    from flashu_compile.options import FlashUOptions

    absolute = FlashUOptions.from_dict({"guidance_schedule": [(24, 7.5), (11, 10.0)]})
    with pytest.warns(UserWarning, match=r"guidance=3.0 is ignored: .*absolute guidance_schedule \[\(24, 7.5\), "
                      r"\(11, 10.0\)\]"):
        generate_latents(small_model, tokenizer, ["red"], steps=3, guidance=3.0,
                         rules=sampler_rules(absolute), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the schedule alone, or guidance without a schedule: no warning
        generate_latents(small_model, tokenizer, ["red"], steps=3,
                         rules=sampler_rules(absolute), progress=False)
        generate_latents(small_model, tokenizer, ["red"], steps=3, guidance=3.0, progress=False)
        # The public rule: calls past an absolute schedule use the request's guidance, so it is not ignored.
        reference = absolute.replace(step_semantics="flashu-reference", guidance_schedule=((1, 7.5),))
        generate_latents(small_model, tokenizer, ["red"], steps=4, guidance=3.0,
                         rules=sampler_rules(reference), progress=False)


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2)])
def test_the_solvers_converge_at_their_order_on_a_known_flow(tokenizer, solver, order):
    """dx/dt = -x + sin(4t) (unguided rows, so the velocity is the stand-in's) has a closed-form solution; halving
    the intervals of the shifted grid divides the error at t = 1 by about 2 ** order."""
    import math

    from flashu_compile.models.showo2.sampling import SOLVERS

    assert solver in SOLVERS
    rows = t2i_rows(tokenizer, ["red"], 4, 4, guidance=False)
    x0 = torch.tensor([[[[1.0]]]], dtype=torch.float64)

    def flow(tokens, x, t, mask, positions):
        return (-x.double() + torch.sin(4 * t.double()).view(-1, 1, 1, 1))

    def exact(t):  # x' = -x + sin(4t), x(0) = 1
        particular = (math.sin(4 * t) - 4 * math.cos(4 * t)) / 17
        return (1 + 4 / 17) * math.exp(-t) + particular

    errors = []
    for steps in (17, 33, 65):
        x = integrate_cfg(flow, rows, x0, time_grid(steps).double(), 0.0, progress=False, solver=solver)
        errors.append(abs(float(x) - exact(1.0)))
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(2 ** order * 0.8 < r < 2 ** order * 1.25 for r in ratios), (errors, ratios)


def test_heun_makes_two_model_calls_per_interval_inside_its_request(small_model, tokenizer):
    calls = []

    class Rules:
        def scales(self, calls, guidance, explicit=True):
            return [guidance] * calls

        def request(self, task, n):
            calls.append(n)
            from flashu_compile.runtime.request import request

            return request(task, n)

    generate_latents(small_model, tokenizer, ["red"], steps=4, guidance=0.0, progress=False, rules=Rules(),
                     solver="heun")
    assert calls == [6]
    with pytest.raises(ValueError, match=r"solver must be one of \['euler', 'heun'\], got 'rk4'"):
        generate_latents(small_model, tokenizer, ["red"], steps=4, solver="rk4")
