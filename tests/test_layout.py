"""The house rules of the package layout: no import circles, no module over 450 lines, no router
type switches outside the routers, tests mirror the package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("haipai_lightning", "callbacks", "datamodules")
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            if "hf_template" in p.parts or "tasks" in p.parts:  # files copied into exports / read by lm_eval
                continue
            rel = p.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            out[name] = p
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules imported anywhere in the file (module level and inside functions)."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `from pkg import name` where name is not a module: the package
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def test_no_import_circles():
    mods = _modules()
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    # Tarjan's strongly connected components
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_the_circle_check_finds_a_circle(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from b import g\n")
    b.write_text("import a\n")
    assert _imports("a", a, {"a", "b"}) == {"b"} and _imports("b", b, {"a", "b"}) == {"a"}


@pytest.mark.parametrize("name,path", sorted(_modules().items()))
def test_module_size(name, path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{name} has {n} lines (> {MAX_LINES}): split it by concept"


def test_no_router_type_switches_outside_the_routers():
    pattern = re.compile(r"isinstance\([^)]*(ExpertChoiceRouter|TokenChoiceRouter|FullRecursion)|"
                         r"__name__\s*==\s*['\"](ExpertChoiceRouter|TokenChoiceRouter|FullRecursion)|"
                         r"kind\.startswith\(|\.kind\s*==")
    routing = ROOT / "haipai_lightning" / "model" / "routing"
    bad = [f"{p.relative_to(ROOT)}:{i + 1}" for name, p in _modules().items() if routing not in p.parents
           for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert not bad, f"router type switches outside model/routing: {bad}"


def test_tests_mirror_the_package():
    subpackages = {p.name for p in (ROOT / "haipai_lightning").iterdir()
                   if p.is_dir() and (p / "__init__.py").exists() and p.name != "cli"}
    for sub in subpackages | {"cli", "data"}:
        assert list((ROOT / "tests" / sub).glob("test_*.py")), f"tests/{sub}/ has no tests"
    assert not [p.name for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_layout.py"], \
        "tests belong in the folder of the package part they test"


def test_front_door_names_resolve_to_their_objects_not_subpackages():
    """Every public name of `haipai_lightning` is the class / function it promises, also after every
    subpackage was imported (a subpackage of the same name would shadow it)."""
    import importlib
    import types

    import haipai_lightning

    for name in _modules():
        if name.startswith("haipai_lightning.") and not name.startswith("haipai_lightning.cli"):
            importlib.import_module(name)
    for name in haipai_lightning.__all__:
        obj = getattr(haipai_lightning, name)
        assert not isinstance(obj, types.ModuleType), f"haipai_lightning.{name} is a module"
