"""Fuzzing what lies on disk: random corruptions of plan folders and checkpoint folders.

Each example damages a freshly written folder once: a truncated file, a flipped byte, a missing file,
stale files of another save, a JSON value of the wrong type, a bad shard index. Every outcome is a
correct load (the same plan, or bit-identical weights) or a PlanError / CheckpointError naming the
problem; never another exception, never other weights. An edit re-signed with a fresh digest (as a
tool that rewrites files would) may load, but only with the stored tensors unchanged.
"""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashu_compile.calibrate import Plan, PlanError
from flashu_compile.calibrate.plan import _meta_digest, decoder_layers
from flashu_compile.files import CHECKSUMS, write_checksums
from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.checkpoint import CheckpointError

from ..conftest import small_config

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

WRONG_VALUES = [None, True, -1, 2.5, "x", [], {}, [1, "a"], {"a": 1}, "../model.safetensors"]


@st.composite
def corruptions(draw, names: list[str], stale: list[tuple[str, str]]):
    """One damage to a folder holding ``names``: ``(kind, file, argument)``; ``stale`` lists the files of
    another save that may be left behind, as (its name, the name it is left under)."""
    kind = draw(st.sampled_from(["truncate", "flip", "delete", "stale", "retype", "retype-signed"]))
    if kind == "stale":
        source, name = draw(st.sampled_from(stale))
        return kind, name, source
    jsons = [n for n in names if n.endswith(".json")]
    name = draw(st.sampled_from(jsons if kind.startswith("retype") else names))
    if kind in ("truncate", "flip"):
        return kind, name, (draw(st.floats(0, 1, exclude_max=True)), draw(st.integers(1, 255)))
    if kind == "delete":
        return kind, name, None
    return kind, name, (draw(st.integers(0, 1000)), draw(st.sampled_from(WRONG_VALUES)))


def _retype(value, choice: int, wrong):
    """Replace one value somewhere in a JSON document (picked by ``choice``) with ``wrong``."""
    slots = []

    def walk(node):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            slots.append((node, key))
            walk(child)

    walk(value)
    if not slots:
        return wrong
    node, key = slots[choice % len(slots)]
    node[key] = wrong
    return value


def damage(folder: Path, corruption, stale_from: Path, sign) -> None:
    kind, name, arg = corruption
    file = folder / name
    if kind == "truncate":
        data = file.read_bytes()
        file.write_bytes(data[:int(arg[0] * len(data))])
    elif kind == "flip":
        data = bytearray(file.read_bytes())
        if data:
            data[int(arg[0] * len(data))] ^= arg[1]
        file.write_bytes(bytes(data))
    elif kind == "delete":
        file.unlink()
    elif kind == "stale":
        shutil.copyfile(stale_from / arg, file)
    else:
        file.write_text(json.dumps(_retype(json.loads(file.read_text()), *arg)))
        if kind == "retype-signed":
            sign(folder, file)


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- plans
def _tiny_plan(model, seed: int) -> Plan:
    layers = decoder_layers(model)
    sizes = [layer.mlp.gate_proj.out_features for _, layer in layers]
    gen = torch.Generator().manual_seed(seed)
    keep = {task: [torch.randperm(size, generator=gen)[:size // 2].sort().values for size in sizes]
            for task in ("t2i", "mmu")}
    scores = {task: [torch.rand(size, generator=gen, dtype=torch.float64) for size in sizes] for task in keep}
    return Plan.for_model(model, keep, scores, {"prune_ratio": 0.5, "multiple": 8})


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    model = Showo2.random(small_config(), seed=2)
    root = tmp_path_factory.mktemp("plans")
    plan = _tiny_plan(model, 0)
    plan.save(root / "plan")
    other = _tiny_plan(model, 1)
    other.save(root / "other")
    return model, plan, root


def _sign_plan(folder: Path, file: Path) -> None:
    meta = json.loads(file.read_text())
    if isinstance(meta, dict):
        meta["meta_sha256"] = _meta_digest(meta)
        file.write_text(json.dumps(meta))


@FAST
@given(data=st.data())
def test_damaged_plan_folders_load_right_or_raise_plan_error(plans, data):
    model, plan, root = plans
    names = _files(root / "plan")
    corruption = data.draw(corruptions(names, stale=[(n, n) for n in names] + [(names[-1], "old.safetensors")]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "plan"
        shutil.copytree(root / "plan", folder)
        damage(folder, corruption, root / "other", _sign_plan)
        for against in (None, model):
            try:
                loaded = Plan.load(folder, model=against)
            except PlanError as err:
                assert str(err)
                continue
            if corruption[0] == "retype-signed":  # an edit, not damage: the stored keep sets are unchanged
                assert all(torch.equal(a, b) for t in plan.tasks for a, b in
                           zip(loaded.keep[t], plan.keep[t], strict=True))
            else:
                assert loaded == plan, corruption


# ----------------------------------------------------------------------------- checkpoints
LAYOUTS = {"single": {}, "sharded": {"max_shard_bytes": 40_000}, "bin": {"format": "bin", "max_shard_bytes": 60_000}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    model = Showo2.random(small_config(num_layers=1), seed=4)
    other = Showo2.random(small_config(num_layers=1), seed=5)
    root = tmp_path_factory.mktemp("checkpoints")
    for layout, kwargs in LAYOUTS.items():
        model.save_pretrained(root / layout, **kwargs)
        other.save_pretrained(root / f"{layout}-other", **kwargs)
    return model, root


def _sign_checkpoint(folder: Path, file: Path) -> None:
    write_checksums(folder)


@FAST
@given(data=st.data(), layout=st.sampled_from(sorted(LAYOUTS)), listed=st.booleans())
def test_damaged_checkpoint_folders_load_right_or_raise_checkpoint_error(checkpoints, data, layout, listed):
    """``listed``: the folder keeps its SHA256SUMS; without it (as official checkpoints come) flipped
    bytes inside tensor data cannot be told from weights, so only the structural damages apply there."""
    model, root = checkpoints
    names = [n for n in _files(root / layout) if listed or n != CHECKSUMS]
    others = [n for n in _files(root / f"{layout}-other") if n.endswith((".safetensors", ".bin", ".index.json"))]
    weights = [n for n in others if not n.endswith(".json")]
    stale = ([(n, n) for n in others] + [(n, n.replace("00001", "00007")) for n in others if "-of-" in n]
             + [(weights[0], f"model-00009-of-00009.{weights[0].rsplit('.', 1)[1]}")])
    if not listed:  # without a listing, another save's file under a current name is just its content
        stale = [(source, name) for source, name in stale if name not in names]
    corruption = data.draw(corruptions(names, stale=stale))
    if not listed:
        # Re-signing is meaningless without a listing; a flip lands in tensor data undetectably.
        corruption = (corruption[0].replace("-signed", ""), *corruption[1:])
        if corruption[0] == "flip":
            corruption = ("truncate", *corruption[1:])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / layout
        shutil.copytree(root / layout, folder)
        if not listed:
            (folder / CHECKSUMS).unlink()
        damage(folder, corruption, root / f"{layout}-other", _sign_checkpoint)
        try:
            loaded = Showo2.from_pretrained(folder)
        except CheckpointError as err:
            assert str(err)
            return
    want, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want), corruption
