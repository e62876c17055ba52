import pytest
import torch

from flashu_compile.passes.manager import PROVENANCE_KEY, PassManager, PassNotApplicable, PassResult, tag


def relu_to_gelu(gm, index, options):
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.relu:
            with gm.graph.inserting_after(node):
                new = tag(gm.graph.call_function(torch.nn.functional.gelu, node.args), "relu_to_gelu", node.name)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            count += 1
    return PassResult(count > 0, {"replaced": count})


def never_applies(gm, index, options):
    raise PassNotApplicable("no decoder layers found")


def traced():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    return torch.fx.symbolic_trace(M())


def test_provenance_stats_and_dumps(tmp_path):
    gm = traced()
    manager = PassManager([("relu_to_gelu", relu_to_gelu)], dump_dir=str(tmp_path))
    out = manager.run(gm, None, None)
    x = torch.randn(5)
    torch.testing.assert_close(out(x), torch.nn.functional.gelu(x) * 2)
    made = [n for n in out.graph.nodes if PROVENANCE_KEY in n.meta]
    assert len(made) == 1 and made[0].meta[PROVENANCE_KEY] == {"pass": "relu_to_gelu", "replaces": "relu"}
    record = manager.records[0]
    assert record.changed and record.stats == {"replaced": 1} and record.seconds >= 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_relu_to_gelu_after.txt", "00_relu_to_gelu_before.txt"]
    assert "relu" in (tmp_path / "00_relu_to_gelu_before.txt").read_text()
    assert "gelu" in (tmp_path / "00_relu_to_gelu_after.txt").read_text()


def test_not_applicable_warns_or_raises_in_strict_mode():
    gm = traced()
    manager = PassManager([("skip", never_applies), ("relu_to_gelu", relu_to_gelu)])
    with pytest.warns(UserWarning, match="flashu pass 'skip' skipped: no decoder layers found"):
        manager.run(gm, None, None)
    assert manager.records[0].skipped_reason == "no decoder layers found" and manager.records[1].changed
    with pytest.raises(RuntimeError, match="flashu pass 'skip' does not apply: no decoder layers found"):
        PassManager([("skip", never_applies)], strict=True).run(traced(), None, None)
