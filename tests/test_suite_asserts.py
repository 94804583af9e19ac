"""Every test can fail: each `test_*` function in tests/ asserts something itself (`assert`,
`pytest.raises`/`pytest.warns`/`pytest.fail`) or calls a helper of the test suite that does.
A test that only runs code proves nothing when it passes; list a reviewed exception in ALLOW."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent
ALLOW: dict = {}        # "file.py::test_name": "why it can fail without an assert"


def _checks(fn: ast.AST) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("raises", "warns", "fail", "assert_allclose", "assert_array_equal",
                                       "assert_equal", "assert_array_almost_equal"):
            return True
    return False


def _called(fn: ast.AST) -> set:
    return {n.func.id if isinstance(n.func, ast.Name) else n.func.attr
            for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))}


def test_every_test_function_can_fail():
    trees = {p: ast.parse(p.read_text(), str(p)) for p in sorted(TESTS.rglob("*.py"))}
    functions = [n for t in trees.values() for n in ast.walk(t) if isinstance(n, ast.FunctionDef)]
    checking = {fn.name for fn in functions if _checks(fn)}
    for _ in range(3):                       # helpers that call asserting helpers (a name asserts if any def of it does)
        checking |= {fn.name for fn in functions if _called(fn) & checking}
    silent = [f"{p.relative_to(TESTS)}::{n.name}" for p, t in trees.items() for n in ast.walk(t)
              if isinstance(n, ast.FunctionDef) and n.name.startswith("test_") and n.name not in checking]
    unexplained = sorted(set(silent) - set(ALLOW))
    assert not unexplained, f"test functions that cannot fail (no assert, no pytest.raises, no asserting helper): {unexplained}"
    stale = sorted(set(ALLOW) - set(silent))
    assert not stale, f"ALLOW lists tests that now assert (remove them): {stale}"
