"""The house rules of the tree, read from the code itself with ``ast`` (imports inside functions included).

- The core (``lambdalake/``) is the ground floor: it imports no layer and nothing above it.
- The layers ``batch/``, ``speed/`` and ``serving/`` stand side by side on the core: none imports another.
- ``audit/`` stands above the layers (it checks them all); ``wiring/`` (root CLI, demo, producer, Airflow glue)
  and ``dags/`` stand on top. Nothing imports ``wiring/`` except ``dags/``, nothing imports ``dags/``.
- No import circles between modules.
- No module of the packages is longer than :data:`MAX_LINES`; no layer is reached through ``importlib`` strings.
- Every document the code and the docs cite exists in the repository.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FLOORS = {"lambdalake": 0, "batch": 1, "speed": 1, "serving": 1, "audit": 2, "wiring": 3, "dags": 4}
PACKAGES = tuple(FLOORS)
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _imported(module: str, path: Path) -> set[str]:
    """Every module name ``module`` imports (top level and inside functions), relative imports resolved."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (each name mapped to the longest module it names)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for imported in _imported(name, path):
            parts = imported.split(".")
            for n in range(len(parts), 0, -1):
                candidate = ".".join(parts[:n])
                if candidate in mods:
                    if candidate != name:
                        targets.add(candidate)
                    break
        graph[name] = targets
    return graph


def _floor(module: str) -> str:
    return module.split(".")[0]


def test_every_import_runs_down_or_sideways_within_a_package():
    wrong = []
    for module, targets in sorted(_graph().items()):
        here = _floor(module)
        for target in sorted(targets):
            there = _floor(target)
            if there == here:
                continue
            if FLOORS[there] >= FLOORS[here]:
                wrong.append(f"{module} -> {target} ({here}/ may not import {there}/)")
    assert not wrong, "imports against the floors of the house:\n" + "\n".join(wrong)


def test_no_import_circles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_no_layer_reached_through_importlib_strings():
    pattern = re.compile(r"""(?:import_module|__import__)\(\s*f?["'](\w+)""")
    found = []
    for module, path in _modules().items():
        for m in pattern.finditer(path.read_text()):
            target = m.group(1)
            if target in FLOORS and FLOORS[target] > FLOORS[_floor(module)]:
                found.append(f"{module} loads {target} by name")
    assert not found, found


def test_no_module_is_a_giant():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by responsibility): {long}"


_CITED_DOC = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.(?:md|ipynb))\b")


def _cited_documents() -> dict[str, set[str]]:
    cited: dict[str, set[str]] = defaultdict(set)
    paths = [p for pkg in (*PACKAGES, "bench", "tests", "docs", "notebooks", "infra") for p in (REPO / pkg).rglob("*")
             if p.suffix in (".py", ".md", ".ipynb", ".toml", ".xml") and ".ipynb_checkpoints" not in p.parts]
    paths += [REPO / "README.md", REPO / "Makefile", REPO / "pyproject.toml"]
    for path in paths:
        for m in _CITED_DOC.finditer(path.read_text()):
            cited[m.group(1)].add(str(path.relative_to(REPO)))
    return cited


def test_every_cited_document_is_in_the_repo():
    names = {p.relative_to(REPO).as_posix() for p in REPO.rglob("*") if p.suffix in (".md", ".ipynb")
             and not any(part.startswith(".") for part in p.relative_to(REPO).parts)}
    basenames = {n.rsplit("/", 1)[-1] for n in names}
    missing = {doc: sorted(where) for doc, where in _cited_documents().items()
               if doc not in names and doc.rsplit("/", 1)[-1] not in basenames}
    assert not missing, f"documents cited but not in the repository: {missing}"


@pytest.mark.parametrize("needle", ["/work/", "/home/", "/Users/"])
def test_no_path_of_a_development_machine(needle):
    hits = [str(p.relative_to(REPO)) for pkg in (*PACKAGES, "bench", "docs", "notebooks")
            for p in (REPO / pkg).rglob("*") if p.suffix in (".py", ".md", ".ipynb") and needle in p.read_text()]
    hits += ["README.md"] if needle in (REPO / "README.md").read_text() else []
    assert not hits, f"{needle!r} (a path of a development machine) cited in {hits}"


_CITED_SECTION = re.compile(r'(docs/[\w.-]+\.md),?\s+(?:section\s+)?\\?"([^"\\]+)\\?"')


def test_every_cited_section_is_a_heading_of_its_document():
    """``docs/design.md, "Definitions change"``-style citations name a heading that exists (docs move; citations
    must follow them)."""
    wrong = []
    for pkg in (*PACKAGES, "bench", "tests", "docs", "notebooks"):
        for path in (REPO / pkg).rglob("*"):
            if path.suffix not in (".py", ".md", ".ipynb"):
                continue
            text = re.sub(r"\s*\n\s*(?:#\s*)?", " ", path.read_text())  # citations wrap across lines
            for doc, section in _CITED_SECTION.findall(text):
                target = REPO / doc
                headings = [line.lstrip("#").strip().lower() for line in target.read_text().splitlines()
                            if line.startswith("#")] if target.exists() else []
                if not any(h.startswith(section.lower()) for h in headings):
                    wrong.append(f"{path.relative_to(REPO)} cites {doc} {section!r}")
    assert not wrong, "citations of sections that do not exist:\n" + "\n".join(sorted(set(wrong)))
