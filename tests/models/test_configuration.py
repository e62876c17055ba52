"""Showo2Config: a bad value names its key instead of loading or failing later in a model's layers."""

import copy

import pytest

from flashu_compile.models.showo2.configuration import preset


@pytest.mark.parametrize("key, value, message", [
    ("max_text_len", -5, "max_text_len must be an int >= 1, got -5"),  # used to load
    ("image_latent_height", "8", "image_latent_height must be an int, got str '8'"),
    ("num_diffusion_layers", 2.0, "num_diffusion_layers must be an int, got float"),
    ("latent_codec", 2, "latent_codec must be a str"),
])
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny").replace(**{key: value})


def test_sub_config_dimensions_name_their_key():
    config = preset("tiny")
    llm = copy.deepcopy(config.llm)
    llm.num_key_value_heads = 3
    with pytest.raises(ValueError, match=r"llm.num_attention_heads \(4\) must be a multiple of llm.num_key_value"):
        config.replace(llm=llm)
    vision = copy.deepcopy(config.vision)
    vision.hidden_size = 50
    with pytest.raises(ValueError, match=r"vision.hidden_size \(50\) must be a multiple of vision.num_attention_heads"):
        config.replace(vision=vision)


@pytest.mark.parametrize("name", ["tiny", "bench", "showo2-1.5b", "showo2-7b"])
def test_presets_pass_the_checks(name):
    assert preset(name).max_text_len >= 1
