"""The same image and answer through the flashu backend with the paper preset, timed against eager.

    python examples/flashu_paper.py

Calibrates a plan for the embedded model (a few seconds), compiles the denoising step, the
prefill and the decode step with every pass of the preset, and runs each task twice (the first
run compiles). Prints the timings and both answers.
"""

import time

import torch

from flashu_compile import Showo2
from flashu_compile.calibrate import calibrate
from flashu_compile.tasks import compile_tasks

PROMPT, QUESTION = "a red circle left of a blue square", "what colour is the circle?"


def timed(label, fn):
    t0 = time.perf_counter()
    out = fn()
    print(f"{label}: {time.perf_counter() - t0:.2f} s")
    return out


eager = Showo2.default()
reference = timed("eager, 50 steps", lambda: eager.generate_images([PROMPT], steps=50, progress=False))

model = Showo2.default()
plan = calibrate(model, progress=False)
fast = compile_tasks(model, "flashu", {"preset": "paper", "plan": plan})
timed("flashu paper, 35 steps, first run (compiles)", lambda: fast.generate_images([PROMPT], steps=35, progress=False))
images = timed("flashu paper, 35 steps", lambda: fast.generate_images([PROMPT], steps=35, progress=False))
print(f"mean |difference| from the eager image: {float((images - reference).abs().mean()):.3f}")

timed("flashu paper answer, first run (compiles)", lambda: fast.answer(images[0], QUESTION, max_new_tokens=8))
answer = timed("flashu paper answer", lambda: fast.answer(images[0], QUESTION, max_new_tokens=8))
with torch.no_grad():
    print(f"answers: flashu {answer!r}, eager {eager.answer(images[0], QUESTION, max_new_tokens=8)!r}")
