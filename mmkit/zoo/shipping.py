"""Zoo models shipped inside the package: pretrained once, for as long as their recipe takes, and
loaded as they are, the way a LLaVA user downloads Vicuna instead of training it.

Each shipped folder ``shipped/<name>-v<version>/`` holds the HF files, the ``quality.json`` its
build measured, and ``sha256.json``, the hash of every other file; a folder whose files do not
match their hashes is refused, never loaded.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from functools import cache
from pathlib import Path
from typing import Any

from mmkit.core.errors import MmkitError

SHIPPED_ROOT = Path(__file__).parent / "shipped"
MANIFEST = "sha256.json"
# A rebuilt model's quality figure matches the shipped one when within these of it: builds are
# seeded, but float sums differ between CPUs and library versions.
RELATIVE_TOLERANCE, ABSOLUTE_TOLERANCE = 0.03, 1.5


class ShippedModelError(MmkitError):
    """A shipped model's files are not the ones its manifest names."""


def shipped_folder(name: str, version: int) -> Path | None:
    """The shipped folder of ``name`` at ``version``, or None when the package holds none."""
    folder = SHIPPED_ROOT / f"{name}-v{version}"
    return folder if (folder / MANIFEST).is_file() else None


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file in ``folder`` except the manifest, by file name."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != MANIFEST
    }


@cache
def verify(folder: Path) -> None:
    """Raise ShippedModelError unless ``folder``'s files are exactly those of its manifest."""
    expected = json.loads((folder / MANIFEST).read_text())
    actual = file_hashes(folder)
    for file_name in sorted(expected.keys() | actual.keys()):
        if expected.get(file_name) != actual.get(file_name):
            problem = ("is missing" if file_name not in actual else "is not in the manifest"
                       if file_name not in expected else "does not match its sha256")
            raise ShippedModelError(
                f"shipped zoo model {folder}: {file_name} {problem}; reinstall mmkit, or rebuild it "
                f"into the package with `python -m mmkit.zoo ship {folder.name.rsplit('-v', 1)[0]}`"
            )


def ship(built: Path, name: str, version: int) -> Path:
    """Copy the built folder of ``name`` into the package, with its manifest; return the copy."""
    folder = SHIPPED_ROOT / f"{name}-v{version}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for path in sorted(built.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            shutil.copy2(path, folder / path.name)
    (folder / MANIFEST).write_text(json.dumps(file_hashes(folder), indent=2) + "\n")
    return folder


def quality_differences(shipped: Any, rebuilt: Any, key: str = "") -> list[str]:
    """Where a rebuilt quality report disagrees with the shipped one: strings and integers must
    be equal, other numbers within the tolerances; timings (keys ending in ``seconds``) are
    the machine's, not the recipe's, and are not compared."""
    if key.endswith("seconds"):
        return []
    if isinstance(shipped, dict) and isinstance(rebuilt, dict):
        return [
            difference
            for sub_key in sorted(shipped.keys() | rebuilt.keys())
            for difference in quality_differences(shipped.get(sub_key), rebuilt.get(sub_key), f"{key}.{sub_key}".lstrip("."))
        ]
    if isinstance(shipped, float) and isinstance(rebuilt, (int, float)) and not isinstance(rebuilt, bool):
        close = math.isclose(shipped, rebuilt, rel_tol=RELATIVE_TOLERANCE, abs_tol=ABSOLUTE_TOLERANCE)
        return [] if close else [f"{key}: shipped {shipped}, rebuilt {rebuilt}"]
    return [] if shipped == rebuilt else [f"{key}: shipped {shipped!r}, rebuilt {rebuilt!r}"]
