import dataclasses

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


def rewrite_then_fail(gm, index, options):
    # Changes the graph and adds an attribute before failing: the manager must undo both.
    relu_to_gelu(gm, index, options)
    gm.register_buffer("half_made", torch.zeros(1))
    raise KeyError("bug in the pass")


def test_failing_pass_leaves_the_graph_unrewritten_with_a_warning():
    gm = traced()
    code = gm.code
    manager = PassManager([("broken", rewrite_then_fail)])
    with pytest.warns(UserWarning, match="flashu pass 'broken' failed with KeyError: 'bug in the pass'"):
        out = manager.run(gm, None, None)
    x = torch.randn(5)
    assert out.code == code and not hasattr(out, "half_made")
    torch.testing.assert_close(out(x), torch.relu(x) * 2)
    assert manager.records[0].skipped_reason == "failed with KeyError: 'bug in the pass'"
    with pytest.raises(KeyError, match="bug in the pass"):
        PassManager([("broken", rewrite_then_fail)], strict=True).run(traced(), None, None)


def test_failing_pass_keeps_the_inputs_dynamo_sources():
    """Inductor asserts that every input of a graph from dynamo names its source (``node._dynamo_source``)."""
    gm = traced()
    for node in gm.graph.find_nodes(op="placeholder"):
        node._dynamo_source = f"source of {node.name}"
    with pytest.warns(UserWarning, match="flashu pass 'broken' failed"):
        out = PassManager([("broken", rewrite_then_fail)]).run(gm, None, None)
    assert [n._dynamo_source for n in out.graph.find_nodes(op="placeholder")] == ["source of x"]


def test_bad_input_error_propagates_without_strict():
    def rejects_options(gm, index, options):
        raise ValueError("option 'x' is -1, must be >= 0")

    with pytest.raises(ValueError, match="option 'x' is -1"):
        PassManager([("picky", rejects_options)]).run(traced(), None, None)


def test_failing_pass_restores_the_structure_index(small_model, tokenizer):
    from flashu_compile.graph import build_index
    from flashu_compile.passes.manager import PassContext
    from tests.graph.test_structure import capture
    from tests.models.test_compile_friendly import t2i_inputs

    gm, inputs = capture(small_model.denoise, *t2i_inputs(small_model, tokenizer))
    context = PassContext(build_index(gm, inputs), "t2i")

    def rewire_then_fail(gm, ctx, options):
        first = ctx.index.layers[0]
        ctx.index.replace_input(first.input, first.output)
        down = first.mlp["down_proj"].node
        with gm.graph.inserting_after(down):
            negated = gm.graph.call_function(torch.neg, (down,))
        down.replace_all_uses_with(negated, delete_user_cb=lambda user: user is not negated)
        raise RuntimeError("half done")

    with pytest.warns(UserWarning, match="flashu pass 'rewire' failed with RuntimeError: half done"):
        out = PassManager([("rewire", rewire_then_fail)]).run(gm, context, None)
    out.graph.lint()
    assert not any(n.target is torch.neg for n in out.graph.nodes)
    live = set(out.graph.nodes)
    for layer in context.index.layers:
        assert layer.input in live and layer.output in live and set(layer.nodes) <= live
        assert all(ref.node in live for ref in (*layer.attention.values(), *layer.mlp.values()))
    assert context.index.layers[0].input is not context.index.layers[0].output


def test_failing_pass_in_a_compiled_program_runs_it_unrewritten(monkeypatch, small_model, tokenizer):
    from flashu_compile.passes.registry import REGISTRY
    from tests.models.test_compile_friendly import t2i_inputs

    real = REGISTRY["layer_skip"].fn

    def broken(gm, ctx, options):
        real(gm, ctx, options)  # outlines every layer, then fails
        raise IndexError("pass bug")

    monkeypatch.setitem(REGISTRY, "layer_skip", dataclasses.replace(REGISTRY["layer_skip"], fn=broken))
    args = t2i_inputs(small_model, tokenizer)
    options = {"passes": ["layer_skip"], "skip_ratio": 0.5, "hybrid_tau": 0, "lowering": "eager"}
    with torch.no_grad():
        expected = small_model.denoise(*args)
        torch._dynamo.reset()
        with pytest.warns(UserWarning, match="flashu pass 'layer_skip' failed with IndexError: pass bug"):
            got = torch.compile(small_model.denoise, backend="flashu", options=options)(*args)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch._dynamo.reset()
        with pytest.raises(IndexError, match="pass bug"):  # dynamo re-raises the backend's own error
            torch.compile(small_model.denoise, backend="flashu", options={**options, "strict": True})(*args)
    torch._dynamo.reset()


def test_what_each_pass_did_and_skipped_is_logged(caplog):
    import logging
    import re

    def acts(gm, ctx, opts):
        return PassResult(False, {"seen": 1})

    def declines(gm, ctx, opts):
        raise PassNotApplicable("nothing to do here")

    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with caplog.at_level(logging.DEBUG, logger="flashu_compile"), pytest.warns(UserWarning, match="nothing to do"):
        PassManager([("acts", acts), ("declines", declines)]).run(gm, None, None)
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "flashu_compile.passes.manager"]
    assert len(said) == 2
    assert said[0][0] == logging.DEBUG and re.fullmatch(r"pass acts changed nothing in [\d.]+ s: \{'seen': 1\}",
                                                        said[0][1])
    assert said[1] == (logging.INFO, "pass declines skipped: nothing to do here")
