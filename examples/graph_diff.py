"""What each pass of the paper preset does to the denoising graph, as a terminal view and an HTML page.

    python examples/graph_diff.py
"""

from pathlib import Path

from flashu_compile import Showo2
from flashu_compile.calibrate import calibrate
from flashu_compile.tools.graph_diff import graph_diff, render_html, render_terminal, sample_call

model = Showo2.default()
plan = calibrate(model, progress=False)
fn, inputs = sample_call(model, "t2i", "a red circle left of a blue square", "what colour is the circle?", seed=0)
report = graph_diff(fn, inputs, {"preset": "paper", "plan": plan})
print(render_terminal(report, "paper preset on the embedded model"))
out = Path("outputs/graph_diff.html")
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(render_html(report, "paper preset on the embedded model"))
print(f"-> {out} (open it in any browser)")
