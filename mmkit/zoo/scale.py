"""How much pretraining the zoo's builders do, and the quality report each leaves beside its weights."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mmkit.core.errors import ConfigError


def pretraining_scale() -> float:
    """``$MMKIT_ZOO_SCALE`` scales every zoo model's pretraining steps and corpus (default 1).

    The test suite runs the real pretraining code at a small scale; such models are cached
    apart from full-scale ones so the two never mix."""
    value = os.environ.get("MMKIT_ZOO_SCALE", "1")
    try:
        scale = float(value)
    except ValueError:
        scale = -1.0
    if not 0 < scale <= 1:
        raise ConfigError(f"MMKIT_ZOO_SCALE={value!r}: use a number in (0, 1]")
    return scale


def scaled(count: int) -> int:
    return max(1, round(count * pretraining_scale()))


def write_quality(folder: Path, report: dict[str, Any]) -> None:
    (folder / "quality.json").write_text(json.dumps(report, indent=2))
