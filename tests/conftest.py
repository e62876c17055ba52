import os

import pytest
import torch

# Inductor compiles C++ on CPU; reuse one cache folder across the whole test run.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "inductor"))

from flashu_compile.models.showo2 import Showo2, custom_config  # noqa: E402
from flashu_compile.models.showo2.tokenizer import SceneTokenizer  # noqa: E402

WORDS = ["red", "green", "blue", "circle", "square", "triangle", "left", "of", "right", "above", "below",
         "what", "colour", "is", "the", "two"]


def small_config(**overrides):
    """A Show-o2 of the official structure at toy size, independent of the scenes vocabulary."""
    args = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                vision_hidden_size=24, vision_layers=3, vision_heads=2, vision_intermediate_size=48, grid=4,
                head_hidden_size=48, head_heads=4, head_kv_heads=2, head_dim=12, head_intermediate_size=96,
                num_diffusion_layers=2, latent_channels=12, max_text_len=10, latent_codec="pixel-unshuffle-2")
    args.update(overrides)
    return custom_config(**args)


@pytest.fixture(scope="session")
def tokenizer():
    return SceneTokenizer(words=WORDS)


@pytest.fixture(scope="session")
def small_model(tokenizer):
    torch.manual_seed(0)
    return Showo2.random(small_config(), seed=1).attach(tokenizer=tokenizer)


@pytest.fixture
def builds(monkeypatch):
    """The skip sets guard-free decode graphs are built for, in order."""
    from flashu_compile.backends.specialized import Specializations

    seen = []
    build = Specializations._build

    def spy(self, skip):
        seen.append(skip)
        return build(self, skip)

    monkeypatch.setattr(Specializations, "_build", spy)
    return seen


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny ops: the two cores are shared, and spin-waiting OpenMP threads
    make such ops many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
