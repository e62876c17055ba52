"""Step rules, with the expected steps written out by hand from the method description."""

import pytest

from flashu_compile.options import PAPER_GUIDANCE, PRESETS, FlashUOptions
from flashu_compile.runtime.schedule import RelativeSchedule, StepRules, check_guidance_schedule, guidance_scales


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


def test_the_paper_schedule_is_relative_and_equals_the_public_one_at_s0_10():
    """0.75 s0 for the first 70% of the calls, s0 after; at 35 grid points (34 calls) 70% rounds to 24 calls."""
    assert PRESETS["paper"]["guidance_schedule"] == PRESETS["flashu-reference"]["guidance_schedule"] == PAPER_GUIDANCE
    public = guidance_scales(((24, 7.5), (11, 10.0)), 34, 10.0, "flashu-reference")
    for semantics in ("project", "flashu-reference"):
        assert guidance_scales(PAPER_GUIDANCE, 34, 10.0, semantics) == public == [7.5] * 24 + [10.0] * 10
    # The request's guidance is s0: the official 7.5 gives 5.625 then 7.5, and guidance 1 gives 0.75 then 1.
    assert guidance_scales(PAPER_GUIDANCE, 34, 7.5) == [5.625] * 24 + [7.5] * 10
    assert guidance_scales(PAPER_GUIDANCE, 34, 1.0) == [0.75] * 24 + [1.0] * 10


def test_a_relative_schedule_stretches_over_any_number_of_calls():
    # 50 grid points: 49 calls, 70% of which is 34.3 -> 34 at 0.75 s0, the last 15 at s0.
    assert guidance_scales(PAPER_GUIDANCE, 49, 4.0) == [3.0] * 34 + [4.0] * 15
    assert guidance_scales(PAPER_GUIDANCE, 1, 4.0) == [3.0]  # round(0.7) = 1: the only call is early
    assert guidance_scales(PAPER_GUIDANCE, 0, 4.0) == []
    thirds = RelativeSchedule(((1 / 3, 0.0), (1 / 3, 1.0), (1 / 3, 2.0)))  # fractions summing to 1 only within 1e-6
    assert guidance_scales(thirds, 9, 5.0) == [0.0] * 3 + [5.0] * 3 + [10.0] * 3
    assert guidance_scales(thirds, 10, 5.0) == [0.0] * 3 + [5.0] * 4 + [10.0] * 3
    assert guidance_scales(RelativeSchedule(((1.0, 1.0),)), 7, 2.5) == [2.5] * 7  # the identity schedule
    with pytest.raises(ValueError, match=r"guidance 600 x 2 \(segment 2\) must be"):
        guidance_scales(thirds, 9, 600.0)  # 2 s0 beyond the largest guidance


def test_both_forms_are_accepted_as_options_and_told_apart():
    relative = FlashUOptions.from_dict({"guidance_schedule": {"relative": [[0.7, 0.75], [0.3, 1]]}})
    assert relative.guidance_schedule == PAPER_GUIDANCE and hash(relative)  # normalised, so hashable
    assert FlashUOptions(guidance_schedule={"relative": [(1, 1)]}).guidance_schedule == RelativeSchedule(((1.0, 1.0),))
    absolute = FlashUOptions.from_dict({"preset": "paper", "guidance_schedule": [[24, 7.5], [11, 10.0]]})
    assert absolute.guidance_schedule == ((24, 7.5), (11, 10.0))  # overrides the preset's relative schedule
    assert FlashUOptions.from_dict({"preset": "paper", "guidance_schedule": None}).guidance_schedule is None


@pytest.mark.parametrize("schedule, message", [
    ({"relative": [[0.7, 0.75]]}, r"\['relative'\]: the fractions of the calls must sum to 1, got 0.7"),
    ({"relative": [[0.7, 0.75], [0.4, 1.0]]}, r"must sum to 1, got 1.1 \(0.7 \+ 0.4\)"),
    ({"relative": [[0.0, 0.75], [1.0, 1.0]]}, r"\['relative'\]\[0\] fraction of the calls must be in \(0, 1\]"),
    ({"relative": [[1.0, -1.0]]}, r"\[0\] multiple of the guidance must be in \[0, "),
    ({"relative": [[1.0, float("nan")]]}, r"\[0\] multiple of the guidance must be a finite number"),
    ({"relative": [[1.0, True]]}, r"\[0\] multiple of the guidance must be a (finite )?(real )?number"),
    ({"relative": []}, r"\['relative'\] must be a non-empty list of \(fraction of the calls, multiple"),
    ({"relative": "0.7,0.75"}, r"must be a non-empty list"),
    ({"relative": [[0.7, 0.75, 1]]}, r"\[0\] must be a \(fraction of the calls, multiple of the guidance\) pair"),
    ({"relative": [[1, 1]], "absolute": []}, r"as a mapping must be \{'relative': .*got keys"),
    ({"fraction": [[1, 1]]}, r"as a mapping must be \{'relative'"),
    ([[0.7, 0.75], [0.3, 1.0]], r"\[0\] steps must be an int, got float 0.7; for fractions .* give \{'relative'"),
])
def test_bad_schedules_name_what_is_wrong(schedule, message):
    with pytest.raises(ValueError, match=r"option 'guidance_schedule'.*" + message):
        FlashUOptions.from_dict({"guidance_schedule": schedule})
    with pytest.raises(ValueError, match=message):
        check_guidance_schedule("x", schedule)
    with pytest.raises(ValueError, match=message):
        guidance_scales(schedule, 10, 5.0)
