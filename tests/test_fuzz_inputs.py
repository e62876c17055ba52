"""Fuzzing what users send: option dicts, numbers to the public API, command lines.

Every outcome is a correct result or a ValueError naming the input (CLI: status 2 and an
``error:`` line, never a traceback). Models are the tiny preset, run eagerly for a few steps.
"""

import argparse
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
keys = st.sampled_from(["passes", "skip_ratio", "hybrid_tau", "guidance_schedule", "lowering", "preset", "strict",
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
        if key in ("skip_ratio", "token_drop_ratio"):
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


def _flags() -> dict[str, list[argparse.Action]]:
    """Every subcommand's flags, read from the parser itself, so that a new command or flag is fuzzed too."""
    parser = cli.build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: [a for a in command._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
            for name, command in sub.choices.items()}


FLAGS = _flags()
# Right and wrong values alike: negative, zero, huge and non-finite numbers, unknown names, unusable paths, options.
flag_values = st.one_of(
    st.sampled_from(["-1", "0", "1", "2", "3", "7", "99", "0.5", "-0.0", "1000000000000", "1e400", "nan", "inf",
                     "-inf", "", " ", "x", "bogus", "default", "tiny", "showo2-7b", "paper", "off", "eager",
                     "inductor", "tensorrt", "t2i", "mmu", "cuda", "float8", ".", "..", "/proc/self/x", "/nonexistent",
                     "passes=null", "skip_ratio=2", "strict=true", "lowering=tensorrt", "plan=x", "bogus=1",
                     "guidance_schedule=[[2.7,1]]", "a=paper", "a=off,skip_ratio=2", 'a=off,passes=["magic"]']),
    st.text(max_size=6))


# Numbers of the flag's own type as well, so that most lines get past argparse to the command's own checks.
typed_values = {int: st.one_of(st.integers(-2, 100), st.sampled_from([10**12, -(2**70)])).map(str),
                float: st.floats().map(str)}


def _stand_in(*args, **kwargs):
    raise ValueError("stand-in: the checks passed and the work would start now")


@st.composite
def command_lines(draw):
    command = draw(st.sampled_from(sorted(FLAGS)))
    argv = [command]
    required = [a for a in FLAGS[command] if a.required]
    for action in required + draw(st.lists(st.sampled_from(FLAGS[command]), max_size=5)):
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:  # a switch
            argv.append(flag)
            continue
        values = st.one_of(flag_values, *([typed_values[action.type]] if action.type in typed_values else []),
                           *([st.sampled_from(list(action.choices))] if action.choices else []))
        if action.nargs in ("+", "*"):
            argv += [flag, *draw(st.lists(values, min_size=1, max_size=2))]
        else:
            argv.append(f"{flag}={draw(values)}")
    return argv


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=command_lines())
def test_command_lines_exit_0_or_2_with_an_error_line(argv, capsys):
    """No command starts its work here (stand-ins for the model load, bench's run and bench-ffn's measurement report
    a user error), so only the checks before it run: each line ends in an error line and status 2."""
    from flashu_compile.tools import bench, bench_ffn

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "load_model", _stand_in)
        patch.setattr(bench.cli, "run_bench", _stand_in)
        patch.setattr(bench_ffn, "run", _stand_in)
        code = cli.main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == 2 and "error: " in err, (argv, code, err)
