"""``flashu-compile evaluate``: its options, its errors (before any model loads) and one small run end to end."""

import json
import re
import sys
import warnings

import pytest

from flashu_compile.tools import common
from flashu_compile.tools import evaluate as evaluate_tool
from flashu_compile.tools.cli import build_parser, main
from flashu_compile.tools.evaluate import configurations, parse_config, recorded_options, split_top_level


@pytest.fixture
def no_model(monkeypatch):
    def load(args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(common, "load_model", load)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "1"], r"--steps must be an int in \[2, 10000\], got 1"),
    (["--guidance", "nan"], "--guidance must be a finite number, got nan"),
    (["--prompts", "0"], "--prompts must be an int >= 1, got 0"),
    (["--questions", "-3"], "--questions must be an int >= 1, got -3"),
    (["--images-per-prompt", "0"], "--images-per-prompt must be an int >= 1, got 0"),
    (["--batch", "0"], "--batch must be an int >= 1, got 0"),
    (["--seed", "-1"], r"--seed must be an int in \[0, "),
    (["--resamples", "10"], "--resamples must be an int >= 100, got 10"),
    (["--prompts", "5000"], "the test split has 841 scenes"),
    (["--json", "."], "--json '.' exists and is a folder"),
    (["--preset", "turbo"], r"configuration 'turbo': option 'preset' must be one of \['off', 'paper'"),
    (["--lowering", "tvm"], r"configuration 'off': option 'lowering' must be one of"),
    (["-O", "bogus=1"], r"configuration 'paper bogus=1': unknown flashu option\(s\) \['bogus'\]"),
    (["-O", "skip_ratio"], "--option takes KEY=VALUE, got 'skip_ratio'"),
    (["-O", "plan=somewhere"], "give the plan with --plan"),
    (["-O", "guidance_schedule={\"relative\": [[0.7, 0.75]]}"], "fractions of the calls must sum to 1, got 0.7"),
    (["--config", "x"], r"--config takes NAME=PRESET\[,KEY=VALUE...\], got 'x'"),
    (["--config", "=paper"], "--config takes NAME=PRESET"),
    (["--config", "a=off", "--config", "a=paper"], r"--config names must differ, got \['a', 'a'\]"),
    (["--config", "a=paper", "--preset", "paper"], "--preset names the one configuration without --config"),
    (["--config", "a=off,skip_ratio=0.1,skip_ratio=0.2"], "--config a: option 'skip_ratio' is given twice"),
    (["--config", "a=off,passes=[\"layer_skip\",\"prefix_cache\"]"], "prefix_cache does not compose with layer_skip"),
    (["--config", "a=off", "--config", "b=off,skip_ratio=2"], r"configuration 'b': option 'skip_ratio' must be in"),
    (["--config", "a=off,steps=1"], r"configuration 'a': steps must be an int in \[2, 10000\], got 1"),
    (["--config", "a=off,solver=\"rk4\""], r"configuration 'a': solver must be one of \['euler', 'heun'\]"),
])
def test_bad_arguments_are_errors_before_the_model_loads(argv, message, no_model, capsys):
    assert main(["evaluate", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("flashu-compile evaluate: error: ")
    assert re.search(message, err), err


def test_a_config_splits_at_top_level_commas_only():
    assert split_top_level('paper,passes=["layer_skip","head_cache"],x={"a": [1, 2]},s="a,b"') == [
        "paper", 'passes=["layer_skip","head_cache"]', 'x={"a": [1, 2]}', 's="a,b"']
    assert parse_config('skip = off,passes=["layer_skip"],skip_ratio=0.5,step_semantics=project') == (
        "skip", {"preset": "off", "passes": ["layer_skip"], "skip_ratio": 0.5, "step_semantics": "project"})
    assert parse_config("rel=paper,guidance_schedule={\"relative\": [[1, 1]]}")[1]["guidance_schedule"] == {
        "relative": [[1, 1]]}


def _configs(*argv):
    return configurations(build_parser().parse_args(["evaluate", *argv]))


def test_which_configurations_run():
    # Default: the plain baseline, then paper; all on the eager lowering.
    assert _configs() == [("off", {"preset": "off", "lowering": "eager"}),
                          ("paper", {"preset": "paper", "lowering": "eager"})]
    # -O describes --preset's configuration; the baseline stays plain.
    assert _configs("--preset", "off", "-O", "passes=[\"head_cache\"]", "--lowering", "inductor") == [
        ("off", {"preset": "off", "lowering": "inductor"}),
        ('off passes=["head_cache"]', {"passes": ["head_cache"], "preset": "off", "lowering": "inductor"})]
    assert _configs("--preset", "off") == [("off", {"preset": "off", "lowering": "eager"})]
    # With --config, in the order given, -O applied to each (a config's own value wins).
    assert _configs("--config", "a=paper,hybrid_tau=3", "--config", "b=off", "-O", "hybrid_tau=5") == [
        ("a", {"hybrid_tau": 3, "preset": "paper", "lowering": "eager"}),
        ("b", {"hybrid_tau": 5, "preset": "off", "lowering": "eager"})]


def test_only_a_configuration_that_prunes_records_its_plan():
    """How its plan came is part of a configuration's options in the report; one that reads no plan has none, so
    a resumed run reuses it whichever configurations beside it prune."""
    for argv, plan in ([], "calibrated"), (["--plan", "plans/p"], "plans/p"):
        args = build_parser().parse_args(["evaluate", "--config", "off=off", "--config", "paper=paper", *argv])
        assert recorded_options(args, configurations(args)) == {
            "off": {"preset": "off", "lowering": "eager"}, "paper": {"preset": "paper", "lowering": "eager",
                                                                    "plan": plan}}


def test_a_small_run_end_to_end(tmp_path, capsys):
    """Configurations see the same captions, questions and noise: one identical to the baseline differs by 0."""
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--model", "default", "--prompts", "3", "--images-per-prompt", "1", "--questions", "3",
            "--steps", "3", "--config", "off=off", "--config", "same=off",
            "--config", 'skip=off,passes=["layer_skip"],skip_ratio=0.5',
            "--json", str(out), "--no-progress", "--resamples", "200"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| configuration | geneval/overall |" in printed and "Differences from off (paired):" in printed
    assert "flashu-compile evaluate --model default --prompts 3" in printed  # the command, for a report to quote
    report = json.loads(out.read_text())
    comparison = report["comparison"]
    assert list(comparison["scores"]) == ["off", "same", "skip"] and comparison["baseline"] == "off"
    assert all(d == {"value": 0.0, "low": 0.0, "high": 0.0} for d in comparison["differences"]["same"].values())
    assert report["results"]["same"]["per_prompt"] == report["results"]["off"]["per_prompt"]
    assert report["configurations"]["skip"] == {"preset": "off", "passes": ["layer_skip"], "skip_ratio": 0.5,
                                                "lowering": "eager"}
    for scores in comparison["scores"].values():
        assert all(0 <= s["low"] <= s["value"] <= s["high"] <= 1 for s in scores.values())
    # Which techniques acted, per configuration: layer_skip on the denoising, prefill and decode graphs alike.
    assert report["techniques"]["off"] == {}
    assert report["techniques"]["skip"]["layer_skip"]["acted"] >= 3
    assert "techniques: layer_skip acted on" in printed and "techniques: none ran" in printed


def test_by_default_every_paper_technique_acts_on_both_tasks(capsys):
    """evaluate measures the 10-layer embedded model unless told otherwise: there every technique of the paper
    preset acts, so a row named paper measures all of them (layers skipped and the head cache reused while
    generating, layers skipped and visual tokens dropped while answering)."""
    assert build_parser().parse_args(["evaluate"]).model == "scenes-10"
    argv = ["evaluate", "--prompts", "1", "--images-per-prompt", "1", "--questions", "1", "--steps", "20",
            "--config", "paper=paper", "--no-progress", "--resamples", "100"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pass that falls back warns
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "model: scenes-10 " in printed
    for technique in ("prune_channels", "layer_skip", "head_cache", "token_drop"):
        assert re.search(rf"{technique} acted on [1-9]\d* graph", printed), printed
    assert "not on" not in printed
    t2i, mmu = re.search(r"t2i .*\n.*mmu .*", printed)[0].splitlines()
    assert re.search(r"layers skipped: \d+ call\(s\) skip \[\d+, \d+\]", t2i) and "reuse x" in t2i, t2i
    assert re.search(r"layers skipped: \d+ call\(s\) skip \[\d+, \d+\]", mmu), mmu


def test_a_technique_that_does_not_act_is_reported_with_why(capsys):
    argv = ["evaluate", *SMALL, "--config", 'skip=off,passes=["layer_skip"]']  # 0.2 x 4 layers skips none
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "layer_skip acted on 0 graph(s) (not on " in printed and "skips no layer" in printed


# On the 4-layer model, which answers in seconds (evaluate's own default is the 10-layer one).
SMALL = ["--model", "default", "--prompts", "1", "--images-per-prompt", "1", "--questions", "1", "--steps", "3",
         "--no-progress", "--resamples", "100"]


def test_strict_mode_names_the_pass_that_does_not_apply(tmp_path, capsys):
    """strict=True raises inside torch.compile; the command reports it as a user's error, and writes nothing."""
    out = tmp_path / "eval.json"
    # On the embedded model's 4 layers, layer_skip's default ratio 0.2 skips no layer.
    argv = ["evaluate", *SMALL, "--config", 'skip=off,passes=["layer_skip"],strict=true', "--json", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == ("flashu-compile evaluate: error: flashu pass 'layer_skip' does not apply: "
                   "int(4 layers x skip_ratio 0.2) skips no layer\n"), err
    assert not out.exists()


def test_a_tensorrt_lowering_needs_torch_tensorrt_before_the_model_loads(no_model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # `import torch_tensorrt` fails, installed or not
    assert main(["evaluate", "--lowering", "tensorrt"]) == 2
    assert ("error: configuration 'off': lowering 'tensorrt' cannot be used on this machine: torch-tensorrt is not "
            "installed") in capsys.readouterr().err


def test_ctrl_c_while_scoring_leaves_no_report(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "eval.json"
    monkeypatch.setattr(evaluate_tool, "evaluate", interrupted)
    assert main(["evaluate", *SMALL, "--config", "off=off", "--json", str(out)]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error, status", [(OSError(28, "No space left on device"), 2), (KeyboardInterrupt(), 130)])
def test_a_report_cut_short_leaves_the_previous_one(error, status, tmp_path, write_fails_midway, capsys):
    out = tmp_path / "eval.json"
    out.write_text('{"previous": "report"}')
    write_fails_midway("eval.json", error)
    assert main(["evaluate", *SMALL, "--config", "off=off", "--json", str(out), "--no-resume"]) == status
    assert "Traceback" not in capsys.readouterr().err
    assert out.read_text() == '{"previous": "report"}' and [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def _scored_by(monkeypatch) -> list[str]:
    """The names of the configurations the command scores from now on, in order (each still scored)."""
    calls, score = [], evaluate_tool.evaluate

    def counted(*args, **kwargs):
        calls.append(kwargs["label"])
        return score(*args, **kwargs)

    monkeypatch.setattr(evaluate_tool, "evaluate", counted)
    return calls


def _tables(printed: str) -> str:
    return printed[printed.index("| configuration |"):printed.index("\n-> ")]


TWO = ["--config", "off=off", "--config", "same=off"]
SKIP = ["--config", 'skip=off,passes=["layer_skip"],skip_ratio=0.5']


def test_a_second_run_takes_every_configuration_from_the_report(tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval.json"
    argv = ["evaluate", *SMALL, *TWO, "--json", str(out)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert list(report["configurations"]) == ["off", "same"] and report["pending"] == []
    assert report["settings"] == {"model": "default", "tokenizer": None, "vae": None, "prompts": 1,
                                  "images_per_prompt": 1, "questions": 1, "steps": 3, "guidance": 1.0, "seed": 0,
                                  "batch": 10, "split": "test"}

    def fails(*args, **kwargs):
        raise AssertionError("a configuration already in the report was computed again")

    monkeypatch.setattr(evaluate_tool, "evaluate", fails)
    monkeypatch.setattr(common, "load_model", fails)  # nothing to compute, so no model either
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert f"resuming {out}: 2 of 2 configuration(s) scored there with the same options" in again
    assert again.count(f"taken from {out}: GenEval-like overall") == 2
    assert _tables(again) == _tables(first)
    assert json.loads(out.read_text())["results"] == report["results"]


def test_a_resumed_run_scores_only_what_the_report_lacks(tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", *SMALL, *TWO, "--json", str(out)]) == 0
    capsys.readouterr()
    scored = _scored_by(monkeypatch)
    # A new configuration between the two: the tables follow the command line's order.
    assert main(["evaluate", *SMALL, "--config", "off=off", *SKIP, "--config", "same=off", "--json", str(out)]) == 0
    assert scored == ["skip"]
    printed = capsys.readouterr().out
    assert "2 of 3 configuration(s) scored there" in printed and "| skip |" in printed
    report = json.loads(out.read_text())
    assert list(report["configurations"]) == list(report["comparison"]["scores"]) == ["off", "skip", "same"]
    # Changed options are scored again; a configuration left off the command line leaves the report.
    assert main(["evaluate", *SMALL, "--config", "off=off", "--config", 'same=off,passes=["layer_skip"]',
                 "--json", str(out)]) == 0
    assert scored == ["skip", "same"]
    assert "not on this command line, so left out of it: skip" in capsys.readouterr().out
    assert list(json.loads(out.read_text())["configurations"]) == ["off", "same"]


def test_the_report_is_rewritten_after_each_configuration(tmp_path, monkeypatch, capsys):
    """An interruption loses only the configuration in progress: the next run takes the others from the report."""
    out = tmp_path / "eval.json"
    score = evaluate_tool.evaluate

    def interrupted_at_same(*args, **kwargs):
        if kwargs["label"] == "same":
            raise KeyboardInterrupt
        return score(*args, **kwargs)

    monkeypatch.setattr(evaluate_tool, "evaluate", interrupted_at_same)
    assert main(["evaluate", *SMALL, *TWO, "--json", str(out)]) == 130
    report = json.loads(out.read_text())
    assert list(report["configurations"]) == ["off"] and report["pending"] == ["same"]
    assert list(report["comparison"]["scores"]) == ["off"]
    monkeypatch.setattr(evaluate_tool, "evaluate", score)
    scored = _scored_by(monkeypatch)
    assert main(["evaluate", *SMALL, *TWO, "--json", str(out)]) == 0
    assert scored == ["same"] and json.loads(out.read_text())["pending"] == []


def test_a_report_of_other_settings_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", *SMALL, "--config", "off=off", "--json", str(out)]) == 0
    before = out.read_text()
    monkeypatch.setattr(common, "load_model", lambda args: pytest.fail("the model loaded"))
    argv = ["evaluate", *SMALL, "--config", "off=off", "--json", str(out), "--steps", "4"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"flashu-compile evaluate: error: --json {str(out)!r} holds results of other run settings (steps: 3 there, "
        "4 here): give another --json path, delete the file or pass --no-resume to replace it\n")
    assert out.read_text() == before


@pytest.mark.parametrize("text, message", [
    ("{not json", r"is not a report to resume \(Expecting property name"),
    ('["a list"]', r"is not a report to resume \(it lacks a JSON object\)"),
    ('{"previous": "report"}', r"is not a report to resume \(it lacks 'settings'\)"),
    ('{"settings": {}, "configurations": {"off": {}}, "results": {}, "seconds": {}, "techniques": {}, "did": {}}',
     r"\(it lacks results\['off'\]\)"),
    ('{"settings": {}, "configurations": {"off": {}}, "results": {"off": {}}, "seconds": {"off": 1}, '
     '"techniques": {"off": {}}, "did": {"off": []}}', r"\(it lacks results\['off'\]\['geneval'\]\)"),
])
def test_a_file_that_is_not_a_report_is_refused_before_the_model_loads(text, message, tmp_path, no_model, capsys):
    out = tmp_path / "eval.json"
    out.write_text(text)
    assert main(["evaluate", *SMALL, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.endswith("delete the file or pass --no-resume to replace it\n"), err


def test_no_resume_scores_every_configuration_again(tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval.json"
    out.write_text("{not json")  # ignored, then replaced
    assert main(["evaluate", *SMALL, "--config", "off=off", "--json", str(out), "--no-resume"]) == 0
    scored = _scored_by(monkeypatch)
    assert main(["evaluate", *SMALL, *TWO, "--json", str(out), "--no-resume"]) == 0
    assert scored == ["off", "same"] and "taken from" not in capsys.readouterr().out
    assert list(json.loads(out.read_text())["configurations"]) == ["off", "same"]


def test_a_configuration_may_sample_with_its_own_steps_and_solver(tmp_path, monkeypatch, capsys):
    """steps and solver beside the flashu options reach the sampler (paired comparisons across step counts),
    and are recorded with the configuration, so a resumed run tells them apart."""
    from flashu_compile.tools import evaluate as tool

    seen = []
    score = tool.evaluate

    def spy(model, *args, **kwargs):
        seen.append((args[2], kwargs["solver"]))
        return score(model, *args, **kwargs)

    monkeypatch.setattr(tool, "evaluate", spy)
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", "default", "--prompts", "1", "--images-per-prompt", "1", "--questions", "1",
                 "--steps", "3",
                 "--config", "off=off", "--config", 'heun2=off,steps=2,solver="heun"', "--json", str(out),
                 "--no-progress", "--resamples", "100"]) == 0
    assert seen == [(3, "euler"), (2, "heun")]
    assert json.loads(out.read_text())["configurations"]["heun2"] == {"preset": "off", "steps": 2, "solver": "heun",
                                                                       "lowering": "eager"}


def test_the_validation_split_is_scored_recorded_and_not_resumed_as_test(tmp_path, monkeypatch, capsys):
    """--split validation reaches the scorer and the report's run settings, so a test-split report is never
    resumed as a validation run."""
    from flashu_compile.tools import evaluate as tool

    seen, score = [], tool.evaluate

    def spy(model, *args, **kwargs):
        seen.append(kwargs["split"])
        return score(model, *args, **kwargs)

    monkeypatch.setattr(tool, "evaluate", spy)
    out = tmp_path / "eval.json"
    assert main(["evaluate", *SMALL, "--config", "off=off", "--json", str(out), "--split", "validation"]) == 0
    assert seen == ["validation"] and json.loads(out.read_text())["settings"]["split"] == "validation"
    assert "1 validation captions" in capsys.readouterr().out
    assert main(["evaluate", *SMALL, "--config", "off=off", "--json", str(out)]) == 2
    assert "(split: 'validation' there, 'test' here)" in capsys.readouterr().err
    # A report from before the split setting existed scored the test split, and resumes as such.
    report = json.loads(out.read_text())
    del report["settings"]["split"]
    out.write_text(json.dumps(report))
    scored = _scored_by(monkeypatch)
    assert main(["evaluate", *SMALL, "--config", "off=off", "--json", str(out)]) == 0
    assert scored == [] and "taken from" in capsys.readouterr().out
    assert main(["evaluate", *SMALL, "--config", "off=off", "--json", str(out), "--split", "validation"]) == 2
