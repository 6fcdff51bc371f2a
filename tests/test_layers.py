"""The package's modules import one another without cycles (imports inside functions count too):
each module builds only on modules below it."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "r2d3ray"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in its code (``from a.b import c`` counts as
    a.b.c when that is a module, else as a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "r2d3ray":
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "r2d3ray"}
    me = module_name(path)
    # a package's __init__ re-exporting its own modules, and a module importing its package, are not edges
    return {m for m in found & modules if m != me and not me.startswith(m + ".") and not m.startswith(me + ".")}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: project_imports(path, set(paths)) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first = last), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return path[path.index(child):] + [child]
            if child not in state and (cycle := visit(child, path + [child])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_architecture_doc_names_files_that_exist():
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:r2d3ray|jobs|configs|benchmarks|tests|docs)/[\w/.\-]+\.(?:py|yaml|md))`", doc))
    assert len(named) > 30
    missing = sorted(p for p in named if not (PACKAGE.parent / p).is_file())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
