"""Requests interleaved, aborted and restarted in one thread: each is served as if it ran alone, or refused.

A compiled denoising program tells requests apart by their conditioning and flow time. Any mix of
two or three users' loops (other prompts, other step counts, some stopped early), with or without
``flashu_compile.request``, must give every finished loop exactly what the same loop gives alone
in a freshly compiled program, or end with an error that names the request context.
"""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashu_compile
import flashu_compile.runtime
from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.sampling import time_grid
from flashu_compile.models.showo2.sequences import t2i_rows
from flashu_compile.runtime.request import end_implicit_requests
from tests.conftest import small_config
from tests.passes.reference import assert_close_rel, latent_noise
from tests.runtime.test_request import _plan

PROMPTS = ["a red circle", "two blue square", "a green triangle above a yellow square"]
CONFIGS = {
    "prefix_cache": {"passes": ["prefix_cache"]},
    "head_cache": {"passes": ["head_cache"], "cache_interval": 2},
    "layer_skip": {"passes": ["layer_skip"], "skip_ratio": 0.5, "skip_interval": 2},
    "paper": {"preset": "paper"},
}


@pytest.fixture(scope="module")
def model(tokenizer):
    return Showo2.random(small_config(num_layers=4), seed=3).attach(tokenizer=tokenizer)


def user_loop(denoise, model, prompt, steps, seed, context):
    """A user's guided Euler loop as a generator: it yields after every model call and returns its latent."""
    rows = t2i_rows(model.tokenizer, [prompt], model.config.num_image_tokens, model.config.max_text_len,
                    guidance=True)
    x, grid = latent_noise(model, 1, seed=seed), time_grid(steps)
    with flashu_compile.request("t2i", calls=steps - 1) if context else _no_context():
        for i in range(steps - 1):
            v = denoise(rows.text_tokens, torch.cat([x, x]), grid[i].expand(2), rows.attention_mask,
                        rows.modality_positions).float()
            cond, uncond = v.chunk(2)
            x = x + (grid[i + 1] - grid[i]) * (uncond + 2.0 * (cond - uncond))
            yield
    return x


class _no_context:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _options(model, name):
    options = {**CONFIGS[name], "lowering": "eager", "hybrid_tau": 0}
    if name == "paper":
        options["plan"] = _plan(model)
    return options


def _compile(model, name):
    torch._dynamo.reset()
    end_implicit_requests()
    return torch.compile(model.denoise, backend="flashu", options=_options(model, name))


def _drain(loop):
    try:
        while True:
            next(loop)
    except StopIteration as done:
        return done.value


_ALONE: dict = {}


def _alone(model, name, prompt, steps, seed, context):
    key = (name, prompt, steps, seed, context)
    if key not in _ALONE:
        _ALONE[key] = _drain(user_loop(_compile(model, name), model, prompt, steps, seed, context))
    return _ALONE[key]


loops = st.lists(st.tuples(st.integers(0, 2), st.integers(3, 6), st.booleans()), min_size=2, max_size=3,
                 unique_by=lambda spec: spec[0])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(CONFIGS)), specs=loops, context=st.booleans(), data=st.data())
def test_interleaved_requests_equal_each_run_alone_or_are_refused(model, name, specs, context, data):
    """specs: (prompt, grid points, stopped early) per loop; the order of their calls is drawn."""
    denoise = _compile(model, name)
    running = {k: user_loop(denoise, model, PROMPTS[p], steps, 10 + k, context) for k, (p, steps, _) in
               enumerate(specs)}
    stop_after = {k: data.draw(st.integers(1, steps - 2)) for k, (_, steps, stopped) in enumerate(specs) if stopped}
    made = dict.fromkeys(running, 0)
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # paper: the plan's FFN reordering is reported once per model
        try:
            while running:
                k = data.draw(st.sampled_from(sorted(running)))
                if made[k] == stop_after.get(k):
                    running.pop(k).close()  # the user stops this loop: nothing more is asked of it
                    continue
                try:
                    next(running[k])
                    made[k] += 1
                except StopIteration as done:
                    results[k] = done.value
                    del running[k]
        except RuntimeError as error:
            # Only loops sharing one thread's request contexts may be refused, and the error names the context.
            assert context, error
            assert "flashu_compile.request" in str(error)
            return
        finally:
            for loop in running.values():
                loop.close()
    assert flashu_compile.runtime.current_request() is None  # every context the loops opened is closed
    for k, value in results.items():
        p, steps, _ = specs[k]
        assert_close_rel(value, _alone(model, name, PROMPTS[p], steps, 10 + k, context))
