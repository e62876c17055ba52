import warnings

import torch

from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.embedded import WEIGHTS_DIR, verify_checksums
from flashu_compile.scenes import make_split, to_tensor


def test_default_is_the_shipped_checksummed_model():
    verify_checksums(WEIGHTS_DIR)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the trained weights are there
        model = Showo2.default()
    assert model.tokenizer is not None and model.codec is not None
    assert model.config.latent_codec == "pixel-unshuffle-4" and model.config.num_image_tokens == 64


def test_default_answers_colour_questions_about_held_out_scenes():
    model = Showo2.default()
    scenes = [s for s in make_split("test", 200, seed=5) if s.qa[0][0].startswith("what colour")][:20]
    right = 0
    for scene in scenes:
        question, answer = scene.qa[0]
        right += model.answer((to_tensor(scene.render()) + 1) / 2, question, max_new_tokens=3) == answer
    # Chance is 1 in 4 colours; the shipped model is well above it.
    assert right / len(scenes) >= 0.6, right


def test_default_generates_the_prompted_colour():
    from flashu_compile.scenes import find_objects

    model = Showo2.default()
    images = model.generate_images(["a red square", "a blue circle"], steps=20, guidance=5.0, seed=0, progress=False)
    assert images.shape == (2, 3, 32, 32)
    colours = [{d.colour for d in find_objects(img)} for img in images]
    assert "red" in colours[0] and "blue" in colours[1]
    assert torch.isfinite(images).all()


def test_every_embedded_file_is_package_data():
    """A wheel carries each file of each embedded model (config files in subfolders included): every file under
    the weights folders matches one of pyproject's package-data patterns, as setuptools matches them."""
    import fnmatch
    from pathlib import Path

    import tomllib

    from flashu_compile.models.showo2.embedded import EMBEDDED

    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "flashu_compile"]
    package = root / "flashu_compile"
    files = [f.relative_to(package).as_posix() for folder in EMBEDDED.values() for f in Path(folder).rglob("*")
             if f.is_file()]
    assert any("/llm/" in f for f in files) and len(EMBEDDED) >= 2
    # setuptools' globs do not cross "/" with "*", as fnmatch does; compare part by part.
    missing = [f for f in files if not any(len(p.split("/")) == len(f.split("/")) and fnmatch.fnmatch(f, p)
                                           for p in patterns)]
    assert missing == []
