"""Existing WebDataset shards in a folder (as written by ``python -m mmkit.data.shards``)."""
from __future__ import annotations

from pathlib import Path

from mmkit.data.datasets.base import DatasetSource, ShardSet
from mmkit.registry import DATASETS


@DATASETS.register("shards")
class ShardFolder(DatasetSource):
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def shard_set(self) -> ShardSet:
        return ShardSet.from_folder(self.path)
