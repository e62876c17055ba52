"""Pieces compiled after dynamo's context has closed hit Inductor's caches: across identical layers, and on a restart.

Each start is a fresh process with the same cache folder, so the counters are those of one start.
"""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, warnings
    import torch
    from torch._dynamo.utils import counters
    from flashu_compile.models.showo2 import Showo2
    from flashu_compile.models.showo2.tokenizer import SceneTokenizer
    from flashu_compile.tasks import compile_tasks
    from tests.conftest import WORDS, small_config

    warnings.simplefilter("ignore")
    model = Showo2.random(small_config(num_layers=4), seed=3).attach(tokenizer=SceneTokenizer(words=WORDS))
    # layer_skip outlines the four decoder layers: four pieces of one structure, differing only in weights.
    compiled = compile_tasks(model, "flashu", {"passes": ["layer_skip"], "skip_ratio": 0.5, "hybrid_tau": 0})
    latents = compiled.generate_images(["a red circle"], steps=4, guidance=1.0, progress=False)
    print(json.dumps({"inductor": dict(counters["inductor"]), "aot": dict(counters["aot_autograd"]),
                      "sum": float(latents.double().sum())}))
""")


def _start(cache: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900, cwd=root,
                            env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_identical_layers_compile_once_and_a_restart_compiles_nothing(tmp_path):
    # Before the pieces had a shape environment, every one of them bypassed the FX graph cache ("No shape env").
    cold = _start(str(tmp_path))
    warm = _start(str(tmp_path))
    assert cold["inductor"].get("fxgraph_cache_bypass", 0) == 0, cold
    assert cold["inductor"].get("fxgraph_cache_hit", 0) >= 3, cold  # four layer pieces, one entry
    assert warm["inductor"].get("fxgraph_cache_miss", 0) == 0, warm
    assert warm["aot"].get("autograd_cache_hit", 0) == warm["aot"]["total"], warm
    assert warm["sum"] == cold["sum"]
