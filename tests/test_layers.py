"""The package's layers (docs/ARCHITECTURE.md): a module imports only its own package and lower layers.

Imports are read with ``ast`` from the source, so a lazy import inside a function counts as much as one at the
top of a file. A violation or an import cycle between packages fails with the offending file and line.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "usema"

# rank of each top-level unit of the package: it may import units of a strictly lower rank (and itself)
LAYERS: dict[str, int] = {
    "errors": 0,
    "faults": 0,
    "threads": 0,
    "allocator": 0,
    "io": 1,
    "nets": 1,
    "config": 2,
    "data": 3,
    "evaluation": 3,
    "run": 4,
    "planning": 4,
    "comparison": 4,
    "inference": 5,
    "training": 6,
    "bundle": 6,
    "bench": 6,
    "crossval": 7,
    "cli": 8,
    "__main__": 9,
    "__init__": 0,
}
# the CLI may import the command modules only (lazily); nothing else in the package may import the CLI
COMMAND_MODULES = {"command"}


def unit_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def usema_imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every ``usema.*`` import in ``path``, top-level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "usema"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "usema":
                if node.module == "usema":  # `from usema import x` imports the unit x
                    found += [(node.lineno, f"usema.{a.name}") for a in node.names]
                else:
                    found.append((node.lineno, node.module))
    return found


def all_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_unit_has_a_layer():
    units = {unit_of(p) for p in all_modules()}
    assert units <= LAYERS.keys(), f"add these to LAYERS and docs/ARCHITECTURE.md: {sorted(units - LAYERS.keys())}"


def test_lower_layers_never_import_upper_ones():
    violations = []
    for path in all_modules():
        unit = unit_of(path)
        for line, module in usema_imports(path):
            parts = module.split(".")
            target = parts[1] if len(parts) > 1 else "__init__"
            if target == unit or (target == "__init__" and len(parts) == 1):
                continue
            if unit == "cli" and len(parts) > 2 and parts[-1] in COMMAND_MODULES:
                continue
            if LAYERS.get(target, 99) >= LAYERS[unit]:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {unit} imports {module}")
    assert not violations, "\n".join(violations)


def test_no_import_cycles_between_modules():
    """No module-level cycle even inside a package (a -> b -> a through any path)."""
    graph: dict[str, set[str]] = {}
    for path in all_modules():
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        graph[name] = {m for _, m in usema_imports(path)}
    modules = set(graph)
    graph = {k: {m for m in v if m in modules and m != k} for k, v in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_nets_do_no_io():
    """nets/ holds networks only: no file, image or run-format imports."""
    banned = {"nibabel", "SimpleITK", "PIL", "tifffile", "yaml", "json", "pickle", "shutil", "tempfile", "open"}
    for path in (PACKAGE / "nets").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not (names | calls) & banned, f"{path.name} does I/O: {sorted((names | calls) & banned)}"


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
    """The rule above is live: an io module that imports inference is reported."""
    fake = tmp_path / "usema"
    (fake / "io").mkdir(parents=True)
    (fake / "io" / "bad.py").write_text("def f():\n    from usema.inference import pipeline\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match="io imports usema.inference"):
        test_lower_layers_never_import_upper_ones()
