"""inline_call: a call of a submodule made part of the graph that calls it."""

import torch
import torch.fx

from flashu_compile.graph.rewrite import inline_call


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([2.0, 3.0]))
        self.inner = torch.nn.Linear(2, 2)

    def forward(self, x, y):
        return self.inner(x) * self.scale, x + y


class _Outer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Block()

    def forward(self, x, y):
        a, b = self.block(x, y)
        return a - b


class _BlockAsLeaf(torch.fx.Tracer):
    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, _Block) or super().is_leaf_module(m, qualname)


def test_an_inlined_call_computes_what_the_call_did_with_the_attributes_it_reads():
    # The block traced as a graph of its own (its Linear kept as a module call), called from the outer graph.
    module = _Outer()
    outer = torch.fx.GraphModule(module, _BlockAsLeaf().trace(module))
    outer.block = torch.fx.symbolic_trace(module.block)
    block = outer.block
    (call,) = [n for n in outer.graph.nodes if n.op == "call_module"]
    x, y = torch.randn(4, 2), torch.randn(4, 2)
    want = outer(x, y)

    with outer.graph.inserting_before(call):
        value = inline_call(outer, block, call.args, "block")
    for item in list(call.users):  # the tuple output, read through getitems
        item.replace_all_uses_with(value[item.args[1]])
        outer.graph.erase_node(item)
    outer.graph.erase_node(call)
    outer.delete_all_unused_submodules()
    outer.graph.lint()
    outer.recompile()

    assert not hasattr(outer, "block")
    # The parameter and the nested module the block read now belong to the outer graph, under the prefix.
    assert {n.target for n in outer.graph.nodes if n.op in ("get_attr", "call_module")} == {"block_scale",
                                                                                             "block_inner"}
    torch.testing.assert_close(outer(x, y), want, rtol=0, atol=0)
