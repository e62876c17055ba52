import argparse
import json
import shutil

import numpy as np
import pytest
import torch

from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.checkpoint import CheckpointError
from flashu_compile.models.showo2.embedded import verify_checksums
from flashu_compile.models.showo2.sampling import shift_time
from flashu_compile.scenes.dataset import KINDS, Obj, Scene
from research.scenes import train as train_module
from research.scenes.train import (
    ANSWERS_FROM,
    RECIPES,
    grid_position_table,
    kind_mix,
    main,
    parse_kind_weights,
    relation_captions,
    run_recipe,
    train,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "weights"
    log = train(steps=6, out=out, batch=4, answer_batch=4, answers_from=0)
    return out, log


def test_short_run_writes_loadable_verified_weights(trained):
    out, log = trained
    assert log["steps"] >= 1 and len(log["flow"]) == log["steps"] == len(log["ntp"])
    verify_checksums(out)
    model = Showo2.from_pretrained(str(out))
    assert model.tokenizer is not None and model.codec is not None  # scene tokenizer and pixel codec
    assert (out.parent / "weights-losses.png").stat().st_size > 1000


def test_tampered_weights_fail_the_checksum(trained, tmp_path):
    out = tmp_path / "weights"
    shutil.copytree(trained[0], out)  # the module's run stays intact for the tests after this one
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="checksum mismatch for .*model.safetensors"):
        verify_checksums(out)


def test_an_answer_only_run_logs_only_the_answer_loss(tmp_path):
    log = train(steps=3, out=tmp_path / "weights", batch=0, answer_batch=4)
    assert log["steps"] >= 1 and log["flow"] == [] and len(log["ntp"]) == log["steps"]
    with pytest.raises(ValueError, match="not both 0"):
        train(steps=2, out=tmp_path / "none", batch=0, answer_batch=0)


def test_the_position_table_tells_every_cell_apart_by_row_and_column():
    table = grid_position_table(8, 96).reshape(8, 8, 96)
    rows, cols = table[..., :48], table[..., 48:]
    assert torch.equal(rows, rows[:, :1].expand_as(rows)) and torch.equal(cols, cols[:1].expand_as(cols))
    flat = table.reshape(64, 96)
    distances = torch.cdist(flat, flat) + torch.eye(64) * 1e9
    assert distances.min() > 1.0
    with pytest.raises(ValueError, match="divisible by 4"):
        grid_position_table(8, 98)


def test_a_fresh_run_starts_from_the_grid_position_table(trained):
    out, log = trained
    assert log["ema_decay"] > 0
    table = Showo2.from_pretrained(str(out)).position_embedding.weight
    # A few steps at a small learning rate move it only a little from where it started.
    assert torch.allclose(table, grid_position_table(8, table.shape[1]), atol=0.05)


def test_kind_weights_repeat_each_kind_and_reject_bad_input():
    assert kind_mix(None) == KINDS
    assert kind_mix(parse_kind_weights("single=1, relation=2,count=0")) == ("single", "relation", "relation")
    with pytest.raises(ValueError, match="unknown scene kinds \\['pairs'\\]"):
        kind_mix({"pairs": 1})
    with pytest.raises(ValueError, match="not all 0"):
        kind_mix({"single": 0})
    with pytest.raises(argparse.ArgumentTypeError, match="KIND=WEIGHT"):
        parse_kind_weights("relation:2")


def test_shifted_training_times_lean_towards_noise_as_the_sampler_grid_does():
    s = torch.sigmoid(torch.randn(10_000, generator=torch.Generator().manual_seed(0)))
    shifted = shift_time(s, 3.0)
    assert torch.allclose(shift_time(s, 1.0), s)
    assert bool((shifted <= s).all())
    # Half the sampler's 50-point grid lies below t = 0.25; unshifted training puts a seventh of its times there.
    assert float((shifted < 0.25).float().mean()) > 0.4 > float((s < 0.25).float().mean())


def test_train_options_are_recorded_in_the_log(tmp_path):
    log = train(steps=2, out=tmp_path / "weights", batch=2, answer_batch=2, time_shift=2.0,
                kind_weights={"relation": 1})
    assert log["time_shift"] == 2.0
    assert log["kinds"] == {"single": 0, "relation": 1, "count": 0}
    assert log["answer_kinds"] == log["kinds"]  # the answer rows follow --kinds unless told otherwise


def record_scenes(monkeypatch) -> dict[str, list]:
    """Per task, the scenes of each step's rows, recorded as the trainer hands them to its losses."""
    from research.scenes import train as train_module

    seen = {"flow": [], "answer": []}
    for name, task in (("flow_loss", "flow"), ("answer_loss", "answer")):
        loss = getattr(train_module, name)

        def recording(model, tok, scenes, *args, loss=loss, task=task):
            seen[task].append(list(scenes))
            return loss(model, tok, scenes, *args)

        monkeypatch.setattr(train_module, name, recording)
    return seen


def test_by_default_both_tasks_read_the_same_scenes(tmp_path, monkeypatch):
    seen = record_scenes(monkeypatch)
    train(steps=2, out=tmp_path / "weights", batch=3, answer_batch=2, answers_from=0)
    assert seen["flow"] and [scenes[:2] for scenes in seen["flow"]] == seen["answer"]


def test_each_task_draws_its_own_kind_mix(tmp_path, monkeypatch):
    seen = record_scenes(monkeypatch)
    log = train(steps=2, out=tmp_path / "weights", batch=3, answer_batch=3, kind_weights={"count": 1},
                answer_kind_weights={"relation": 2}, answers_from=0)
    kinds = {task: {s.kind for scenes in steps for s in scenes} for task, steps in seen.items()}
    assert kinds == {"flow": {"count"}, "answer": {"relation"}}
    assert log["answer_kinds"] == {"single": 0, "relation": 2, "count": 0}


def test_answer_rows_join_after_the_stated_fraction_of_the_budget(tmp_path, monkeypatch):
    seen = record_scenes(monkeypatch)
    log = train(steps=40, out=tmp_path / "weights", batch=2, answer_batch=2, answers_from=0.5)
    first = log["answers_from_step"]
    # Half of 40 steps are text-to-image only; the rest answer too.
    assert first == 20
    assert len(seen["flow"]) == log["steps"] == len(log["flow"])
    assert len(seen["answer"]) == len(log["ntp"]) == log["steps"] - first
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="answers_from must be in"):
            train(steps=2, out=tmp_path / "bad", batch=2, answer_batch=2, answers_from=bad)
    with pytest.raises(ValueError, match="needs both batch sizes"):
        train(steps=2, out=tmp_path / "bad", batch=0, answer_batch=2, answers_from=0.5)
    assert train(steps=2, out=tmp_path / "one task", batch=0, answer_batch=2)["answers_from"] == 0
    assert train(steps=2, out=tmp_path / "both", batch=2, answer_batch=2)["answers_from"] == ANSWERS_FROM


def test_relation_images_are_captioned_in_reading_order_for_the_stated_fraction_of_the_budget(tmp_path, monkeypatch):
    seen = record_scenes(monkeypatch)
    log = train(steps=40, out=tmp_path / "weights", batch=4, answer_batch=0, kind_weights={"relation": 1},
                reading_order_until=0.5)
    assert log["reading_order_until"] == 0.5
    captions = [[s.relation for s in scenes] for scenes in seen["flow"]]
    # The first half of the steps: reading order only. The steps after it see all four words.
    assert all(set(step) <= {"left of", "above"} for step in captions[:20])
    assert {r for step in captions for r in step} == {"left of", "right of", "above", "below"}
    assert log["steps"] == 40 and len(log["flow"]) == 40
    with pytest.raises(ValueError, match="reading_order_until must be in"):
        train(steps=2, out=tmp_path / "bad", batch=2, answer_batch=0, reading_order_until=1.5)


def test_relation_captions_keep_images_and_leave_other_kinds_alone():
    scenes = [Scene((Obj("circle", "red", 26, 16), Obj("square", "blue", 6, 16)), "right of"),
              Scene((Obj("circle", "red", 16, 6),)),
              Scene((Obj("circle", "red", 16, 26), Obj("square", "blue", 16, 6)), "below")]
    assert relation_captions(scenes, reading_order=False) == scenes
    restated = relation_captions(scenes, reading_order=True)
    assert [s.caption for s in restated] == ["a blue square left of a red circle", "a red circle",
                                             "a blue square above a red circle"]
    assert all(np.array_equal(a.render(), b.render()) for a, b in zip(scenes, restated, strict=True))


def test_the_scenes_10_recipe_is_the_shipped_model_s_run():
    """The recipe's options are those its weights' training log records (the last stage's; the first stage's
    model size is the shipped config's)."""
    from pathlib import Path

    from flashu_compile.models.showo2.embedded import EMBEDDED

    log = json.loads((Path(EMBEDDED["scenes-10"]) / "training.json").read_text())
    first, last = RECIPES["scenes-10"]
    assert first["num_layers"] == log["config"]["llm"]["num_hidden_layers"] == 10
    assert (log["steps"], log["batch"], log["answer_batch"], log["answer_weight"], log["lr"], log["answers_from"],
            log["reading_order_until"]) == (last["steps"], last["batch"], last["answer_batch"], last["answer_weight"],
                                            last["lr"], last["answers_from"], last["reading_order_until"])
    weights = last["answer_kind_weights"]
    assert log["answer_kinds"] == {kind: weights[kind] for kind in KINDS}


def test_a_recipe_trains_its_stages_in_order_and_continues_where_it_stopped(tmp_path, monkeypatch):
    stages = ({"steps": 2, "num_layers": 2, "batch": 2, "answer_batch": 2},
              {"steps": 3, "batch": 2, "answer_batch": 2, "lr": 1e-4, "answers_from": 0.0})
    monkeypatch.setitem(RECIPES, "toy", stages)
    out = tmp_path / "toy"
    log = run_recipe("toy", out)
    first = json.loads((tmp_path / "toy-stage1" / "training.json").read_text())
    assert first["steps"] == 2 and first["config"]["llm"]["num_hidden_layers"] == 2 and first["init_from"] is None
    assert log["steps"] == 3 and log["lr"] == 1e-4 and log["init_from"] == str(tmp_path / "toy-stage1")
    # The second stage continued the first's 2-layer model.
    assert Showo2.from_pretrained(str(out)).config.llm.num_hidden_layers == 2
    # Run again: both stages' weights are there, nothing trains; with the last stage lost, only it trains.
    calls = []
    monkeypatch.setattr(train_module, "train", lambda **kw: calls.append(kw) or {"steps": kw["steps"]})
    run_recipe("toy", out)
    assert calls == []
    (out / "training.json").unlink()
    run_recipe("toy", out)
    assert [c["steps"] for c in calls] == [3] and calls[0]["init_from"] == tmp_path / "toy-stage1"
    # A stage whose options changed since its weights were saved trains again.
    calls.clear()
    monkeypatch.setitem(RECIPES, "toy", ({**stages[0], "steps": 4}, stages[1]))
    run_recipe("toy", out)
    assert [c["steps"] for c in calls] == [4, 3]


def test_a_recipe_takes_no_other_training_option(capsys):
    with pytest.raises(SystemExit):
        main(["--recipe", "scenes-10", "--out", "run", "--steps", "5", "--lr", "0.1"])
    assert "--recipe scenes-10 sets every training option itself; drop --steps, --lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--recipe", "scenes-10"])  # without --out it would write beside the shipped weights
    assert "--recipe scenes-10 needs --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--recipe", "nonesuch"])
    assert "invalid choice: 'nonesuch'" in capsys.readouterr().err
