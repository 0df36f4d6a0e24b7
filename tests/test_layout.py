"""The package's shape (issue 20, README "Where the code is"): small modules, imports that point one way.

Read from the source with ``ast``, lazy imports inside functions included, so a change that grows a
module past 700 lines, imports another module's private name or closes an import cycle fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "featpipe"
MAX_LINES = 700
MAX_ROOT_MODULES = 10
# the shared packages never import a stage or the CLI; runtime imports only the root modules
LOWER = {"runtime": set(), "video": {"runtime"}, "backbones": {"runtime"}, "cache": {"runtime"}}
STAGES = {"extraction", "training", "runs", "cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported featpipe module, names taken from it) for every import statement in the module."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("featpipe")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.startswith("featpipe"):
                found.append((base, [a.name for a in node.names]))
    return found


def edges(name: str) -> set[str]:
    out = set()
    for base, names in imports(name):
        out |= {t for t in [base, *(f"{base}.{n}" for n in names)] if t in MODULES and t != name}
    return out


def top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and (SRC / parts[1]).is_dir() else "root"


def test_the_tree_is_read():
    assert {"featpipe", "featpipe.cache.writer", "featpipe.cli"} <= set(MODULES), sorted(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_700_lines(name):
    lines = MODULES[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(SRC.parent)} has {lines} lines: it has two jobs, split it"


def test_at_most_ten_modules_at_the_package_root():
    root = sorted(p.name for p in SRC.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


def test_no_module_imports_another_modules_private_name():
    wrong = [
        f"{name} imports {n} from {base}"
        for name in MODULES
        for base, names in imports(name)
        for n in names
        if n.startswith("_") and not n.startswith("__") and base != name
    ]
    assert not wrong, wrong


def test_there_is_no_import_cycle_lazy_imports_included():
    graph = {name: edges(name) for name in MODULES}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w) :] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (cycle := visit(v)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_shared_packages_never_import_a_stage_or_the_cli():
    wrong = []
    for name in MODULES:
        package = top(name)
        if package not in LOWER:
            continue
        for target in edges(name):
            other = top(target)
            if other in STAGES or (other in LOWER and other != package and other not in LOWER[package]):
                wrong.append(f"{name} -> {target}")
    assert not wrong, wrong
