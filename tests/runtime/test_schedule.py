"""Step rules, with the expected steps written out by hand from the method description."""

import pytest

from flashu_compile.runtime.schedule import StepRules, guidance_scales


def _steps(pred, calls):
    return [s for s in range(1, calls + 1) if pred(s)]


def test_full_phase_reference_counts_grid_points():
    # Public code: 35 grid points, tau 11 -> full when step > 24, the last 10 of 34 calls.
    rules = StepRules("flashu-reference", hybrid_tau=11)
    assert _steps(lambda s: rules.full_phase(s, 34), 34) == list(range(25, 35))
    # Project: the last tau model calls.
    assert _steps(lambda s: StepRules("project", hybrid_tau=11).full_phase(s, 34), 34) == list(range(24, 35))
    assert _steps(lambda s: StepRules("project", hybrid_tau=0).full_phase(s, 34), 34) == []


def test_recalculation_steps():
    rules = StepRules(skip_interval=10)
    assert _steps(rules.recalculate, 34) == [1, 11, 21, 31]


def test_head_cache_actions():
    ref = StepRules("flashu-reference", cache_interval=5)
    actions, have = [], False
    for step in range(1, 12):
        action = ref.head_action(step, have)
        have = have or action == "store"
        actions.append(action)
    assert actions == ["compute"] * 4 + ["store"] + ["reuse"] * 4 + ["store", "reuse"]
    project = StepRules("project", cache_interval=5)
    actions = [project.head_action(step, step > 1) for step in range(1, 12)]
    assert actions == ["store"] + ["reuse"] * 4 + ["store"] + ["reuse"] * 4 + ["store"]
    assert project.head_action(3, False) == "store"  # nothing cached (e.g. after a phase change)


def test_guidance_schedules():
    schedule = ((24, 7.5), (11, 10.0))
    ref = guidance_scales(schedule, 34, 5.0, "flashu-reference")
    assert ref == [7.5] * 24 + [10.0] * 10
    assert guidance_scales(schedule, 40, 5.0, "flashu-reference")[-5:] == [5.0] * 5  # past the schedule
    stretched = guidance_scales(schedule, 49, 5.0)
    assert len(stretched) == 49 and stretched.count(10.0) == 15  # 11/35 of 49 calls, rounded
    assert guidance_scales(None, 3, 4.0) == [4.0] * 3


@pytest.mark.parametrize("schedule, message", [
    (((24, float("nan")),), r"guidance_schedule\[0\] scale must be a finite number"),
    (((2.7, 7.5),), r"guidance_schedule\[0\] steps must be an int, got float 2.7"),
    (((True, 7.5),), r"guidance_schedule\[0\] steps must be an int, got bool"),
    ((("3", 7.5),), r"guidance_schedule\[0\] steps must be an int, got str"),
])
def test_guidance_scales_refuse_what_options_refuse(schedule, message):
    """The schedule was coerced with int() and float(): 2.7 / True / "3" became 2 / 1 / 3, NaN stayed NaN."""
    with pytest.raises(ValueError, match=message):
        guidance_scales(schedule, 10, 5.0)
