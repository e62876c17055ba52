"""Pieces compiled after dynamo's context has closed hit Inductor's caches: across identical layers, and on a restart.

Each start is a fresh process with the same cache folder, so the counters are those of one start.
"""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    import torch
    from torch._dynamo.utils import counters
    from flashu_compile.models.showo2 import Showo2
    from flashu_compile.models.showo2.tokenizer import SceneTokenizer
    from flashu_compile.tasks import compile_tasks
    from tests.conftest import WORDS, small_config

    warnings.simplefilter("ignore")
    options = json.loads(sys.argv[1])
    model = Showo2.random(small_config(num_layers=4), seed=3).attach(tokenizer=SceneTokenizer(words=WORDS))
    compiled = compile_tasks(model, "flashu", options)
    latents = compiled.generate_images(["a red circle"], steps=5, guidance=1.0, progress=False)
    stats = {"inductor": dict(counters["inductor"]), "aot": dict(counters["aot_autograd"]),
             "flashu": dict(counters["flashu"]), "sum": float(latents.double().sum())}
    torch._dynamo.reset()
    reference = compile_tasks(model, "flashu", {**options, "lowering": "eager"})
    want = reference.generate_images(["a red circle"], steps=5, guidance=1.0, progress=False)
    stats["error"] = float((latents - want).norm() / want.norm())
    print(json.dumps(stats))
""")
# layer_skip outlines the four decoder layers: four pieces of one structure, differing only in weights.
LAYER_SKIP = {"passes": ["layer_skip"], "skip_ratio": 0.5, "hybrid_tau": 0}


def _start(cache: str, options: dict) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(options)], capture_output=True, text=True,
                            timeout=900, cwd=root, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_identical_layers_compile_once_and_a_restart_compiles_nothing(tmp_path):
    # Before the pieces had a shape environment, every one of them bypassed the FX graph cache ("No shape env").
    cold = _start(str(tmp_path), LAYER_SKIP)
    warm = _start(str(tmp_path), LAYER_SKIP)
    assert cold["inductor"].get("fxgraph_cache_bypass", 0) == 0, cold
    assert cold["flashu"].get("pieces_shared", 0) >= 3, cold  # four layer pieces, one compile
    assert warm["inductor"].get("fxgraph_cache_miss", 0) == 0, warm
    assert warm["aot"].get("autograd_cache_hit", 0) == warm["aot"]["total"], warm
    assert warm["sum"] == cold["sum"] and cold["error"] < 1e-4, cold


def test_the_final_phase_graph_compiles_block_by_block(tmp_path):
    """head_cache alone outlines no decoder layer, but its final full-network phase is the whole network again:
    compiled block by block (regional compilation), its four layers and two head blocks compile once per
    structure, where the whole graph compiled every layer again (nothing shared, no cache hit), and the request
    equals the eager lowering of the same options."""
    cold = _start(str(tmp_path), {"passes": ["head_cache"], "cache_interval": 2, "hybrid_tau": 2})
    assert cold["flashu"].get("pieces_shared", 0) >= 4, cold  # layers 1-3 and head block 1
    assert cold["error"] < 1e-4, cold


MEGA = textwrap.dedent("""
    import json, os, sys, warnings
    import torch
    from torch._dynamo.utils import counters
    from flashu_compile.models.showo2 import Showo2
    from flashu_compile.models.showo2.tokenizer import SceneTokenizer
    from flashu_compile.tasks import compile_tasks
    from tests.conftest import WORDS, small_config

    warnings.simplefilter("ignore")
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "load":
        with open(path, "rb") as f:
            torch.compiler.load_cache_artifacts(f.read())
    model = Showo2.random(small_config(num_layers=4), seed=3).attach(tokenizer=SceneTokenizer(words=WORDS))
    compiled = compile_tasks(model, "flashu", {"passes": ["layer_skip", "head_cache"], "skip_ratio": 0.5,
                                              "hybrid_tau": 2, "cache_interval": 2})
    latents = compiled.generate_images(["a red circle"], steps=5, guidance=1.0, progress=False)
    answer = compiled.answer(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)),
                             "what colour is the circle?", max_new_tokens=4)
    if mode == "save":
        artifacts = torch.compiler.save_cache_artifacts()
        assert artifacts is not None, "nothing to save"
        with open(path, "wb") as f:
            f.write(artifacts[0])
    print(json.dumps({"inductor": dict(counters["inductor"]), "sum": float(latents.double().sum()),
                      "answer": answer}))
""")


def test_a_mega_cache_saved_by_one_process_leaves_another_nothing_to_compile(tmp_path):
    """torch.compiler.save_cache_artifacts() after both tasks' flashu programs compiled; a new process with empty
    caches loads them and compiles no FX graph of its own (every lowering of both tasks is a cache hit)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    artifacts = str(tmp_path / "mega.bin")
    runs = {}
    for mode in ("save", "load"):
        result = subprocess.run([sys.executable, "-c", MEGA, mode, artifacts], capture_output=True, text=True,
                                timeout=900, cwd=root, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR":
                                                            str(tmp_path / f"cache-{mode}")})
        assert result.returncode == 0, result.stderr[-3000:]
        runs[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    saved, loaded = runs["save"]["inductor"], runs["load"]["inductor"]
    assert saved.get("fxgraph_cache_miss", 0) > 0, saved  # the first process compiled
    assert loaded.get("fxgraph_cache_miss", 0) == 0 and loaded.get("fxgraph_cache_hit", 0) > 0, loaded
    assert runs["load"]["sum"] == runs["save"]["sum"] and runs["load"]["answer"] == runs["save"]["answer"]


PRUNED = textwrap.dedent("""
    import json, warnings
    import torch
    from torch._dynamo.utils import counters
    from transformers import DynamicCache
    from flashu_compile.calibrate import calibrate
    from flashu_compile.models.showo2 import Showo2
    from flashu_compile.models.showo2.tokenizer import SceneTokenizer
    from flashu_compile.models.showo2.understanding import answer_tokens, prepare
    from flashu_compile.tasks import compile_tasks
    from tests.conftest import WORDS, small_config

    warnings.simplefilter("ignore")
    question = "what colour is the circle?"
    model = Showo2.random(small_config(num_layers=4, intermediate_size=320), seed=5).attach(
        tokenizer=SceneTokenizer(words=WORDS))
    latents = torch.randn(1, model.config.image_latent_dim, *model.config.latent_size,
                          generator=torch.Generator().manual_seed(2))
    plan = calibrate(model, prompts=["a red circle"], images=[latents], questions=[question], prune_ratio=0.2,
                     multiple=32, steps=3, progress=False)
    rows, embeds = prepare(model, model.tokenizer, latents, question)
    out = {}
    for lowering in ("inductor", "eager"):
        torch._dynamo.reset()
        compiled = compile_tasks(model, "flashu", {"passes": ["prune_channels", "layer_skip"], "plan": plan,
                                                  "skip_ratio": 0.5, "lowering": lowering})
        with torch.no_grad():
            logits = compiled.entries["prefill"](model, embeds, rows.attention_mask,
                                                 DynamicCache(config=model.config.llm), rows.image_positions())
            out[lowering] = (logits, answer_tokens(model, model.tokenizer, latents, question, max_new_tokens=6,
                                                   entries=compiled.entries))
    (got, got_tokens), (want, want_tokens) = out["inductor"], out["eager"]
    print(json.dumps({"flashu": dict(counters["flashu"]), "error": float((got - want).norm() / want.norm()),
                      "same_tokens": got_tokens == want_tokens}))
""")


def test_pruned_layers_reading_other_parts_of_their_weights_share_one_piece(tmp_path):
    """The understanding side's pruned FFNs read a range of each layer's weights that starts elsewhere in every
    layer (views at other storage offsets): the layer pieces still compile once, and equal the eager lowering."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", PRUNED], capture_output=True, text=True, timeout=900, cwd=root,
                            env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["flashu"].get("pieces_shared", 0) >= 2, stats
    assert stats["error"] < 1e-4 and stats["same_tokens"], stats
