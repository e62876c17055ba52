import pytest
import torch
from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

from flashu_compile.graph import build_index
from tests.models.test_compile_friendly import t2i_inputs


def capture(fn, *args):
    """The dynamo graph and its example inputs (real parameter values) for one call."""
    got = []

    def backend(gm, example_inputs):
        got.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend, fullgraph=True)(*args)
    assert len(got) == 1
    return got[0]


def check_chain(layers):
    # The residual stream leaving one block is the one entering the next.
    for a, b in zip(layers, layers[1:], strict=False):
        assert a.output is b.input


def test_showo2_layers_and_flow_head(small_model, tokenizer):
    gm, inputs = capture(small_model.denoise, *t2i_inputs(small_model, tokenizer))
    index = build_index(gm, inputs)
    assert index.applicable, index.report()
    assert [layer.path for layer in index.layers] == ["showo.model.layers.0", "showo.model.layers.1"]
    assert [block.path for block in index.head_blocks] == ["diffusion_head_a.0", "diffusion_head_a.1"]
    assert index.layers[0].intermediate_size == 64 and index.head_blocks[0].intermediate_size == 96
    down = index.layers[1].mlp["down_proj"]
    assert torch.equal(down.weight_value, small_model.showo.model.layers[1].mlp.down_proj.weight)
    q = index.head_blocks[0].attention["q_proj"]
    assert torch.equal(q.weight_value, small_model.diffusion_head_a[0].self_attn.q_proj.weight)
    check_chain(index.layers)
    check_chain(index.head_blocks)
    # SigLIP layers (fc1/fc2) share the "layers.N" naming but are not indexed as decoder layers.
    assert not any("und_trans" in layer.path for layer in index.layers)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_plain_decoders(arch):
    common = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2)
    model = (Qwen2Model(Qwen2Config(**common)) if arch == "qwen2" else LlamaModel(LlamaConfig(**common))).eval()
    ids = torch.randint(0, 50, (2, 7))
    gm, inputs = capture(lambda x: model(input_ids=x).last_hidden_state, ids)
    index = build_index(gm, inputs)
    assert index.applicable, index.report()
    assert [layer.index for layer in index.layers] == [0, 1, 2] and not index.head_blocks
    assert all(layer.intermediate_size == 48 for layer in index.layers)
    assert torch.equal(index.layers[2].mlp["gate_proj"].weight_value, model.layers[2].mlp.gate_proj.weight)
    check_chain(index.layers)


def test_graph_without_decoder_layers_is_not_applicable():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    gm, inputs = capture(model, torch.randn(2, 4))
    index = build_index(gm, inputs)
    assert not index.applicable
    assert index.report().startswith("not applicable: no decoder layer")


def test_non_swiglu_mlp_is_reported_not_guessed():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            return self.o_proj(self.q_proj(x) + self.k_proj(x) + self.v_proj(x))

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):  # gate and up in series, not in parallel: not a SwiGLU
            return self.down_proj(self.up_proj(torch.relu(self.gate_proj(x))))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn, self.mlp = Attn(), Mlp()

        def forward(self, x):
            x = x + self.self_attn(x)
            return x + self.mlp(x)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block()])

        def forward(self, x):
            return self.layers[0](x)

    gm, inputs = capture(Net(), torch.randn(2, 3, 8))
    index = build_index(gm, inputs)
    assert not index.applicable
    assert "layers.0.mlp is not a SwiGLU" in index.report()


class Rotate(torch.nn.Module):
    def forward(self, q, k):
        return q * 2, k.flip(-1)


# A module-level instance the attention calls, as transformers does with a hub kernel's function module when
# `kernels` is installed: dynamo records it in the stack as G['ROTATE'], inside the attention that called it.
ROTATE = Rotate()


class SwiGLUBlock(torch.nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.self_attn, self.mlp = torch.nn.Module(), torch.nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, torch.nn.Linear(width, width))
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self.mlp, name, torch.nn.Linear(width, width))

    def forward(self, x):
        a = self.self_attn
        q, k = ROTATE(a.q_proj(x), a.k_proj(x))
        x = x + a.o_proj(q + k + a.v_proj(x))
        m = self.mlp
        return x + m.down_proj(torch.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([SwiGLUBlock(), SwiGLUBlock()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


GLOBAL_NET = TwoLayers()


@pytest.mark.parametrize("root", ["local", "global"])
def test_calls_into_a_global_wrapper_belong_to_the_layer_that_made_them(root):
    from flashu_compile.graph.outline import region_cycle
    from flashu_compile.graph.structure import module_path

    net = TwoLayers() if root == "local" else GLOBAL_NET
    gm, inputs = capture(net if root == "local" else lambda x: GLOBAL_NET(x), torch.randn(2, 3, 8))
    flips = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "flip"]
    assert len(flips) == 2
    assert any("ROTATE" in path for path, _ in flips[0].meta["nn_module_stack"].values())
    assert [module_path(n) for n in flips] == ["layers.0", "layers.1"]
    index = build_index(gm, inputs)
    assert index.applicable, index.report()
    assert [layer.path for layer in index.layers] == ["layers.0", "layers.1"]
    check_chain(index.layers)
    for layer, flip in zip(index.layers, flips, strict=True):
        assert flip in layer.nodes and region_cycle(layer.nodes) is None
