"""compile_tasks leaves the model as it was; a plain torch.compile with the backend's sampler rules samples the
same; the in-place form (Showo2.compile) runs every step compiled with the backend's rules."""

import pytest
import torch

from flashu_compile.backend import sampler_rules
from flashu_compile.models.showo2 import Showo2
from flashu_compile.options import FlashUOptions
from flashu_compile.tasks import ENTRIES, CompiledShowo2, compile_tasks
from tests.conftest import small_config

# An absolute schedule: unguided first call, guided second, so it changes the result only if the sampler applies it.
SCHEDULE = {"guidance_schedule": ((1, 0.0), (1, 5.0)), "lowering": "eager"}


@pytest.fixture
def model(tokenizer):
    return Showo2.random(small_config(), seed=3).attach(tokenizer=tokenizer)


def test_compile_tasks_returns_the_entries_and_options_and_leaves_the_model_alone(model):
    before = dict(vars(model))
    torch._dynamo.reset()
    compiled = compile_tasks(model, "flashu", SCHEDULE)
    assert vars(model) == before
    assert compiled.model is model and set(compiled.entries) == set(ENTRIES)
    assert compiled.options == FlashUOptions.from_dict(SCHEDULE)
    assert compile_tasks(model, "eager").options is None  # another backend has no flashu options


def test_a_plain_torch_compile_with_its_sampler_rules_samples_as_compile_tasks_does(model):
    torch._dynamo.reset()
    via_tasks = compile_tasks(model, "flashu", SCHEDULE).generate_images(["red circle"], steps=3, progress=False)
    torch._dynamo.reset()
    denoise = torch.compile(model.denoise, backend="flashu", options=SCHEDULE)
    plain = model.generate_images(["red circle"], steps=3, progress=False, denoise=denoise,
                                  rules=sampler_rules(SCHEDULE))
    unscheduled = model.generate_images(["red circle"], steps=3, progress=False, denoise=denoise)
    assert torch.equal(plain, via_tasks)
    assert not torch.equal(plain, unscheduled)  # without the rules the default guidance runs every call


def test_the_compiled_answer_is_the_models(model):
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = compile_tasks(model, "flashu", {"lowering": "eager"})
    assert compiled.answer(image, "what colour is the circle?", max_new_tokens=4) == \
        model.answer(image, "what colour is the circle?", max_new_tokens=4)


def test_entries_must_name_every_entry_point(model):
    with pytest.raises(ValueError, match=r"entries must be exactly \['embed', 'denoise', 'prefill', 'decode'\]"):
        CompiledShowo2(model, {"denoise": model.denoise})


IMAGE_QUESTION = (torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)), "what colour is the circle?")
CACHED = {"passes": ["head_cache"], "cache_interval": 2, "hybrid_tau": 0, "lowering": "eager"}


def test_compiled_in_place_every_step_runs_compiled_and_equals_compile_tasks(tokenizer):
    """model.compile(backend="flashu", ...), PyTorch's in-place form: the task methods' own calls run compiled."""
    from torch._dynamo.utils import counters

    from flashu_compile.runtime import FlopTally

    results = {}
    for name, options in (("off", {"lowering": "eager"}), ("cached", {**CACHED, **SCHEDULE})):
        model = Showo2.random(small_config(), seed=3).attach(tokenizer=tokenizer)
        torch._dynamo.reset()
        counters.clear()
        model.compile(backend="flashu", options=options)
        with FlopTally() as tally:
            images = model.generate_images(["red circle"], steps=6, progress=False)
        answer = model.answer(*IMAGE_QUESTION, max_new_tokens=3)
        assert counters["stats"]["unique_graphs"] >= 4  # denoise (per batch size), embed, prefill, decode
        results[name] = (images, answer, tally.total)
    torch._dynamo.reset()
    reference = Showo2.random(small_config(), seed=3).attach(tokenizer=tokenizer)
    tasks = compile_tasks(reference, "flashu", {**CACHED, **SCHEDULE})
    assert torch.allclose(results["cached"][0], tasks.generate_images(["red circle"], steps=6, progress=False),
                          rtol=1e-5, atol=1e-6)  # the compile's guidance schedule applies, as compile_tasks'
    assert results["cached"][1] == tasks.answer(*IMAGE_QUESTION, max_new_tokens=3) == results["off"][1]
    assert 0 < results["cached"][2] < 0.8 * results["off"][2]  # the head is reused on every other call


def test_compile_in_place_checks_its_options_at_the_call(model):
    with pytest.raises(ValueError, match=r"unknown flashu option\(s\) \['lowerng'\]"):
        model.compile(backend="flashu", options={"lowerng": "eager"})
    assert model._compiled_call_impl is None


def test_in_place_rules_come_from_the_backend_and_go_with_its_compiled_call(model):
    """The model keeps nothing of its own: the rules sit on the compiled call PyTorch keeps, and compiling again
    with a backend that has none (or reading a model never compiled) samples every call at the request's scale."""
    eager = model.generate_images(["red circle"], steps=3, progress=False)
    torch._dynamo.reset()
    model.compile(backend="flashu", options=SCHEDULE)
    assert model._compiled_call_impl.sampler_rules == sampler_rules(SCHEDULE)
    scheduled = model.generate_images(["red circle"], steps=3, progress=False)
    model.compile(backend="eager")
    assert model._compiled_call_impl.sampler_rules is None
    assert torch.equal(model.generate_images(["red circle"], steps=3, progress=False), eager)
    assert not torch.equal(scheduled, eager)


def test_the_wrapper_form_says_once_that_it_runs_uncompiled(model):
    wrapper = torch.compile(model, backend="flashu", options={"lowering": "eager"})
    with pytest.warns(UserWarning, match=r"model.compile\(backend='flashu'") as caught:
        wrapper.generate_images(["red circle"], steps=3, progress=False)
        wrapper.answer(*IMAGE_QUESTION, max_new_tokens=2)
    assert len([w for w in caught if "wrapper" in str(w.message)]) == 1
    assert caught[0].filename == __file__


def test_the_off_switch_runs_eager_and_back_without_recompiling(tokenizer):
    """torch.compiler.set_stance("force_eager") turns the acceleration off and on again, nothing recompiled."""
    from torch._dynamo.utils import counters

    from flashu_compile.runtime import FlopTally

    model = Showo2.random(small_config(), seed=3).attach(tokenizer=tokenizer)
    eager = model.generate_images(["red circle"], steps=4, progress=False)
    torch._dynamo.reset()
    counters.clear()
    model.compile(backend="flashu", options={**CACHED})
    fast = model.generate_images(["red circle"], steps=4, progress=False)
    graphs = counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance("force_eager"), FlopTally() as tally:
        off = model.generate_images(["red circle"], steps=4, progress=False)
    assert not torch.equal(fast, eager)  # the head cache changes the result, so the comparisons below can tell
    assert torch.equal(off, eager) and tally.calls == 0  # no flashu program ran
    with FlopTally() as tally:
        again = model.generate_images(["red circle"], steps=4, progress=False)
    assert torch.equal(again, fast) and tally.calls == 3 and counters["stats"]["unique_graphs"] == graphs
