"""The house's shape: no import cycle between modules, and every room says what it owns and may import."""

from __future__ import annotations

import pkgutil
import sys

import grimp
import pytest

import factory_worker

ROOMS = sorted(m.name for m in pkgutil.iter_modules(factory_worker.__path__) if m.ispkg)


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycle_between_modules():
    """Imports at module level and inside functions count; only ``if TYPE_CHECKING:`` imports do not."""
    graph = grimp.build_graph("factory_worker", exclude_type_checking_imports=True)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    """The check above can fail: two modules importing each other are found."""
    pkg = tmp_path / "cyclic_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyclic_pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from cyclic_pkg import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert _cycles(grimp.build_graph("cyclic_pkg")) == [["cyclic_pkg.a", "cyclic_pkg.b"]]
    finally:
        sys.modules.pop("cyclic_pkg", None)


@pytest.mark.parametrize("room", ROOMS)
def test_every_room_says_what_it_owns_and_may_import(room):
    doc = __import__(f"factory_worker.{room}", fromlist=["_"]).__doc__ or ""
    assert doc.startswith(f"{room}/: "), f"factory_worker/{room}/__init__.py should open with '{room}/: <what it owns>'"
    assert "May import:" in doc, f"factory_worker/{room}/__init__.py should say what it may import"
