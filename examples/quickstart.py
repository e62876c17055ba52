"""Generate an image and answer a question about it with the embedded Show-o2.

    python examples/quickstart.py
"""

from pathlib import Path

from flashu_compile import Showo2
from flashu_compile.models.showo2.codecs import to_pil

model = Showo2.default()
# The embedded model draws best unguided (guidance 1); real Show-o2 checkpoints use the official 7.5.
images = model.generate_images(["a red circle left of a blue square"], steps=50, guidance=1.0, seed=0)
out = Path("outputs/quickstart.png")
out.parent.mkdir(parents=True, exist_ok=True)
to_pil(images, upscale=8)[0].save(out)
print(f"image -> {out}")
print("answer:", model.answer(images[0], "what colour is the circle?", max_new_tokens=8))
