"""The pass registry: one declaration per pass reaches options, the backend, graph-diff and the bench."""

import re
from pathlib import Path

import pytest
import torch

from flashu_compile.backend import build_pass_list
from flashu_compile.calibrate import calibrate
from flashu_compile.models.showo2 import Showo2
from flashu_compile.options import PASS_TASKS, PASSES, FlashUOptions, Setting
from flashu_compile.passes.manager import observe_passes
from flashu_compile.passes.registry import REGISTRY, PassSpec, metadata_keys, register, unregister
from flashu_compile.tools.bench import default_configs, split_rows
from flashu_compile.tools.graph_diff import graph_diff, render_terminal
from flashu_compile.tools.graph_diff.nodes import ORIGIN_KEY
from tests.conftest import small_config
from tests.models.test_compile_friendly import t2i_inputs
from tests.passes import toy_pass

DOCS = Path(__file__).parents[2] / "docs" / "writing-a-pass.md"


@pytest.fixture
def toy():
    register(toy_pass.SPEC)
    yield toy_pass.SPEC
    unregister(toy_pass.NAME)


def test_a_registered_pass_is_an_option_with_its_order_tasks_and_conflicts(toy):
    names = list(PASSES)
    assert names.index("layer_skip") + 1 == names.index("toy_scale") == names.index("head_cache") - 1  # order 45
    assert [PASSES[n].order for n in names] == sorted(PASSES[n].order for n in names)
    assert PASS_TASKS["toy_scale"] == ("t2i",)
    assert FlashUOptions.from_dict({"passes": ["toy_scale", "layer_skip"]}).passes == ("toy_scale", "layer_skip")
    with pytest.raises(ValueError, match=r"option 'passes': toy_scale does not compose with head_cache \(the toy "
                                         r"scales a value the head cache memoizes\); enable one of them"):
        FlashUOptions.from_dict({"passes": ["head_cache", "toy_scale"]})


def test_a_registered_pass_declares_its_own_options(toy, tokenizer):
    """toy_factor is declared by the toy pass alone: validated, defaulted, read by the pass, gone with it."""
    assert FlashUOptions.from_dict({"passes": ["toy_scale"]}).toy_factor == 1.0
    opts = FlashUOptions.from_dict({"passes": ["toy_scale"], "toy_factor": 2})
    assert opts.toy_factor == 2.0 and opts.replace(toy_factor=3.0).toy_factor == 3.0
    with pytest.raises(ValueError, match=r"option 'toy_factor' must be a number, got str 'x'"):
        FlashUOptions.from_dict({"toy_factor": "x"})
    with pytest.raises(ValueError, match=r"pass 'clash': setting\(s\) \['skip_ratio'\] are already options"):
        register(PassSpec("clash", toy.fn, order=99, tasks=("t2i",), settings={"skip_ratio": Setting(0.5, "fraction")}))
    model = Showo2.random(small_config(), seed=3).attach(tokenizer=tokenizer)
    inputs = t2i_inputs(model, tokenizer)
    torch._dynamo.reset()
    plain = model.denoise(*inputs)
    doubled = torch.compile(model.denoise, backend="flashu", options={"passes": ["toy_scale"], "lowering": "eager",
                                                                       "toy_factor": 2.0})(*inputs)
    assert not torch.allclose(doubled, plain)  # the pass read its option
    unregister(toy.name)
    try:
        with pytest.raises(ValueError, match=r"unknown flashu option\(s\) \['toy_factor'\]"):
            FlashUOptions.from_dict({"toy_factor": 2.0})
    finally:
        register(toy)


def test_an_unregistered_pass_is_refused_and_leaves_no_trace(toy):
    unregister(toy.name)
    try:
        assert "toy_scale" not in PASSES and "toy_scale" not in REGISTRY and "toy_scale" not in PASS_TASKS
        with pytest.raises(ValueError, match="option 'passes' must be one of .* got 'toy_scale'"):
            FlashUOptions.from_dict({"passes": ["toy_scale"]})
        assert toy_pass.TOY_KEY not in metadata_keys()
        assert "flashu toy 50" not in split_rows()
    finally:
        register(toy)  # the fixture unregisters it


def test_the_backend_runs_a_registered_pass_in_canonical_order_for_its_tasks(toy):
    opts = FlashUOptions(passes=("toy_scale", "prune_channels", "layer_skip"))
    assert build_pass_list(opts, "t2i") == [("prune_channels", REGISTRY["prune_channels"].fn),
                                            ("layer_skip", REGISTRY["layer_skip"].fn), ("toy_scale", toy.fn)]
    assert [name for name, _ in build_pass_list(opts, "mmu")] == ["prune_channels", "layer_skip"]


def test_graph_diff_describes_a_registered_pass_with_its_hook(toy, tokenizer):
    model = Showo2.random(small_config(), seed=3).attach(tokenizer=tokenizer)
    diff = graph_diff(model.denoise, t2i_inputs(model, tokenizer), {"passes": ["toy_scale"], "lowering": "eager"},
                      calls=7)
    (p,) = diff.graphs[0].passes
    assert p.changed and p.divergence.diverging == 0  # a factor of 1.0 changes no value
    (g,) = p.guards
    assert (g.kind, g.region, g.module, g.nodes) == ("toy_scale", "-", "showo.model.layers.1", 1)
    assert (g.reads, g.refresh) == ("nothing at run time", "never: the same factor on all 7 calls")
    text = render_terminal(diff, "toy", color=False)
    assert "never: the same factor on all 7 calls" in text and "showo.model.layers.1's output times 1.0" in text


def test_the_bench_gets_a_row_for_a_registered_pass(toy):
    assert split_rows()["flashu toy 50"] == "toy scaling"
    (row,) = [c for c in default_configs("plan", split=True) if c.name == "flashu toy 50"]
    assert (row.task, row.steps, row.options["passes"], row.options["guidance_schedule"]) == (
        "t2i", 50, ["toy_scale"], None)
    assert toy_pass.TOY_KEY in metadata_keys()


def test_the_bench_rows_keep_their_order():
    # The paper preset's passes first, then the others, each in canonical order; then guidance and the preset.
    from flashu_compile.options import PRESETS

    paper = PRESETS["paper"]["passes"]
    rows = [s for s in REGISTRY.values() if s.bench_row is not None]
    want = [f"flashu {s.bench_row.short} 50" for s in rows if s.name in paper] + \
        [f"flashu {s.bench_row.short} 50" for s in rows if s.name not in paper]
    assert list(split_rows()) == [*want, "flashu guidance 50", "flashu paper 50"]
    assert list(split_rows())[:4] == ["flashu prune 50", "flashu skip 50", "flashu cache 50", "flashu prefix 50"]


def test_a_pass_is_registered_once_and_conflicts_only_with_known_passes(toy):
    with pytest.raises(ValueError, match="pass 'toy_scale' is registered twice"):
        register(toy)
    with pytest.raises(ValueError, match=r"conflicts with unregistered pass\(es\) \['magic'\]"):
        register(PassSpec("other", toy.fn, 1, ("t2i",), conflicts={"magic": "why"}))
    with pytest.raises(ValueError, match=r"pass 'other': tasks must be some of \['t2i', 'mmu'\], got \['video'\]"):
        register(PassSpec("other", toy.fn, 1, ("video",)))
    assert "other" not in REGISTRY and "other" not in PASSES


def test_every_metadata_key_is_in_the_guide():
    table = {m.group(1) for m in re.finditer(r"^\| `(flashu_\w+)` \|", DOCS.read_text(), re.MULTILINE)}
    assert table == set(metadata_keys()) | {ORIGIN_KEY}


def test_the_real_passes_write_only_the_keys_they_declare(tokenizer):
    """Every flashu_* key on a node a pass made is one that pass declares (its own or the common provenance)."""
    model = Showo2.random(small_config(), seed=4).attach(tokenizer=tokenizer)
    options = {"passes": ["prune_channels", "layer_skip", "head_cache"], "skip_ratio": 0.5, "lowering": "eager",
               "plan": calibrate(model, steps=2, progress=False)}
    seen: dict[str, set[str]] = {}

    def observer(name, when, gm, context, record):
        if when == "after":
            for sub in gm.modules():
                for node in getattr(sub, "graph", torch.fx.Graph()).nodes:
                    made = (node.meta.get("flashu_pass") or {}).get("pass")
                    if made is not None:
                        seen.setdefault(made, set()).update(k for k in node.meta if k.startswith("flashu_"))

    torch._dynamo.reset()
    with observe_passes(observer), torch.no_grad():
        torch.compile(model.denoise, backend="flashu", options=options)(*t2i_inputs(model, tokenizer))
    assert set(seen) == {"prune_channels", "layer_skip", "head_cache"}
    for name, keys in seen.items():
        assert keys <= {"flashu_pass", *REGISTRY[name].writes}, name
