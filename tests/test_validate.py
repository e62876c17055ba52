"""The number checks every public argument goes through."""

import math

import numpy as np
import pytest

from flashu_compile.validate import check_float, check_int, check_schedule, check_text


@pytest.mark.parametrize("value", [3, np.int64(3), np.uint8(3), np.int32(3)])
def test_ints_and_numpy_ints_are_ints(value):
    out = check_int("n", value, 1, 5)
    assert out == 3 and type(out) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), 3.0, "3", None, np.float64(3.0), [3]])
def test_everything_else_is_not_an_int(value):
    with pytest.raises(ValueError, match=f"^n must be an int, got {type(value).__name__} "):
        check_int("n", value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.float32("nan"), np.float64("inf")])
def test_non_finite_floats_are_refused(value):
    with pytest.raises(ValueError, match="^scale must be a finite number, got"):
        check_float("scale", value, 0.0)


def test_float_bounds_and_their_message():
    assert check_float("x", 0, 0.0, 1.0, high_open=True) == 0.0 and type(check_float("x", np.float32(0.5))) is float
    with pytest.raises(ValueError, match=r"^x must be in \[0, 1\), got 1.0$"):
        check_float("x", 1.0, 0.0, 1.0, high_open=True)
    with pytest.raises(ValueError, match=r"^x must be > 0, got 0.0$"):
        check_float("x", 0.0, 0.0, low_open=True)
    with pytest.raises(ValueError, match=r"^x must be a number, got bool False$"):
        check_float("x", False)


def test_schedules():
    assert check_schedule("s", None) is None
    assert check_schedule("s", [[np.int64(2), 3]]) == ((2, 3.0),)
    for bad, message in (("ab", "must be None or a non-empty list"),
                         ([(1, 2, 3)], r"s\[0\] must be a \(steps, scale\)"),
                         ([(1, -1.0)], r"s\[0\] scale must be in \[0, 1000\]"),
                         ([(0, 1.0)], r"s\[0\] steps must be")):
        with pytest.raises(ValueError, match=message):
            check_schedule("s", bad)


def test_text():
    assert check_text("q", "what?") == "what?"
    for bad in ("", " \n", None, b"what"):
        with pytest.raises(ValueError, match="^q must"):
            check_text("q", bad)
