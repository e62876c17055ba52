"""CompiledShowo2: compiling leaves the model as it was, and a plain torch.compile plus options samples the same."""

import pytest
import torch

from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.compiled import ENTRIES, CompiledShowo2
from flashu_compile.options import FlashUOptions
from tests.conftest import small_config

# An absolute schedule: unguided first call, guided second, so it changes the result only if the sampler applies it.
SCHEDULE = {"guidance_schedule": ((1, 0.0), (1, 5.0)), "lowering": "eager"}


@pytest.fixture
def model(tokenizer):
    return Showo2.random(small_config(), seed=3).attach(tokenizer=tokenizer)


def test_compile_tasks_returns_the_entries_and_options_and_leaves_the_model_alone(model):
    before = dict(vars(model))
    torch._dynamo.reset()
    compiled = model.compile_tasks("flashu", SCHEDULE)
    assert vars(model) == before
    assert compiled.model is model and set(compiled.entries) == set(ENTRIES)
    assert compiled.options == FlashUOptions.from_dict(SCHEDULE)
    assert model.compile_tasks("eager").options is None  # another backend has no flashu options


def test_a_plain_torch_compile_with_its_options_samples_as_compile_tasks_does(model):
    torch._dynamo.reset()
    via_tasks = model.compile_tasks("flashu", SCHEDULE).generate_images(["red circle"], steps=3, progress=False)
    torch._dynamo.reset()
    denoise = torch.compile(model.denoise, backend="flashu", options=SCHEDULE)
    plain = model.generate_images(["red circle"], steps=3, progress=False, denoise=denoise, options=SCHEDULE)
    unscheduled = model.generate_images(["red circle"], steps=3, progress=False, denoise=denoise)
    assert torch.equal(plain, via_tasks)
    assert not torch.equal(plain, unscheduled)  # without the options the default guidance runs every call


def test_the_compiled_answer_is_the_models(model):
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = model.compile_tasks("flashu", {"lowering": "eager"})
    assert compiled.answer(image, "what colour is the circle?", max_new_tokens=4) == \
        model.answer(image, "what colour is the circle?", max_new_tokens=4)


def test_entries_must_name_every_entry_point(model):
    with pytest.raises(ValueError, match=r"entries must be exactly \['embed', 'denoise', 'prefill', 'decode'\]"):
        CompiledShowo2(model, {"denoise": model.denoise})
