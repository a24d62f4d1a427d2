"""The failover order: the docstring of kemari.roles.failover lists exactly the steps
promote() calls, in the order it calls them."""

from __future__ import annotations

import ast
import inspect
import re

from kemari.roles import failover


def documented_steps() -> list[str]:
    doc = failover.__doc__ or ""
    return re.findall(r"^\d+\. :func:`(\w+)`", doc, re.MULTILINE)


def called_steps() -> list[str]:
    tree = ast.parse(inspect.getsource(failover.promote))
    calls = [
        (node.lineno, node.col_offset, node.func.id)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    ]
    steps = set(documented_steps())
    return [name for _, _, name in sorted(calls) if name in steps]


def test_docstring_lists_every_step_promote_calls_in_order() -> None:
    documented = documented_steps()
    assert len(documented) == 9
    assert called_steps() == documented
    for name in documented:
        assert callable(getattr(failover, name)), name
        assert (getattr(failover, name).__doc__ or "").startswith(
            f"{documented.index(name) + 1}. "
        ), name
