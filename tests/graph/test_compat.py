"""The torch internals behind graph/compat.py behave as its callers assume, on the installed torch release.

Run on every supported release (CI: the newest torch with both transformers environments; see the
README for the releases checked by hand).
"""

import torch

from flashu_compile.graph import compat


def test_installed_torch_offers_every_internal():
    assert compat.missing_internals() == []


def test_a_missing_internal_is_named(monkeypatch):
    def from_tensor(self, tensor, *, static_shapes=None, source=None):
        raise AssertionError("never called")

    monkeypatch.setattr(compat.FakeTensorMode, "from_tensor", from_tensor)
    assert compat.missing_internals() == ["FakeTensorMode.from_tensor(symbolic_context=)"]


def test_fakes_remade_in_the_tracing_context_carry_dynamo_symbols():
    seen = []

    def backend(gm, example_inputs):
        context = compat.TracingContext.try_get()
        real = [x for x in example_inputs if isinstance(x, torch.Tensor)]
        fakes = [context.fake_mode.from_tensor(x, symbolic_context=context.tensor_to_context.get(x)) for x in real]
        seen.append((fakes, compat.detect_fake_mode(fakes) is context.fake_mode))
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda x: x.sin() * 2, backend=backend, dynamic=True)
    fn(torch.randn(3, 4))
    torch._dynamo.reset()
    assert compat.TracingContext.try_get() is None  # outside a compilation
    (fakes, same_mode), = seen
    assert same_mode and all(isinstance(f, compat.FakeTensor) for f in fakes)
    assert any(isinstance(d, torch.SymInt) for f in fakes for d in f.shape)


def test_fuse_as_graphmodule_returns_the_region_with_its_inputs_and_outputs():
    class M(torch.nn.Module):
        def forward(self, x):
            a = torch.relu(x)
            return torch.sin(a) + 1

    gm = torch.fx.symbolic_trace(M())
    relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
    region = compat.topo_sort([relu.next, relu])
    assert region == [relu, relu.next]
    sub, inputs, outputs = compat.fuse_as_graphmodule(gm, region, "piece", always_return_tuple=True)
    assert [n.op for n in inputs] == ["placeholder"] and outputs == (relu.next,)
    x = torch.randn(5)
    out = sub(x)
    assert isinstance(out, tuple) and torch.equal(out[0], torch.sin(torch.relu(x)))
