"""The TensorRT engine cache without TensorRT: graph hashes, keys, atomic entries, damaged entries."""

import json

import pytest
import torch

from flashu_compile.backends.tensorrt import tensorrt_unavailable_reason
from flashu_compile.backends.trt_cache import ENV_VAR, EngineCache, cache_key, engine_cache, graph_hash

SETTINGS = {"compile": {"min_block_size": 1}, "tensorrt": "10.0"}


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


def test_same_graph_same_hash_across_traces_and_activations(block):
    first = trace(block, torch.randn(4, 8))
    assert trace(block, torch.randn(4, 8)) == first  # other activation values: same engine
    twin = Block()
    twin.load_state_dict(block.state_dict())
    assert trace(twin, torch.randn(4, 8)) == first


def test_node_names_do_not_matter(block):
    def rename(gm):
        for i, node in enumerate(gm.graph.nodes):
            node.name = f"renamed_{i}"
        gm.recompile()

    assert trace(block, torch.randn(4, 8), rename) == trace(block, torch.randn(4, 8))


def test_weights_buffers_shapes_and_ops_change_the_hash(block):
    base = trace(block, torch.randn(4, 8))
    with torch.no_grad():
        block.proj.weight[0, 0] += 1e-3
    changed_weight = trace(block, torch.randn(4, 8))
    block.scale[3] = 1.0
    changed_buffer = trace(block, torch.randn(4, 8))
    changed_shape = trace(block, torch.randn(5, 8))
    assert len({base, changed_weight, changed_buffer, changed_shape}) == 4

    def to_silu(gm):
        next(n for n in gm.graph.nodes if n.target is torch.nn.functional.gelu).target = torch.nn.functional.silu

    assert trace(block, torch.randn(5, 8), to_silu) != changed_shape


def test_constants_written_onto_the_graph_are_hashed_by_value():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    before = graph_hash(gm, [torch.randn(2, 4)])
    with torch.no_grad():
        gm.weight[1, 2] += 1.0  # a get_attr constant, as passes write pruned weights
    assert graph_hash(gm, [torch.randn(2, 4)]) != before


def test_key_depends_on_graph_and_every_setting():
    key = cache_key("g", SETTINGS)
    assert key == cache_key("g", json.loads(json.dumps(SETTINGS)))
    assert key != cache_key("h", SETTINGS)
    assert key != cache_key("g", SETTINGS | {"compile": {"min_block_size": 2}})
    assert key != cache_key("g", SETTINGS | {"gpu": "other"})


def test_put_then_get(tmp_path):
    cache = EngineCache(tmp_path / "trt")
    assert cache.get("k") is None
    path = cache.put("k", lambda p: p.write_bytes(b"engine"), {"graph": "g"})
    assert cache.get("k") == path and path.read_bytes() == b"engine"
    assert cache.entries()["k"]["graph"] == "g" and cache.used == ["k", "k"]
    assert sorted(p.name for p in (tmp_path / "trt").iterdir()) == ["k.ep", "k.json"]


def test_failed_write_leaves_nothing_behind(tmp_path):
    cache = EngineCache(tmp_path)

    def crash(path):
        path.write_bytes(b"half an eng")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cache.put("k", crash, {})
    assert list(tmp_path.iterdir()) == [] and cache.get("k") is None


def test_rewrite_replaces_an_entry_whole(tmp_path):
    cache = EngineCache(tmp_path)
    cache.put("k", lambda p: p.write_bytes(b"old"), {})
    cache.put("k", lambda p: p.write_bytes(b"new engine"), {})
    assert cache.get("k").read_bytes() == b"new engine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.ep", "k.json"]


def test_damaged_entries_are_discarded_with_a_warning(tmp_path):
    cache = EngineCache(tmp_path)
    cache.put("k", lambda p: p.write_bytes(b"engine"), {})
    cache.payload("k").write_bytes(b"engin3")
    with pytest.warns(UserWarning, match="TensorRT cache entry k .* discarded and will be rebuilt: .*checksum"):
        assert cache.get("k") is None
    assert list(tmp_path.iterdir()) == []

    cache.put("m", lambda p: p.write_bytes(b"engine"), {})
    (tmp_path / "m.json").write_text("{not json")
    with pytest.warns(UserWarning, match="TensorRT cache entry m"):
        assert cache.get("m") is None
    cache.put("m", lambda p: p.write_bytes(b"engine"), {})  # rebuilt
    assert cache.get("m").read_bytes() == b"engine"


def test_payload_without_metadata_is_not_an_entry(tmp_path):
    cache = EngineCache(tmp_path)
    cache.payload("k").write_bytes(b"engine")  # a writer that died before its metadata
    assert cache.get("k") is None and cache.entries() == {}


def test_cache_folder_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "a"))
    assert engine_cache().root == tmp_path / "a" and engine_cache() is engine_cache()
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "b"))
    assert engine_cache().root == tmp_path / "b"
    monkeypatch.delenv(ENV_VAR)
    assert engine_cache().root.parts[-3:] == (".cache", "flashu-compile", "trt")


@pytest.mark.skipif(tensorrt_unavailable_reason() is not None,
                    reason=f"TensorRT lowering not runnable here: {tensorrt_unavailable_reason()}")
def test_second_lowering_loads_the_cached_engine(tmp_path):
    from flashu_compile.backends.tensorrt import lower_tensorrt

    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).cuda().eval()
    x = torch.randn(4, 8, device="cuda")
    torch._dynamo.reset()
    gm = torch.fx.symbolic_trace(module)
    inputs = [x]
    cache = EngineCache(tmp_path)
    built = lower_tensorrt(gm, inputs, cache)
    assert len(cache.entries()) == 1 and cache.used == [next(iter(cache.entries()))]
    loaded = lower_tensorrt(gm, inputs, cache)
    assert cache.used == cache.used[:1] * 2  # the second lowering read the entry the first wrote
    torch.testing.assert_close(loaded(*inputs), built(*inputs))
