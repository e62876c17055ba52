import pytest
import torch

from flashu_compile.graph.outline import outline, region_cycle
from flashu_compile.graph.rewrite import PassNotApplicable


def passthrough(cid, block, *inputs):
    return block(*inputs)


def traced():
    class M(torch.nn.Module):
        def forward(self, x):
            a = torch.relu(x)
            b = a + 1  # outside the regions below: computed from a, read by c
            c = a * b
            return torch.sin(c)

    gm = torch.fx.symbolic_trace(M())
    return gm, {n.name: n for n in gm.graph.nodes}


def test_region_that_a_path_leaves_and_reenters_is_refused_before_any_change():
    gm, nodes = traced()
    code = gm.code
    assert region_cycle([nodes["relu"], nodes["mul"]]) == (nodes["add"], nodes["mul"])
    with pytest.raises(PassNotApplicable, match="region r is not convex: add depends on the region and feeds its "
                                                "node mul"):
        outline(gm, [nodes["relu"], nodes["mul"]], "r", passthrough, (0,), "test")
    assert gm.code == code and not hasattr(gm, "r")


def test_convex_region_is_outlined_and_computes_the_same():
    gm, nodes = traced()
    x = torch.randn(6)
    expected = gm(x)
    region = [nodes["relu"], nodes["add"], nodes["mul"]]
    assert region_cycle(region) is None and region_cycle([nodes["sin"]]) is None
    outline(gm, region, "r", passthrough, (0,), "test")
    gm.recompile()  # the caller's part, once it is done rewriting
    assert isinstance(gm.r, torch.fx.GraphModule)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [passthrough, torch.sin]
    torch.testing.assert_close(gm(x), expected)
