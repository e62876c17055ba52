import numpy as np
import pytest

from flashu_compile.options import FlashUOptions
from flashu_compile.runtime.schedule import RelativeSchedule


def test_presets():
    assert FlashUOptions.from_dict(None).passes == ()
    paper = FlashUOptions.from_dict({"preset": "paper"})
    assert paper.passes == ("prune_channels", "token_drop", "layer_skip", "head_cache")
    assert paper.token_drop_layer == 2 and paper.token_drop_ratio == 0.5 and paper.token_drop_order == "highest"
    assert paper.skip_ratio == 0.2 and paper.skip_interval == 10 and paper.cache_interval == 5
    assert paper.cache_interval == 5 and paper.hybrid_tau == 11
    assert paper.guidance_schedule == RelativeSchedule(((0.7, 0.75), (0.3, 1.0)))  # 0.75 s0, then s0 (the paper)
    ref = FlashUOptions.from_dict({"preset": "flashu-reference", "lowering": "eager"})
    assert ref.step_semantics == "flashu-reference" and ref.lowering == "eager" and "token_drop" not in ref.passes


@pytest.mark.parametrize(
    "options, message",
    [
        ({"prune_rato": 0.1}, r"unknown flashu option\(s\) \['prune_rato'\]; valid options: \["),
        ({"preset": "turbo"}, r"option 'preset' must be one of \['off', 'paper', 'flashu-reference', 'fast'\]"),
        ({"lowering": "xla"}, r"option 'lowering' must be one of \['inductor', 'eager', 'tensorrt'\], got 'xla'"),
        ({"task": "video"}, r"option 'task' must be one of"),
        ({"passes": ["prune_channels", "magic"]}, r"option 'passes' must be one of .* got 'magic'"),
        ({"passes": "layer_skip"}, r"option 'passes' must be a list of pass names"),
        ({"passes": ["layer_skip", "prefix_cache"]}, r"option 'passes': prefix_cache does not compose with layer_skip"),
        ({"skip_ratio": 1.0}, r"option 'skip_ratio' must be in \[0, 1\), got 1.0"),
        ({"prune_ratio": 0.3}, r"unknown flashu option\(s\) \['prune_ratio'\]"),  # the plan holds what is pruned
        ({"token_drop_ratio": -0.1}, r"option 'token_drop_ratio' must be in \[0, 1\)"),
        ({"skip_interval": 0}, r"option 'skip_interval' must be an int >= 1, got 0"),
        ({"decode_graphs": -1}, r"option 'decode_graphs' must be an int >= 0, got -1"),
        ({"cache_interval": 2.5}, r"option 'cache_interval' must be an int, got float 2.5"),
        ({"hybrid_tau": True}, r"option 'hybrid_tau' must be an int, got bool"),
        ({"skip_ratio": "0.2"}, r"option 'skip_ratio' must be a number, got str"),
        ({"strict": 1}, r"option 'strict' must be a bool"),
        ({"guidance_schedule": [(0, 7.5)]}, r"option 'guidance_schedule'\[0\] steps must be an int >= 1, got 0"),
        ({"guidance_schedule": ["x"]}, r"option 'guidance_schedule'\[0\] must be a \(steps, scale\) pair"),
        # Non-finite scales and steps that are not ints are errors, never coerced (issue 26).
        ({"guidance_schedule": [(24, float("nan"))]}, r"'guidance_schedule'\[0\] scale must be a finite number"),
        ({"guidance_schedule": [(24, 7.5), (11, float("inf"))]}, r"\[1\] scale must be a finite number, got inf"),
        ({"guidance_schedule": [(2.7, 7.5)]}, r"'guidance_schedule'\[0\] steps must be an int, got float 2.7"),
        ({"guidance_schedule": [(True, 7.5)]}, r"'guidance_schedule'\[0\] steps must be an int, got bool True"),
        ({"guidance_schedule": [("3", 7.5)]}, r"'guidance_schedule'\[0\] steps must be an int, got str '3'"),
        ({"guidance_schedule": []}, r"option 'guidance_schedule' must be None or a non-empty list"),
        ({"skip_ratio": float("nan")}, r"option 'skip_ratio' must be a finite number, got nan"),
        ({"passes": None}, r"option 'passes' must be a list of pass names .* got NoneType None"),
        ({"passes": ["layer_skip", 3]}, r"option 'passes' must be a list of pass names"),
        ({"layer_skip": 1, 2: "x"}, r"unknown flashu option\(s\) \['layer_skip', 2\]"),
        ({"lowering": ["eager"]}, r"option 'lowering' must be a str, got list"),
        ({"token_drop_order": "random"}, r"option 'token_drop_order' must be one of \['highest', 'lowest'\]"),
    ],
)
def test_bad_options_name_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        FlashUOptions.from_dict(options)


def test_ints_are_accepted_for_floats():
    assert FlashUOptions.from_dict({"skip_ratio": 0}).skip_ratio == 0.0


def test_numpy_scalars_are_numbers():
    opts = FlashUOptions.from_dict({"hybrid_tau": np.int64(3), "skip_ratio": np.float32(0.25),
                                    "guidance_schedule": [(np.int32(4), np.float64(2.0))]})
    assert (opts.hybrid_tau, opts.skip_ratio, opts.guidance_schedule) == (3, 0.25, ((4, 2.0),))
    assert type(opts.hybrid_tau) is int and type(opts.guidance_schedule[0][0]) is int


def test_direct_construction_is_checked_like_a_dict():
    with pytest.raises(ValueError, match="option 'hybrid_tau' must be an int, got float 2.5"):
        FlashUOptions(hybrid_tau=2.5)
    with pytest.raises(ValueError, match="option 'passes' must be a list"):
        FlashUOptions(passes=None)
