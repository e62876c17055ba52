"""graph-diff: per-pass module changes, guards in words, divergence, and its three views."""

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import jsonschema
import pytest
import torch

from flashu_compile.models.showo2 import Showo2
from flashu_compile.passes.manager import PassManager, observe_passes
from flashu_compile.tools.cli import main
from flashu_compile.tools.graph_diff import SCHEMA_PATH, graph_diff, sample_call, to_json
from flashu_compile.tools.graph_diff.render import WIDTH, render_html, render_terminal, visible_width
from tests.conftest import small_config
from tests.models.test_compile_friendly import t2i_inputs
from tests.passes.test_manager import never_applies, relu_to_gelu, traced
from tests.passes.test_prune_channels import _plan

FFN, HIDDEN, KEPT = 64, 32, 48  # small_config's FFN and hidden sizes; the plan keeps 48 neurons
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _model(tokenizer, seed):
    # A fresh model per diff: prune_channels permutes FFN neurons in place for its plan.
    return Showo2.random(small_config(), seed=seed).attach(tokenizer=tokenizer)


def _diff(model, tokenizer, options, **kwargs):
    return graph_diff(model.denoise, t2i_inputs(model, tokenizer), {"lowering": "eager", **options}, **kwargs)


@pytest.fixture(scope="module")
def pruned(tokenizer):
    torch.manual_seed(0)
    model = _model(tokenizer, seed=11)
    keep = torch.tensor([i for i in range(FFN) if i % 4 != 3])
    plan = _plan(model, {"t2i": [keep, keep]})
    return _diff(model, tokenizer, {"passes": ["prune_channels"], "plan": plan, "hybrid_tau": 0})


@pytest.fixture(scope="module")
def skipped(tokenizer):
    torch.manual_seed(0)
    model = _model(tokenizer, seed=12)
    options = {"passes": ["layer_skip"], "skip_ratio": 0.5, "skip_interval": 3, "hybrid_tau": 5}
    return _diff(model, tokenizer, options, step=2, calls=20)


def test_observer_sees_every_pass_before_and_after():
    seen = []

    def observer(name, when, gm, context, record):
        seen.append((name, when, "gelu" in gm.code, record and (record.changed, record.skipped_reason)))

    with observe_passes(observer), pytest.warns(UserWarning, match="skipped"):
        PassManager([("skip", never_applies), ("relu_to_gelu", relu_to_gelu)]).run(traced(), None, None)
    PassManager([("relu_to_gelu", relu_to_gelu)]).run(traced(), None, None)  # outside the context: unobserved
    assert seen == [("skip", "before", False, None), ("skip", "after", False, (False, "no decoder layers found")),
                    ("relu_to_gelu", "before", False, None), ("relu_to_gelu", "after", True, (True, None))]


def test_prune_channels_lists_exactly_the_ffn_modules_and_shapes(pruned):
    (graph,) = pruned.graphs
    assert pruned.recompiles == 0 and graph.task == "t2i"
    (p,) = graph.passes
    assert p.name == "prune_channels" and p.changed and p.seconds > 0 and p.guards == []
    assert p.stats["ffn_neurons_before"] == 2 * FFN and p.stats["ffn_neurons_after"] == 2 * KEPT
    modules = {m.path: m for m in p.modules}
    layers = [f"showo.model.layers.{i}.mlp" for i in range(2)]
    assert list(modules) == [f"{mlp}{suffix}" for mlp in layers for suffix in
                             (".gate_proj", ".act_fn", ".up_proj", "", ".down_proj")]
    expected_shapes = {"gate_proj": ([FFN, HIDDEN], [KEPT, HIDDEN]), "up_proj": ([FFN, HIDDEN], [KEPT, HIDDEN]),
                       "down_proj": ([HIDDEN, FFN], [HIDDEN, KEPT])}
    for mlp in layers:
        for proj, (before, after) in expected_shapes.items():
            m = modules[f"{mlp}.{proj}"]
            ((param),) = m.params
            assert (param.name, param.shape_before, param.shape_after) == (f"{mlp}.{proj}.weight", before, after)
            assert (param.bytes_before, param.bytes_after) == (FFN * HIDDEN * 4, KEPT * HIDDEN * 4)
            assert [(c.op, c.replaces) for c in m.added] == [("narrow", f"{mlp}.{proj}.weight")]
            assert [c.node for c in m.replaced] == [f"{mlp}.{proj}:linear#0"] and not m.removed
            assert m.flops_after * FFN == m.flops_before * KEPT  # each matmul shrinks with the kept neurons
        for part in (".act_fn", ""):  # SiLU and the gate product: same nodes, fewer channels
            m = modules[mlp + part]
            assert not (m.added or m.removed or m.replaced or m.params) and len(m.reshaped) == 1
            assert m.reshaped[0].after.endswith(f", {KEPT})")
    saved = sum(m.flops_before - m.flops_after for m in p.modules)
    assert p.flops_before - p.flops_after == saved > 0
    assert p.param_bytes_before - p.param_bytes_after == 2 * 3 * (FFN - KEPT) * HIDDEN * 4
    # The first FFN output is the first value the pruning changes; shape-changed nodes are not compared.
    d = p.divergence
    assert d.first.node == "showo.model.layers.0.mlp.down_proj:linear#0" and d.first.cosine < 1
    assert d.shape_changed == 8  # gate, act, up, product in each of the two layers


def test_layer_skip_guards_are_described(skipped):
    (p,) = skipped.graphs[0].passes
    assert [(g.kind, g.region, g.module) for g in p.guards] == [
        ("layer_guard", f"flashu_layer_{i}", f"showo.model.layers.{i}") for i in range(2)]
    for i, g in enumerate(p.guards):
        assert f"importance measured for layer {i} and the skip set" in g.reads
        assert "measures 1 - cos(h_in, h_out) on calls 1, 4, 7, 10, 13 (every 3)" in g.refresh
        assert "among the 1 least important of 2" in g.refresh and "runs from call 16" in g.refresh
        assert g.shapes.startswith("none: a skipped layer returns its input stream (2, ")
        assert set(g.modules) >= {f"showo.model.layers.{i}.mlp.down_proj", f"showo.model.layers.{i}.self_attn"}
        assert all(path.startswith(f"showo.model.layers.{i}") for path in g.modules)
    added = {m.path: [c.op for c in m.added] for m in p.modules if m.added}
    assert added == {f"showo.model.layers.{i}": ["get_attr", "layer_guard"] for i in range(2)}
    # Call 2 skips one of the two layers (measured at call 1): its projections run no FLOPs.
    idle = {int(m.path.split(".")[3]) for m in p.modules if m.path.endswith("q_proj") and m.flops_after == 0}
    assert len(idle) == 1
    (layer,) = idle
    assert p.divergence.first.node == f"showo.model.layers.{layer}:add#1"  # the skipped layer's output
    assert p.divergence.first_new == p.divergence.first  # no pass ran before this one


def test_token_drop_is_described_with_its_shape_change(tokenizer):
    model = _model(tokenizer, seed=15)
    fn, inputs = sample_call(model, "mmu", "a red circle", "what colour is the circle?", seed=0)
    seq, n_image = inputs[0].shape[1], inputs[2].shape[1]
    report = graph_diff(fn, inputs, {"lowering": "eager", "passes": ["token_drop"], "token_drop_layer": 0})
    (p,) = report.graphs[0].passes
    (g,) = p.guards
    assert (g.kind, g.module) == ("token_drop", "showo.model.layers.0")
    assert f"at the {n_image} positions the prompt marks as image tokens" in g.reads
    kept = seq - n_image // 2
    assert g.shapes.startswith(f"sequence {seq} -> {kept} after showo.model.layers.0: drops the {n_image // 2} ")
    # Layer 1 runs on the survivors: its values change shape (not comparable), so the first value that
    # diverges is the last position's hidden state the head reads.
    reshaped = {m.path for m in p.modules if m.reshaped}
    assert "showo.model.layers.1.self_attn.q_proj" in reshaped and not any("layers.0" in r for r in reshaped)
    assert p.divergence.shape_changed > 0 and p.divergence.first.shape_before == [1, 1, 32]


def test_prefix_cache_is_described_with_its_shape_change(tokenizer):
    model = _model(tokenizer, seed=16)
    fn, inputs = sample_call(model, "t2i", "a red circle", "", seed=0)
    seq, span = inputs[0].shape[1], model.config.num_image_tokens + 1
    report = graph_diff(fn, inputs, {"lowering": "eager", "passes": ["prefix_cache"]}, calls=10)
    (p,) = report.graphs[0].passes
    (g,) = p.guards
    assert (g.kind, g.region) == ("prefix_guard", "flashu_prefix")
    assert "memo 'prefix'" in g.reads and "each batch keeps its own" in g.reads
    assert "runs the prefix window on the first call of each batch size" in g.refresh
    assert g.shapes.startswith(f"sequence {seq} -> {span} after the LLM's input")
    assert f"the cached window of {seq - span} positions" in g.shapes and "never computed" in g.shapes
    # The window run holds copies of the decoder layers and flow-head blocks (for their keys/values).
    assert {"showo.model.layers.0.self_attn.k_proj", "diffusion_head_a.1.self_attn.v_proj"} <= set(g.modules)
    # Exact: nothing that keeps its shape diverges; the span-only layers are reshaped, not compared.
    assert p.divergence.shape_changed > 0 and p.divergence.first is None


def test_divergence_names_the_first_perturbed_node(tokenizer):
    every = torch.arange(FFN)
    model = _model(tokenizer, seed=13)
    plan = _plan(model, {"t2i": [every, every[: KEPT]]})  # layer 0 keeps every neuron, layer 1 drops some
    d = _diff(model, tokenizer, {"passes": ["prune_channels"], "plan": plan, "hybrid_tau": 0}).graphs[0].passes[0]
    assert d.divergence.first.node == "showo.model.layers.1.mlp.down_proj:linear#0"
    assert not [n for n in d.divergence.nodes if n.diverges and n.module.startswith("showo.model.layers.0")]

    model = _model(tokenizer, seed=14)
    plan = _plan(model, {"t2i": [every, every]})
    d = _diff(model, tokenizer, {"passes": ["prune_channels"], "plan": plan, "hybrid_tau": 0}).graphs[0].passes[0]
    assert d.divergence.first is None and d.divergence.compared > 100 and d.divergence.shape_changed == 0


def test_json_validates_against_the_documented_schema(pruned, skipped):
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for diff in (pruned, skipped):
        report = json.loads(to_json(diff))
        jsonschema.validate(report, schema, cls=jsonschema.Draft202012Validator)
    del report["graphs"][0]["passes"][0]["modules"][0]["params"]
    with pytest.raises(jsonschema.ValidationError, match="'params' is a required property"):
        jsonschema.validate(report, schema, cls=jsonschema.Draft202012Validator)


def test_terminal_view_fits_100_columns(pruned, skipped):
    for diff in (pruned, skipped):
        coloured = render_terminal(diff, "graph-diff test", color=True)
        plain = render_terminal(diff, "graph-diff test", color=False)
        assert "\x1b[" in coloured and "\x1b[" not in plain
        assert max(visible_width(line) for line in coloured.splitlines()) <= WIDTH
        assert [visible_width(line) for line in coloured.splitlines()] == [len(line) for line in plain.splitlines()]
    text = render_terminal(pruned, "graph-diff test", color=False)
    assert "showo.model.layers.1.mlp.down_proj" in text and f"weight ({HIDDEN}, {FFN}) → ({HIDDEN}, {KEPT})" in text
    assert re.search(r"\n    first: +showo\.model\.layers\.0\.mlp\.down_proj:linear#0  max-abs ", text)
    text = render_terminal(skipped, "t", color=False)
    assert "guard layer_guard → flashu_layer_0 for showo.model.layers.0 (" in text
    assert "modules), as above" in text.split("guard layer_guard → flashu_layer_1")[1].splitlines()[0]


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.summaries, self.urls, self._in_summary = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v and not v.startswith("#")]
        self._in_summary += tag == "summary"

    def handle_endtag(self, tag):
        self._in_summary -= tag == "summary"

    def handle_data(self, data):
        if self._in_summary:
            self.summaries.append(data)


def test_html_is_self_contained_with_collapsible_modules(pruned):
    page = _Page()
    page.feed(render_html(pruned, "graph-diff test"))
    assert page.urls == [] and "link" not in page.tags and "img" not in page.tags
    modules = [m.path for m in pruned.graphs[0].passes[0].modules]
    assert [s for s in page.summaries if s.startswith("showo.")] == modules
    assert page.tags.count("details") == len(modules) + 1  # one per module, one for the node table


def _chromium():
    return next((path for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                 if (path := shutil.which(name))), None)


def _load_with_binary(binary, page, shot):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,2000"]
    subprocess.run([binary, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120,
                   check=True)
    return subprocess.run([binary, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                          timeout=120, check=True).stdout


def _load_with_playwright(page, shot):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="headless Chromium is not available: no chromium, chromium-browser or "
        "google-chrome on PATH and playwright is not installed")
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch()
        except Exception as err:  # playwright without its downloaded browser
            pytest.skip(f"playwright cannot start Chromium: {err}")
        view = browser.new_page(viewport={"width": 1280, "height": 2000})
        view.goto(page.as_uri())
        view.screenshot(path=str(shot))
        dom = view.content()
        browser.close()
    return dom


def test_html_page_in_headless_chromium(pruned, tmp_path):
    page, shot = tmp_path / "diff.html", tmp_path / "diff.png"
    page.write_text(render_html(pruned, "graph-diff test"))
    binary = _chromium()
    if binary is None and os.environ.get("CI") == "true":
        pytest.fail(".ci/run installs Debian's chromium so that this page is checked in a browser; none is on PATH")
    dom = _load_with_binary(binary, page, shot) if binary else _load_with_playwright(page, shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    for module in ("showo.model.layers.0.mlp.gate_proj", "showo.model.layers.1.mlp.down_proj"):
        assert module in dom


@pytest.mark.parametrize(("args", "error"), [
    (["--passes", "fuse_everything"], "option 'passes' must be one of"),
    (["-O", "turbo=1"], "unknown flashu option(s) ['turbo']"),
    (["-O", "token_drop_ratio=1.5"], "option 'token_drop_ratio' must be in [0, 1)"),
])
def test_cli_rejects_bad_passes_and_options(args, error, capsys):
    assert main(["graph-diff", "--model", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flashu-compile graph-diff: error: ") and error in err


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "diff.json"
    assert main(["graph-diff", "--model", "tiny", "--passes", "layer_skip", "--format", "json", "--out",
                 str(out)]) == 0
    report = json.loads(out.read_text())
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()), cls=jsonschema.Draft202012Validator)
    (graph,) = report["graphs"]
    assert [p["name"] for p in graph["passes"]] == ["layer_skip"] and report["options"]["lowering"] == "eager"


@pytest.mark.parametrize("error, status", [(OSError(28, "No space left on device"), 2), (KeyboardInterrupt(), 130)])
def test_cli_cut_short_leaves_the_previous_report(error, status, tmp_path, write_fails_midway, capsys):
    """--out is replaced whole or not at all: a full disk or Ctrl-C while writing never leaves half a report."""
    out = tmp_path / "diff.json"
    out.write_text('{"previous": "report"}')
    write_fails_midway("diff.json", error)
    assert main(["graph-diff", "--model", "tiny", "--passes", "layer_skip", "--format", "json", "--out",
                 str(out)]) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("error: [Errno 28] No space left on device\n" if status == 2
                                                   else "\ninterrupted\n")
    assert out.read_text() == '{"previous": "report"}' and [p.name for p in tmp_path.iterdir()] == ["diff.json"]
