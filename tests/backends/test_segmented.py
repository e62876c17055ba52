"""Which symbols a piece cut from a symbolic-size graph must be handed explicitly."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from flashu_compile.backends.segmented import unbound_symbols


def _fake(mode: FakeTensorMode, shape: tuple[int, ...], dynamic: int) -> torch.Tensor:
    sizes = [DimDynamic.DYNAMIC if d == dynamic else DimDynamic.STATIC for d in range(len(shape))]
    return mode.from_tensor(torch.empty(shape), symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))


def test_a_symbol_seen_only_inside_a_size_is_recovered_from_that_size():
    mode = FakeTensorMode(shape_env=ShapeEnv())
    cache = _fake(mode, (1, 2, 5, 8), dynamic=2)
    with mode:
        grown = torch.cat([cache, torch.empty(1, 2, 1, 8)], dim=2)  # the cache after one decode step: s0 + 1
        twice = torch.cat([grown, grown], dim=2)  # 2 * s0 + 2: not of the form s0 + offset
    assert unbound_symbols([torch.empty(3), grown]) == [(1, 2, 1)]
    assert unbound_symbols([twice, grown]) == [(1, 2, 1)]
    # Bound already: the symbol is a bare size of another input, or a SymInt input.
    assert unbound_symbols([grown, cache]) == []
    assert unbound_symbols([grown, cache.shape[2]]) == []
    # Not recoverable from any size: left for the lowering to reject (and the caller to fall back).
    assert unbound_symbols([twice]) == []
