"""Within a process, Inductor compiles each piece structure once (``inductor._structure_key``).

Inductor itself is replaced by a recorder here: what is under test is which pieces reach it.
"""

import gc
import weakref

import pytest
import torch
import torch.fx

from flashu_compile.backends import inductor
from flashu_compile.graph.compat import FakeTensorMode, ShapeEnv


@pytest.fixture
def compiles(monkeypatch):
    """A mark per graph handed to Inductor (not the graph: that would keep it alive); the "compiled" function is
    the graph itself."""
    seen = []

    def compile_fx(gm, example_inputs, config_patches=None):
        seen.append(type(gm).__name__)
        return gm

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", compile_fx)
    monkeypatch.setattr(inductor, "_compiled_pieces", weakref.WeakValueDictionary())
    return seen


class Layer(torch.nn.Module):
    def forward(self, x, weight):
        return torch.relu(x @ weight) + x


def _layer(name: str) -> torch.fx.GraphModule:
    gm = torch.fx.symbolic_trace(Layer())
    for node in gm.graph.nodes:  # outlined layers differ in their node names
        node.name = f"{name}_{node.name}"
    gm.recompile()
    return gm


def test_layers_differing_in_names_and_weights_share_one_compile(compiles):
    x = torch.randn(2, 4)
    weights = [torch.randn(4, 4) for _ in range(3)]
    fns = [inductor.lower_inductor(_layer(f"layer{i}"), [x, w]) for i, w in enumerate(weights)]
    assert len(compiles) == 1
    for fn, w in zip(fns, weights, strict=True):
        torch.testing.assert_close(fn(x, w), torch.relu(x @ w) + x)


def test_a_piece_compiled_under_other_global_settings_compiles_again(compiles):
    x, w = torch.randn(4, 4), torch.randn(4, 4)
    first = inductor.lower_inductor(_layer("a"), [x, w])
    with torch.no_grad():
        inductor.lower_inductor(_layer("b"), [x, w])
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        inductor.lower_inductor(_layer("c"), [x, w])
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert len(compiles) == 3 and first is not None


@pytest.mark.parametrize("other", ["shape", "dtype", "stride", "alignment", "aliasing", "op"])
def test_a_piece_differing_in_what_inductor_reads_compiles_again(compiles, other):
    x, w = torch.randn(4, 4), torch.randn(4, 4)
    first = inductor.lower_inductor(_layer("a"), [x, w])  # held: only pieces a live program uses are shared
    gm = _layer("b")
    inputs = {"shape": [torch.randn(3, 4), w], "dtype": [x.double(), w.double()], "stride": [x, w.t()],
              "alignment": [torch.randn(17)[1:].view(4, 4), w], "aliasing": [x, x[0:4]], "op": [x, w]}[other]
    if other == "op":
        next(n for n in gm.graph.nodes if n.target is torch.relu).target = torch.tanh
        gm.recompile()
    inductor.lower_inductor(gm, inputs)
    assert len(compiles) == 2 and first is not None
    inductor.lower_inductor(_layer("c"), [x, w])
    assert len(compiles) == 2  # the first one's structure again


def test_views_at_other_aligned_offsets_share_a_piece(compiles):
    """Compiled code reads an input from its data pointer, offset included: a pruned FFN reads a range of its
    weight that starts elsewhere in every layer."""
    x, weights = torch.randn(4, 4), torch.randn(3, 8, 4)
    fns = [inductor.lower_inductor(_layer(f"layer{i}"), [x, w.narrow(0, 4 * i % 8, 4)]) for i, w in enumerate(weights)]
    assert len(compiles) == 1
    for i, (fn, w) in enumerate(zip(fns, weights, strict=True)):
        view = w.narrow(0, 4 * i % 8, 4)
        torch.testing.assert_close(fn(x, view), torch.relu(x @ view) + x)


def test_a_piece_with_constants_of_its_own_is_never_shared(compiles):
    x = torch.randn(2, 4)
    linear = torch.nn.Linear(4, 4)
    # its weight is a get_attr, compiled in
    fns = [inductor.lower_inductor(torch.fx.symbolic_trace(linear), [x]) for _ in range(2)]
    assert len(compiles) == 2 and len(fns) == 2


def test_symbolic_pieces_are_shared_only_within_one_trace(compiles):
    """A piece compiled for symbolic sizes leaves guards in its trace's shape environment."""
    def fakes(mode):
        from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

        context = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
        return [mode.from_tensor(torch.randn(3, 4), symbolic_context=context), mode.from_tensor(torch.randn(4, 4))]

    one, other = FakeTensorMode(shape_env=ShapeEnv()), FakeTensorMode(shape_env=ShapeEnv())
    first = fakes(one)
    fns = [inductor.lower_inductor(_layer("a"), first), inductor.lower_inductor(_layer("b"), first)]
    assert len(compiles) == 1
    fns.append(inductor.lower_inductor(_layer("c"), fakes(other)))
    assert len(compiles) == 2


def _two_symbols(ranges=((2, 64), (2, 64))):
    """Inputs of two pieces in one trace: each piece's rows are a size symbol of its own (as each decoder layer's
    cache length is in a decode step), the weight static."""
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())
    context = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
    xs = [mode.from_tensor(torch.randn(n, 4), symbolic_context=context) for n in (3, 5)]
    for x, (low, high) in zip(xs, ranges, strict=True):
        mode.shape_env.constrain_symbol_range(x.shape[0].node.expr, low, high)
    w = mode.from_tensor(torch.randn(4, 4))
    assert x.shape[0].node.expr != xs[0].shape[0].node.expr
    return mode.shape_env, [xs[0], w], [xs[1], w]


def test_pieces_whose_sizes_are_other_symbols_of_one_trace_share(compiles):
    _, first, second = _two_symbols()
    fns = [inductor.lower_inductor(_layer("a"), first), inductor.lower_inductor(_layer("b"), second)]
    assert len(compiles) == 1 and fns[0] is fns[1]
    _, first, second = _two_symbols(ranges=((2, 64), (2, 128)))  # a symbol of another range is another input
    fns = [inductor.lower_inductor(_layer("a"), first), inductor.lower_inductor(_layer("b"), second)]
    assert len(compiles) == 3


def test_a_piece_whose_compile_assumed_something_of_its_symbols_serves_only_those(compiles, monkeypatch):
    """Compiling the first piece guarded its rows (as Inductor may, choosing code by a size): the guard holds for
    its own symbol only, so a piece with another symbol compiles for itself."""
    def compile_fx(gm, example_inputs, config_patches=None):
        compiles.append(type(gm).__name__)
        assert example_inputs[0].shape[0] <= 16  # a guard on this piece's row count
        return gm

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", compile_fx)
    shape_env, first, second = _two_symbols()
    guards = len(shape_env.guards)
    fns = [inductor.lower_inductor(_layer("a"), first), inductor.lower_inductor(_layer("b"), first)]
    assert len(compiles) == 1 and len(shape_env.guards) > guards  # the same symbols: shared
    fns.append(inductor.lower_inductor(_layer("c"), second))
    assert len(compiles) == 2 and fns[2] is not fns[0]


def test_pieces_are_shared_among_live_programs_until_forgotten(compiles):
    x, w = torch.randn(2, 4), torch.randn(4, 4)
    fn = inductor.lower_inductor(_layer("a"), [x, w])
    inductor.forget_compiled_pieces()  # as a new process starts
    inductor.lower_inductor(_layer("b"), [x, w])
    assert len(compiles) == 2
    del fn
    gc.collect()  # the other one is gone too: nothing holds a piece no program uses
    inductor.lower_inductor(_layer("c"), [x, w])
    assert len(compiles) == 3
