"""Existing WebDataset shards in a folder (as written by ``python -m mmkit.data.shards``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmkit.core.registry import DATASETS
from mmkit.data.datasets.dataset_source import DatasetSource, ShardSet, teacher_record


@DATASETS.register("shards")
class ShardFolder(DatasetSource):
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def shard_set(self) -> ShardSet:
        return ShardSet.from_folder(self.path)

    def teacher(self) -> dict[str, Any] | None:
        """From the ``datagen.json`` that ``python -m mmkit.datagen`` writes beside its shards."""
        for folder in (self.path, self.path.parent):
            identity = folder / "datagen.json"
            if identity.is_file():
                written = json.loads(identity.read_text())
                return teacher_record(written.get("teacher", "?"), written.get("options") or {})
        return None
