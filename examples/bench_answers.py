"""Benchmark answers from Python: eager with a KV cache, Inductor and the flashu paper preset.

    python examples/bench_answers.py

The machinery of `flashu-compile bench`, driven from code: choose configurations by name, run
them interleaved (one cold request each, then warm runs), and write the markdown table, JSON and
chart. The first lines calibrate a plan for the embedded model and pick a held-out scene, whose
first question has a known answer, so the table also says whether each answer is right.
"""

from pathlib import Path

from flashu_compile import Showo2
from flashu_compile.calibrate import calibrate
from flashu_compile.scenes.dataset import make_split, to_tensor
from flashu_compile.tools.bench import Bench, default_configs, machine_line, select, write

model = Showo2.default()
plan = calibrate(model, progress=False)
scene = make_split("test", 1, seed=0)[0]
question, expected = scene.qa[0]
image = model.encode_image((to_tensor(scene.render()) + 1) / 2)

configs = select(default_configs(plan), ["eager+kv answer", "inductor answer", "flashu paper answer"])
bench = Bench(model, configs, [scene.caption], image, question, expected_answer=expected)
results = bench.run(runs=5)
out = Path("outputs/bench-answers")
print(write(results, out, machine_line(), "python examples/bench_answers.py"))
print(f"-> {out}/bench.md, bench.json, bench.png")
