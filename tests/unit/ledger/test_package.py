"""The ledger package's public face: cheap to import, its public names, nothing private reached from outside."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import factory_worker
import factory_worker.ledger as ledger_pkg

PACKAGE = Path(factory_worker.__file__).parent


def test_importing_the_package_and_the_fast_paths_modules_loads_no_redis_or_pydantic():
    code = (
        "import sys, factory_worker.ledger, factory_worker.ledger.keys, factory_worker.ledger.records;"
        "print(sorted(m for m in ('redis', 'hiredis', 'pydantic', 'pydantic_settings') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_public_name_is_the_one_its_module_defines():
    assert ledger_pkg.__all__ and {"Ledger", "Keys", "Claim", "LedgerError", "LedgerLostError"} <= set(
        ledger_pkg.__all__
    )
    for name in ledger_pkg.__all__:
        module = importlib.import_module(f"factory_worker.ledger.{ledger_pkg._PUBLIC[name]}")
        assert getattr(ledger_pkg, name) is getattr(module, name)
    assert set(ledger_pkg.__all__) <= set(dir(ledger_pkg))
    with pytest.raises(AttributeError):
        ledger_pkg.NoSuchName  # noqa: B018
    from factory_worker.ledger import Ledger, guard  # a name and a submodule, side by side

    assert Ledger.__module__ == "factory_worker.ledger.core" and guard.__name__ == "factory_worker.ledger.guard"


def _private_ledger_uses(source: str, where: str) -> list[str]:
    """``<...>.ledger._name`` / ``ledger._name``: a private member reached on something called ledger."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        owner = node.value
        name = owner.attr if isinstance(owner, ast.Attribute) else owner.id if isinstance(owner, ast.Name) else ""
        if name == "ledger":
            found.append(f"{where}:{node.lineno}: {name}.{node.attr}")
    return found


def test_no_module_reaches_a_private_member_of_a_ledger():
    found = [
        use
        for path in sorted(PACKAGE.rglob("*.py"))
        for use in _private_ledger_uses(path.read_text(), str(path.relative_to(PACKAGE)))
    ]
    assert found == []


def test_the_check_for_private_members_finds_one():
    assert _private_ledger_uses("def f(self):\n    return self.ledger._write('stage')\n", "x.py") == [
        "x.py:2: ledger._write"
    ]
    assert _private_ledger_uses("def f(ctx):\n    return ctx.ledger.writes.acked('stage')\n", "x.py") == []
