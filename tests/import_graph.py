"""The import graph of a package, read from its source (nothing is imported), and the layer rules
of docs/architecture.md checked against it."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

# Lowest first. A module may import its own layer and the layers its rule names; the root's
# modules and every ``__main__`` are entry points, which may import anything.
LAYERS: dict[str, tuple[str, ...]] = {
    "core": ("core",),
    "models": ("models",),
    "data": ("data", "synth", "datagen"),
    "interchange": ("interchange",),
    "inference": ("inference",),
    "evaluation": ("evaluation",),
    "serving": ("serving",),
    "training": ("training",),
    "tools": ("planning", "zoo"),
}
MAY_IMPORT: dict[str, set[str]] = {
    "core": set(),
    "models": {"core"},
    "data": {"core"},
    "interchange": {"core", "models", "data"},
    "inference": {"core", "models", "data"},
    "evaluation": {"core", "models", "data", "inference"},
    "serving": {"core", "models", "data", "inference"},
    "training": {"core", "models", "data", "interchange", "inference", "evaluation"},
    "tools": {"core", "models", "data", "interchange", "inference", "evaluation", "training"},
}
ENTRY = "entry"


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    in_function: bool

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} imports {self.imported}"


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``package_dir`` (itself a package)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports(package_dir: Path) -> list[Import]:
    """Every import of one of the package's own modules, wherever it stands (``TYPE_CHECKING``
    blocks excepted: they never run)."""
    modules = module_files(package_dir)
    root = package_dir.name
    found: list[Import] = []

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                targets: list[str] = []
                if isinstance(child, ast.Import):
                    targets = [alias.name for alias in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                        base = ".".join(parts + ([base] if base else []))
                    targets = [f"{base}.{alias.name}" for alias in child.names]
                for target in targets:
                    imported = owner(target) if target.split(".")[0] == root else None
                    if imported and imported != name:
                        found.append(Import(name, imported, child.lineno, nested))
                visit(child, nested)

        visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[-1] == "__main__":
        return ENTRY
    for layer, packages in LAYERS.items():
        if parts[1] in packages:
            return layer
    if len(parts) == 2:
        return ENTRY  # a root module: a python -m command or its helpers
    raise ValueError(f"{module}: its package {parts[1]!r} is in no layer; add it to LAYERS and docs/architecture.md")


def forbidden(edges: list[Import]) -> list[Import]:
    """Imports that go sideways or up: a layer importing one its rule does not name."""
    wrong = []
    for edge in edges:
        source, target = layer_of(edge.importer), layer_of(edge.imported)
        if source == ENTRY or source == target:
            continue
        if target == ENTRY or target not in MAY_IMPORT[source]:
            wrong.append(edge)
    return wrong


def cycles(edges: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, set()).add(edge.imported)
        graph.setdefault(edge.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components
