"""The import graph: the command line sits on top, training is imported only to train, methods pull in
no plotting, and no module imports itself back through another (every import, also inside functions)."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "vitdistill"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """vitdistill modules that ``name`` imports, anywhere in the file, plus the packages above them (Python
    runs a package's ``__init__`` before any of its modules)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if target in MODULES:
                found.add(target)
    closed = set(found)
    for target in found:
        parts = target.split(".")
        closed.update(".".join(parts[:i]) for i in range(1, len(parts)))
    closed.discard(name)
    return {m for m in closed if m in MODULES and not name.startswith(m + ".") and m != PACKAGE}


GRAPH = {name: imports_of(name) for name in MODULES}


def importers_of(target: str) -> set[str]:
    return {name for name, deps in GRAPH.items() if target in deps}


def test_the_graph_sees_the_package():
    assert {"vitdistill.cli", "vitdistill.engine.trainer", "vitdistill.methods.spectralkd"} <= set(MODULES)
    assert "vitdistill.methods.base" in GRAPH["vitdistill.methods.spectralkd"]
    assert "vitdistill.engine.trainer" in GRAPH["vitdistill.cli"]  # imports inside functions count


def test_only_the_entry_points_import_the_cli_and_the_demo():
    assert importers_of("vitdistill.cli") <= {"vitdistill.__main__"}
    assert importers_of("vitdistill.demo") <= {"vitdistill.cli"}


def test_the_trainer_is_imported_only_to_train():
    assert importers_of("vitdistill.engine.trainer") == {"vitdistill.cli", "vitdistill.demo"}


def test_methods_and_training_import_no_plotting_or_report():
    reachable, todo = set(), ["vitdistill.engine.trainer", "vitdistill.methods"]
    while todo:
        name = todo.pop()
        if name not in reachable:
            reachable.add(name)
            todo.extend(GRAPH[name])
    assert not reachable & {"vitdistill.analysis.plots", "vitdistill.analysis.report", "vitdistill.cli",
                            "vitdistill.demo"}
    # and for real: third-party imports included
    code = ("import sys, vitdistill.engine.trainer, vitdistill.methods; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'PIL.ImageDraw')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
