import pytest

from flashu_compile.options import FlashUOptions


def test_presets():
    assert FlashUOptions.from_dict(None).passes == ()
    paper = FlashUOptions.from_dict({"preset": "paper"})
    assert paper.passes == ("prune_channels", "token_drop", "layer_skip", "head_cache")
    assert paper.token_drop_layer == 2 and paper.token_drop_ratio == 0.5 and paper.token_drop_order == "highest"
    assert paper.prune_ratio == 0.2 and paper.skip_interval == 10
    assert paper.cache_interval == 5 and paper.hybrid_tau == 11 and paper.guidance_schedule == ((24, 7.5), (11, 10.0))
    ref = FlashUOptions.from_dict({"preset": "flashu-reference", "lowering": "eager"})
    assert ref.step_semantics == "flashu-reference" and ref.lowering == "eager" and "token_drop" not in ref.passes


@pytest.mark.parametrize(
    "options, message",
    [
        ({"prune_rato": 0.1}, r"unknown flashu option\(s\) \['prune_rato'\]; valid options: \["),
        ({"preset": "fast"}, r"option 'preset' must be one of \['off', 'paper', 'flashu-reference'\]"),
        ({"lowering": "xla"}, r"option 'lowering' must be one of \['inductor', 'eager', 'tensorrt'\], got 'xla'"),
        ({"task": "video"}, r"option 'task' must be one of"),
        ({"passes": ["prune_channels", "magic"]}, r"option 'passes' must be one of .* got 'magic'"),
        ({"passes": "layer_skip"}, r"option 'passes' must be a list of pass names"),
        ({"passes": ["layer_skip", "prefix_cache"]}, r"option 'passes': prefix_cache does not compose with layer_skip"),
        ({"prune_ratio": 1.0}, r"option 'prune_ratio' must be in \[0, 1\), got 1.0"),
        ({"token_drop_ratio": -0.1}, r"option 'token_drop_ratio' must be in \[0, 1\)"),
        ({"skip_interval": 0}, r"option 'skip_interval' must be >= 1, got 0"),
        ({"decode_graphs": -1}, r"option 'decode_graphs' must be >= 0, got -1"),
        ({"cache_interval": 2.5}, r"option 'cache_interval' must be an int, got float 2.5"),
        ({"hybrid_tau": True}, r"option 'hybrid_tau' must be an int, got bool"),
        ({"skip_ratio": "0.2"}, r"option 'skip_ratio' must be a float, got str"),
        ({"strict": 1}, r"option 'strict' must be a bool"),
        ({"guidance_schedule": [(0, 7.5)]}, r"option 'guidance_schedule' needs \(steps >= 1, scale >= 0\)"),
        ({"guidance_schedule": ["x"]}, r"option 'guidance_schedule' must be a list of \(steps, scale\) pairs"),
        ({"token_drop_order": "random"}, r"option 'token_drop_order' must be one of \['highest', 'lowest'\]"),
    ],
)
def test_bad_options_name_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        FlashUOptions.from_dict(options)


def test_ints_are_accepted_for_floats():
    assert FlashUOptions.from_dict({"prune_ratio": 0}).prune_ratio == 0.0
