"""The bench on a small model with eager lowerings (Inductor timing is what the command itself reports)."""

import json

import pytest
import torch

from flashu_compile.models.showo2 import Showo2
from flashu_compile.tools.bench import Bench, Config, select, speedups, write
from tests.conftest import small_config


@pytest.fixture(scope="module")
def results(tokenizer):
    model = Showo2.random(small_config(num_layers=4), seed=2).attach(tokenizer=tokenizer)
    c, (h, w) = model.config.image_latent_dim, model.config.latent_size
    image = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(1))
    skip = {"passes": ["layer_skip"], "lowering": "eager", "skip_ratio": 0.5, "skip_interval": 4, "hybrid_tau": 0}
    configs = [Config("eager 6", "t2i", "eager", 6), Config("skip 6", "t2i", "flashu", 6, skip),
               Config("eager answer", "mmu", "eager"),
               Config("plain answer", "mmu", "flashu", options={"lowering": "eager"})]
    torch._dynamo.reset()
    bench = Bench(model, configs, ["a red circle", "a blue square"], image, "what colour is the circle?",
                  max_new_tokens=4)
    return bench.run(runs=2, progress=False)


def test_every_configuration_is_measured(results):
    by_name = {r.name: r for r in results}
    assert list(by_name) == ["eager 6", "skip 6", "eager answer", "plain answer"]
    assert all(len(r.runs_s) == 2 and r.median_s > 0 and r.peak_rss_mb > 0 for r in results)
    assert all(r.recompiles == 0 for r in results)
    assert by_name["skip 6"].graphs >= 1 and by_name["eager 6"].graphs == 0
    # Skipping half the layers on 4 of 5 calls removes FLOPs; the answer without passes removes none.
    assert by_name["skip 6"].flops < by_name["eager 6"].flops
    assert by_name["plain answer"].flops == by_name["eager answer"].flops > 0
    assert by_name["eager 6"].fidelity == 0.0 and by_name["skip 6"].fidelity > 0
    assert by_name["plain answer"].fidelity == 1.0  # same tokens


def test_reports(results, tmp_path):
    table = write(results, tmp_path, "test machine", "flashu-compile bench --runs 2")
    assert "| skip 6 |" in table and "test machine" in table
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert [r["name"] for r in payload["results"]] == [r.name for r in results]
    assert payload["speedups"]["skip 6"]["flop_ratio_vs_eager"] > 1
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert speedups(results)["eager 6"]["vs_eager"] == 1.0


def test_unknown_configuration_is_named():
    with pytest.raises(ValueError, match=r"unknown bench configuration\(s\) \['fast'\]; choose from \['a'\]"):
        select([Config("a", "t2i", "eager")], ["fast"])
