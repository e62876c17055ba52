import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from flashu_compile.models.showo2 import FlowHeadConfig, Showo2, preset
from flashu_compile.models.showo2.modeling import unpatchify
from flashu_compile.models.showo2.modules import gated, llama3_inv_freq, modulate


def meta_model(name):
    with torch.device("meta"):
        return Showo2(preset(name))


@pytest.mark.parametrize(
    "name, width, ffn, llm_params, total",
    [("showo2-1.5b", 1536, 8960, 1.54e9, 2.83e9), ("showo2-7b", 3584, 18944, 7.61e9, 8.9e9)],
)
def test_official_presets_have_official_shapes(name, width, ffn, llm_params, total):
    model = meta_model(name)
    sd = model.state_dict()
    assert sd["showo.model.embed_tokens.weight"].shape == (151669, width)
    assert sd["showo.model.layers.27.mlp.gate_proj.weight"].shape == (ffn, width)
    assert "showo.model.layers.28.mlp.gate_proj.weight" not in sd
    assert sd["image_embedder_und.proj.weight"].shape == (1152, 16, 2, 2)
    assert sd["image_embedder_gen.proj.weight"].shape == (width, 16, 2, 2)
    assert sd["position_embedding.weight"].shape == (729, 1152)
    assert "und_trans.layers.25.mlp.fc1.weight" in sd and "und_trans.layers.26.mlp.fc1.weight" not in sd
    assert sd["und_trans.layers.0.mlp.fc1.weight"].shape == (4304, 1152)
    assert sd["fusion_proj.1.weight"].shape == (width, 1152 + width)
    assert sd["time_embed.mlp.0.weight"].shape == (2048, 256)
    assert sd["time_embed_proj.weight"].shape == (width, 2048)
    assert sd["diff_proj.0.weight"].shape == (2048, width)
    assert sd["diffusion_head_a.9.self_attn.q_proj.weight"].shape == (32 * 64, 2048)
    assert sd["diffusion_head_a.9.self_attn.k_proj.weight"].shape == (8 * 64, 2048)
    assert sd["diffusion_head_a.9.self_attn.q_norm.weight"].shape == (64,)
    assert sd["diffusion_head_a.9.mlp.up_proj.weight"].shape == (8192, 2048)
    assert sd["diffusion_head_a.9.adaLN_modulation.1.weight"].shape == (6 * 2048, 2048)
    assert "diffusion_head_a.10.mlp.up_proj.weight" not in sd
    assert sd["diffusion_head_b.adaLN_modulation.1.weight"].shape == (2 * 2048, 2048)
    assert sd["diffusion_head_b.linear.weight"].shape == (64, 2048)
    assert abs(sum(p.numel() for p in model.showo.parameters()) - llm_params) / llm_params < 0.01
    assert abs(sum(p.numel() for p in model.parameters()) - total) / total < 0.01
    # Non-persistent buffers are not part of the checkpoint layout.
    assert not any("inv_freq" in k or "position_ids" in k for k in sd)


def test_tiny_preset_runs_and_shapes(tokenizer):
    cfg = preset("tiny")
    assert cfg.hidden_size != cfg.flow_head.hidden_size  # exercises diff_proj and time_embed_proj
    model = Showo2.random(cfg, seed=0)
    assert model.config.num_image_tokens == 64 and model.config.latent_size == (16, 16)
    sd = model.state_dict()
    assert sd["diffusion_head_a.1.self_attn.k_proj.weight"].shape == (2 * 24, 96)


def test_random_init_is_seeded_and_independent_of_global_rng():
    cfg = preset("tiny")
    torch.manual_seed(123)
    a = Showo2.random(cfg, seed=5).state_dict()
    torch.manual_seed(999)
    b = Showo2.random(cfg, seed=5).state_dict()
    c = Showo2.random(cfg, seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["diffusion_head_b.linear.weight"], c["diffusion_head_b.linear.weight"])


def test_unpatchify_matches_hand_computed_example():
    # grid 1x2, patch 2, 2 channels: token k carries values [p0c0, p0c1, p1c0, p1c1, p2c0, ...].
    x = torch.arange(16.0).reshape(1, 2, 8)
    out = unpatchify(x, 1, 2, 2, 2)
    assert out.shape == (1, 2, 2, 4)
    # The official reshape (no permute) lays the 8 (pixel, channel) pairs of each token out
    # row-major over the flattened H*W plane, channel fastest.
    expected_c0 = torch.tensor([[0.0, 2, 4, 6], [8, 10, 12, 14]])
    expected_c1 = expected_c0 + 1
    assert torch.equal(out[0, 0], expected_c0) and torch.equal(out[0, 1], expected_c1)


def test_flow_head_rope_matches_transformers_llama3():
    head = FlowHeadConfig()
    cfg = LlamaConfig(head_dim=64, hidden_size=2048, num_attention_heads=32, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    reference, scaling = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert scaling == 1.0
    torch.testing.assert_close(llama3_inv_freq(head), reference.float(), rtol=1e-6, atol=0)


def test_modulation_is_identity_outside_image_spans():
    x = torch.randn(2, 5, 8)
    shift, scale, gate = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8)
    span = torch.zeros(2, 5, 1, dtype=torch.bool)
    span[0, 1:3] = True
    out = modulate(x, shift, scale, span)
    assert torch.equal(out[:, 3:], x[:, 3:]) and torch.equal(out[1], x[1])
    torch.testing.assert_close(out[0, 1:3], x[0, 1:3] * (1 + scale[0]) + shift[0])
    update = torch.randn(2, 5, 8)
    res = gated(x, update, gate, span)
    torch.testing.assert_close(res[0, 1], x[0, 1] + gate[0] * update[0, 1])
    assert torch.equal(res[1], x[1] + update[1])
