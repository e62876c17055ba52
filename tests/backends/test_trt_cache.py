"""Program keys and the engine cache folder, without TensorRT: structure and settings count, weight values never."""

import json

import pytest
import torch

from flashu_compile.backends.trt_cache import ENV_VAR, cache_key, default_root, engine_entries, graph_hash

SETTINGS = {"precision": "explicit", "compile": {"min_block_size": 1}}


class Block(torch.nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(width, width)
        self.register_buffer("scale", torch.full((width,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.proj(x)) * self.scale


def trace(module: torch.nn.Module, x: torch.Tensor, edit=None) -> str:
    """The hash of the graph dynamo hands a backend (parameters arrive as placeholders), taken inside
    the backend call as the lowering takes it; ``edit(gm)`` changes the graph first."""
    hashes = []

    def backend(gm, example_inputs):
        if edit is not None:
            edit(gm)
        hashes.append(graph_hash(gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module, backend=backend)(x)
    return hashes[0]


@pytest.fixture
def block():
    torch.manual_seed(0)
    return Block()


def test_weights_and_activations_do_not_change_the_hash(block):
    first = trace(block, torch.randn(4, 8))
    assert trace(block, torch.randn(4, 8)) == first
    with torch.no_grad():
        block.proj.weight[0, 0] += 1.0
    block.scale[3] = 1.0
    assert trace(block, torch.randn(4, 8)) == first  # identical layers share a program


def test_node_names_do_not_matter(block):
    def rename(gm):
        for i, node in enumerate(gm.graph.nodes):
            node.name = f"renamed_{i}"
        gm.recompile()

    assert trace(block, torch.randn(4, 8), rename) == trace(block, torch.randn(4, 8))


def test_shapes_and_ops_change_the_hash(block):
    base = trace(block, torch.randn(4, 8))
    assert trace(block, torch.randn(5, 8)) != base

    def to_silu(gm):
        next(n for n in gm.graph.nodes if n.target is torch.nn.functional.gelu).target = torch.nn.functional.silu

    assert trace(block, torch.randn(4, 8), to_silu) != base


def test_constants_on_the_graph_count_by_shape_not_value():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    before = graph_hash(gm, [torch.randn(2, 4)])
    with torch.no_grad():
        gm.weight[1, 2] += 1.0
    assert graph_hash(gm, [torch.randn(2, 4)]) == before
    assert graph_hash(torch.fx.symbolic_trace(torch.nn.Linear(4, 3)), [torch.randn(2, 4)]) != before


def test_wrong_number_of_inputs_is_named():
    with pytest.raises(ValueError, match="1 inputs for 2 placeholders"):
        graph_hash(torch.fx.symbolic_trace(lambda x, y: x + y), [torch.randn(1)])


def test_key_depends_on_graph_and_every_setting():
    key = cache_key("g", SETTINGS)
    assert key == cache_key("g", json.loads(json.dumps(SETTINGS)))
    assert key != cache_key("h", SETTINGS)
    assert key != cache_key("g", SETTINGS | {"compile": {"min_block_size": 2}})
    assert key != cache_key("g", SETTINGS | {"precision": "bf16"})


def test_cache_folder_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "a"))
    assert default_root() == tmp_path / "a"
    monkeypatch.delenv(ENV_VAR)
    assert default_root().parts[-3:] == (".cache", "flashu-compile", "trt")


def test_engine_entries_are_the_hash_folders(tmp_path):
    assert engine_entries(tmp_path / "missing") == set()
    (tmp_path / "abc").mkdir()
    (tmp_path / "abc" / "blob.bin").write_bytes(b"engine")
    (tmp_path / "timing_cache.bin").write_bytes(b"t")
    assert engine_entries(tmp_path) == {"abc"}
