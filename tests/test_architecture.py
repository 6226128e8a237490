"""docs/architecture.md's layer rules, checked on mmkit's source: no import cycle, no import
sideways or up, and the checker itself shown to catch both on a small package made here."""
from __future__ import annotations

from pathlib import Path

import pytest
from import_graph import ENTRY, cycles, forbidden, imports, layer_of

import mmkit

MMKIT = Path(mmkit.__file__).parent


@pytest.fixture(scope="module")
def edges():
    return imports(MMKIT)


def test_mmkit_has_no_import_cycle(edges):
    assert cycles(edges) == []


def test_every_layer_imports_only_the_layers_below_it(edges):
    assert [str(edge) for edge in forbidden(edges)] == []


def test_the_registry_imports_no_component(edges):
    assert [str(e) for e in edges if e.importer == "mmkit.core.registry" and layer_of(e.imported) != "core"] == []


def test_below_the_entry_points_mmkit_is_imported_at_module_level_only(edges):
    """An import inside a function hides a dependency from the reader of a module's head; only
    the commands defer theirs, so that a bad command line is answered before torch loads."""
    deferred = [str(e) for e in edges if e.in_function and layer_of(e.importer) != ENTRY]
    assert deferred == []


def test_every_module_belongs_to_a_layer(edges):
    for edge in edges:
        layer_of(edge.importer)  # raises for a package no layer names


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "mmkit" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "mmkit"


def test_the_checker_finds_a_cycle_even_through_an_import_inside_a_function(tmp_path):
    package = _package(tmp_path, {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/registry.py": "def load():\n    import mmkit.components\n",
        "components.py": "import mmkit.core.registry\n",
    })
    assert cycles(imports(package)) == [["mmkit.components", "mmkit.core.registry"]]


@pytest.mark.parametrize("importer, imported", [
    ("models/vlm.py", "mmkit.training.module"),        # models -> training
    ("data/samples.py", "mmkit.models.vlm"),           # data -> models
    ("data/samples.py", "mmkit.training.module"),      # data -> training
    ("evaluation/run.py", "mmkit.training.module"),    # evaluation -> training
    ("core/registry.py", "mmkit.components"),          # registry -> components
    ("core/config.py", "mmkit.models.vlm"),            # core -> anything above it
])
def test_the_checker_names_each_forbidden_direction(tmp_path, importer, imported):
    files = {f"{pkg}/__init__.py": "" for pkg in ("core", "models", "data", "evaluation", "training")}
    files.update({"__init__.py": "", "components.py": "", "models/vlm.py": "", "training/module.py": "",
                  "data/samples.py": "", "evaluation/run.py": "", "core/registry.py": "", "core/config.py": ""})
    files[importer] = f"from {imported.rpartition('.')[0]} import {imported.rpartition('.')[2]}\n"
    found = forbidden(imports(_package(tmp_path, files)))
    assert [(e.importer, e.imported) for e in found] == [("mmkit." + importer[:-3].replace("/", "."), imported)]
