"""forecast_cache against an eager sampler that forecasts the flow-head trunk by hand (Lagrange form in t)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.sampling import time_grid
from flashu_compile.models.showo2.sequences import t2i_rows
from flashu_compile.passes.forecast_cache import extrapolate
from flashu_compile.runtime import FlopTally
from tests.conftest import small_config
from tests.passes.reference import assert_close_rel, compiled_generate, latent_noise, reference_generate

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def model(tokenizer):
    return Showo2.random(small_config(num_layers=4), seed=3).attach(tokenizer=tokenizer)


def lagrange(points, t):
    """The polynomial through ``points`` at ``t``, in Lagrange's form (independent of the pass's Newton form)."""
    out = 0
    for i, (ti, yi) in enumerate(points):
        weight = 1.0
        for j, (tj, _) in enumerate(points):
            if j != i:
                weight *= (t - tj) / (ti - tj)
        out = out + weight * yi
    return out


@torch.no_grad()
def reference_forecast_generate(model, steps, noise, order, interval, tau, scales):
    """Guided Euler sampling where, between refreshes every ``interval`` calls (project rules), the last head
    block's output is replaced by the polynomial in t through the last ``order + 1`` refreshed outputs."""
    cfg = model.config
    calls = steps - 1
    rows = t2i_rows(model.tokenizer, PROMPTS, cfg.num_image_tokens, cfg.max_text_len,
                    guidance=any(s not in (0, 1) for s in scales))
    grid = time_grid(steps)
    x, b = noise.float(), noise.shape[0]
    kept, kept_batch, was_full = [], None, False
    for k in range(1, calls + 1):
        t = grid[k - 1]
        full = tau > 0 and k > calls - tau
        n = 2 * b if scales[k - 1] not in (0, 1) else b
        if full != was_full or kept_batch != n:
            kept, kept_batch, was_full = [], n, full
        refresh = full or (k - 1) % interval == 0 or not kept

        def hook(module, args, output, refresh=refresh, t=float(t), full=full, kept=kept):
            if refresh:
                if not full:
                    kept.append((t, output))
                    del kept[: -(order + 1)]
                return output
            return lagrange(kept, t)

        handle = model.diffusion_head_a[-1].register_forward_hook(hook)
        try:
            model_x = torch.cat([x, x]) if n > b else x
            v = model.denoise(rows.text_tokens[:n], model_x, t.expand(n), rows.attention_mask[:n],
                              rows.modality_positions[:n]).float()
        finally:
            handle.remove()
        if n > b:
            vc, vu = v.chunk(2)
            v = vu + scales[k - 1] * (vc - vu)
        x = x + (grid[k] - t) * v
    return x


def test_extrapolate_is_exact_on_polynomials_of_its_degree():
    for degree in range(4):
        coefs = torch.randn(degree + 1, generator=torch.Generator().manual_seed(degree))
        points = [(t, sum(float(c) * t ** i for i, c in enumerate(coefs)) * torch.ones(2, dtype=torch.float64)) for t in
                  (0.1, 0.25, 0.3, 0.55)[: degree + 1]]
        want = sum(float(c) * 0.8 ** i for i, c in enumerate(coefs))
        assert torch.allclose(extrapolate(points, 0.8), torch.full((2,), want, dtype=torch.float64), rtol=1e-9)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.integers(4, 13), order=st.integers(0, 2), interval=st.integers(1, 4), tau=st.integers(0, 4),
       schedule=st.sampled_from([None, ((3, 2.0), (2, 4.0)), ((2, 5.0), (3, 0.0))]))
def test_compiled_trajectory_equals_the_hand_forecast(model, steps, order, interval, tau, schedule):
    """Whole requests: steps, forecast order, refresh interval, final full phase, and guidance switching off
    mid-request (a batch change that restarts the kept outputs)."""
    from flashu_compile.runtime.schedule import guidance_scales

    options = {"passes": ["forecast_cache"], "lowering": "eager", "forecast_order": order, "cache_interval": interval,
               "hybrid_tau": tau, "guidance_schedule": schedule}
    noise = latent_noise(model, len(PROMPTS))
    got = compiled_generate(model, options, PROMPTS, steps, noise, 5.0)
    want = reference_forecast_generate(model, steps, noise, order, interval, tau,
                                       guidance_scales(schedule, steps - 1, 5.0))
    assert_close_rel(got, want)


def test_a_forecast_differs_from_reuse_and_skips_the_trunk(model):
    """Order 0 is head_cache exactly; order 1 moves the result; forecast calls do not run the trunk."""
    noise = latent_noise(model, len(PROMPTS))
    options = {"lowering": "eager", "cache_interval": 3, "hybrid_tau": 0}
    reuse = compiled_generate(model, {**options, "passes": ["forecast_cache"], "forecast_order": 0}, PROMPTS, 10,
                              noise)
    cached = reference_generate(model, PROMPTS, 10, 5.0, noise, head_cache=True, cache_interval=3, tau=0)
    assert_close_rel(reuse, cached)
    with FlopTally() as forecast:
        linear = compiled_generate(model, {**options, "passes": ["forecast_cache"], "forecast_order": 1}, PROMPTS,
                                   10, noise)
    with FlopTally() as plain:
        full = compiled_generate(model, {"lowering": "eager", "passes": []}, PROMPTS, 10, noise)
    assert float((linear - reuse).abs().max()) > 1e-4
    assert forecast.total < 0.6 * plain.total  # 3 of 9 calls run the trunk
    assert float((linear - full).abs().max()) > 0
