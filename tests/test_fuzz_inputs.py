"""Fuzzing what users send: option dicts, numbers to the public API, command lines.

Every outcome is a correct result or a ValueError naming the input (CLI: status 2 and an
``error:`` line, never a traceback). Models are the tiny preset, run eagerly for a few steps.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.sampling import generate_latents
from flashu_compile.options import PASSES, FlashUOptions
from flashu_compile.tools import cli, common

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Numbers a user might send, right or wrong: nan, inf, negative, huge, bool, str, numpy scalars.
numbers = st.one_of(
    st.integers(-3, 12), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.sampled_from(["3", "", "nan", "7.5"]),
    st.integers(-3, 12).map(np.int64), st.floats(width=32).map(np.float32), st.just(None),
)
values = st.one_of(numbers, st.lists(st.sampled_from([*PASSES, "magic", 3]), max_size=3),
                   st.lists(st.tuples(numbers, numbers), max_size=2), st.sampled_from(["eager", "paper", "t2i"]))
keys = st.sampled_from(["passes", "prune_ratio", "hybrid_tau", "guidance_schedule", "lowering", "preset", "strict",
                        "skip_interval", "token_drop_ratio", "decode_graphs", "task", "bogus", 7])


@pytest.fixture(scope="module")
def tiny():
    return Showo2.from_preset("tiny")


@FAST
@given(st.dictionaries(keys, values, max_size=4))
def test_option_dicts_build_or_name_the_key(options):
    try:
        opts = FlashUOptions.from_dict(options)
    except ValueError as err:
        assert "option" in str(err)
        return
    for key, value in options.items():
        if key in ("prune_ratio", "token_drop_ratio"):
            assert math.isfinite(getattr(opts, key)) and 0 <= getattr(opts, key) < 1
        if key in ("hybrid_tau", "skip_interval", "decode_graphs"):
            assert type(getattr(opts, key)) is int and not isinstance(value, (bool, float, str))


@FAST
@given(steps=numbers, guidance=numbers, shift=numbers, seed=numbers)
def test_sampler_numbers_give_finite_latents_or_a_named_error(tiny, steps, guidance, shift, seed):
    """Any grid the checks admit is served (the denoiser is a stand-in, so 10 000 points stay cheap)."""
    def denoise(tokens, x, t, mask, positions):
        return -x

    kwargs = {"steps": steps, "guidance": guidance, "shift": shift, "seed": seed}
    try:
        out = generate_latents(tiny, tiny.tokenizer, ["a red circle"], denoise=denoise, progress=False, **kwargs)
    except ValueError as err:
        assert any(str(err).startswith(f"{name} must") for name in kwargs), err
        return
    assert out.shape == (1, tiny.config.image_latent_dim, *tiny.config.latent_size)
    assert bool(torch.isfinite(out).all())


def _valid_steps(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 2 <= value <= 10_000


small_or_bad = st.one_of(st.integers(1, 2), st.integers(-2, 0), st.just(10**6), st.floats(), st.booleans(),
                         st.just("2"), st.just(np.int64(2)), st.just(np.float64(2.0)))


@settings(max_examples=15, deadline=None)
@given(steps=st.one_of(st.integers(2, 3), numbers.filter(lambda v: v is not None and not _valid_steps(v))),
       guidance=numbers, max_new_tokens=small_or_bad,
       question=st.sampled_from(["what colour is the circle?", "", "  ", "🍎?", "一个"]))
def test_the_real_model_serves_or_names_the_argument(tiny, steps, guidance, max_new_tokens, question):
    try:
        images = tiny.generate_images("a red circle", steps=steps, guidance=guidance, progress=False)
        assert images.shape == (1, 3, 32, 32) and bool(torch.isfinite(images).all())
    except ValueError as err:
        assert str(err).startswith(("steps must", "guidance must")), err
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            text = tiny.answer(image, question, max_new_tokens=max_new_tokens)
    except ValueError as err:
        assert str(err).startswith(("question must", "max_new_tokens must")), err
        return
    assert isinstance(text, str)
    if question in ("🍎?", "一个"):  # encoded as <unk>, and said so
        assert any("encoded as <unk>" in str(w.message) for w in caught)


flag_values = st.one_of(st.sampled_from(["-1", "0", "1", "2", "3", "99", "nan", "inf", "-inf", "1e400", "", " ", "x",
                                         "passes=null", "skip_ratio=2", "guidance_schedule=[[2.7,1]]", ".", "..",
                                         "/proc/self/x", "paper", "eager"]),
                        st.text(max_size=6))
commands = {
    "demo": ["--steps", "--guidance", "--seed", "--max-new-tokens", "--upscale", "--out", "--prompt", "--question"],
    "ask": ["--scene", "--question", "--preset", "--lowering", "--max-new-tokens", "--image"],
    "calibrate": ["--prune-ratio", "--multiple", "--steps", "--guidance", "--seed", "--samples", "--batch-size",
                  "--out"],
    "graph-diff": ["--steps", "--step", "--tolerance", "--seed", "-O", "--preset", "--passes", "--out"],
    "bench": ["--runs", "--prompts", "--max-new-tokens", "--guidance", "--seed", "--out"],
}


@st.composite
def command_lines(draw):
    command = draw(st.sampled_from(sorted(commands)))
    argv = [command]
    for flag in draw(st.lists(st.sampled_from(commands[command]), max_size=4)):
        argv.append(f"{flag}={draw(flag_values)}")
    return argv


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=command_lines())
def test_command_lines_exit_0_or_2_with_an_error_line(argv, capsys):
    """The model never loads here (a stand-in reports it as a user error), so only the checks before it run."""
    def load(args):
        raise ValueError("stand-in: the checks passed and the model would load now")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "load_model", load)
        code = cli.main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == 2 and "error: " in err, (argv, code, err)
