"""examples/hf_generate.py, run in-process with the eager lowering: the printed report and its numbers,
and command-line errors as 'error: ...' with status 2."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "hf_generate.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("hf_generate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


pytestmark = pytest.mark.usefixtures("one_thread")


def _flops(line: str) -> tuple[float, float]:
    match = re.fullmatch(r"FLOPs per generated token: eager ([\d.]+) M, flashu ([\d.]+) M \([\d.]+x\)", line)
    assert match, line
    return float(match[1]), float(match[2])


def test_layer_skip_report_and_fewer_flops_per_token(example, capsys):
    assert example.main(["--lowering", "eager", "--max-new-tokens", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ('model: random qwen2, 8 layers; options {"passes": ["layer_skip"], "skip_ratio": 0.25, '
                        '"lowering": "eager"}')
    tokens = [re.fullmatch(rf"{who} tokens: +\[([\d, ]+)\].*", line) for who, line in zip(("eager", "flashu"),
                                                                                         lines[1:3], strict=True)]
    assert all(tokens) and all(len(t[1].split(", ")) == 8 for t in tokens)
    assert re.fullmatch(r"graphs: \d+, recompiles: \d+, graph breaks: 0", lines[3])
    eager, flashu = _flops(lines[4])
    # Two of eight layers are skipped on each decode step (the prefill runs all eight): the count must fall.
    assert flashu < eager


def test_calibrated_prune_channels_cut_more_and_recompile_like_plain_dynamo(example):
    import torch._dynamo

    skip = example.run("llama", example.compile_options(None, "eager", False), False, 6, 5, 1)
    both = example.run("llama", example.compile_options(None, "eager", True), True, 6, 5, 1)
    assert both.eager_tokens == skip.eager_tokens  # same model and prompt
    assert both.flashu_flops_per_token < skip.flashu_flops_per_token < skip.eager_flops_per_token
    # Plain dynamo (backend "eager") on the same generate() call: flashu adds no graph and no recompile.
    lm = example.build_model("llama", 1)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    lm.forward = torch.compile(lm.forward, backend="eager")
    with torch.no_grad():
        lm.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    counters = torch._dynamo.utils.counters
    assert both.graphs <= counters["stats"]["unique_graphs"]
    assert both.recompiles <= counters["frames"]["total"] - 1


def test_options_json_and_calibrate_merge(example):
    options = example.compile_options('{"preset": "paper", "lowering": "inductor"}', None, False)
    assert options == {"preset": "paper", "lowering": "inductor"}
    assert example.compile_options('{"passes": ["layer_skip"]}', "eager", True)["passes"] == ["prune_channels",
                                                                                                "layer_skip"]


@pytest.mark.parametrize("argv, message", [
    (["--arch", "gpt2"], "argument --arch: invalid choice: 'gpt2'"),
    (["--options", "{nope"], "--options is not valid JSON"),
    (["--options", "[1]"], "--options must be a JSON object of flashu options, got list"),
    (["--options", '{"skip_ratio": 2}'], "option 'skip_ratio' must be in [0, 1)"),
    (["--options", '{"passes": ["fly"]}'], "option 'passes'"),
    (["--options", '{"plan": "p"}', "--calibrate"], "--calibrate makes the plan"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an int in [1, 255]"),
    (["--prompt-length", "250", "--max-new-tokens", "16"], "--prompt-length must be an int in [1, 240]"),
    (["--seed", "-1"], "--seed must be an int"),
])
def test_command_line_errors_exit_2(example, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        example.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"hf_generate: error: {message}" in err


def test_a_plan_path_that_does_not_load_exits_2(example, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        example.main(["--lowering", "eager", "--options", f'{{"passes": ["prune_channels"], "plan": '
                                                          f'"{tmp_path / "missing"}"}}'])
    assert exit_.value.code == 2
    assert f"hf_generate: error: plan directory {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
