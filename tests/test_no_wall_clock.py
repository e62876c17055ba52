"""No test may depend on the machine's speed: budgets are counted in steps or samples, never in time.

A test that trains or runs "for 0.1 minutes" does less work on a loaded machine and fails at
random there. This check reads every test module and refuses a call given a wall-clock budget.
"""

import ast
from pathlib import Path

WALL_CLOCK_KEYWORDS = {"minutes", "seconds", "time_budget"}


def _wall_clock_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{path}:{node.lineno} {ast.unparse(node.func)}({keyword.arg}=...)"
            for node in ast.walk(tree) if isinstance(node, ast.Call)
            for keyword in node.keywords if keyword.arg in WALL_CLOCK_KEYWORDS]


def test_no_test_gives_a_wall_clock_budget():
    tests = Path(__file__).parent
    found = [hit for path in sorted(tests.rglob("*.py")) for hit in _wall_clock_calls(path)]
    assert not found, "budgets in steps or samples, not time:\n" + "\n".join(found)


def test_the_check_sees_a_wall_clock_budget(tmp_path):
    sample = tmp_path / "test_sample.py"
    sample.write_text("def test_x():\n    train(minutes=0.1, out=None)\n")
    assert _wall_clock_calls(sample) == [f"{sample}:2 train(minutes=...)"]
