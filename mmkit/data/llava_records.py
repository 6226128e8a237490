"""Reading LLaVA's instruction-data format: a JSON list (or JSONL) of
``{"id", "image" (optional), "conversations": [{"from": "human"|"gpt", "value"}]}``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmkit.core.errors import DataError

# Image members a shard sample may carry, by file extension.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


def load_records(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such LLaVA JSON file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a list of records, found {type(records).__name__}")
    return records


def record_problem(record: Any) -> str | None:
    """Why a record cannot be used, or None when it is well-formed."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if not isinstance(record.get("conversations"), list) or not record["conversations"]:
        return "no 'conversations' list"
    if "image" in record and not isinstance(record["image"], str):
        return "'image' is not a file name"
    return None
