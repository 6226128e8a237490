"""The synthetic world's data (see :mod:`mmkit.synth`), written by a teacher and cached as shards."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mmkit.core.cache import build_once, cache_folder
from mmkit.core.registry import DATASETS
from mmkit.data.datasets.dataset_source import DatasetSource, ShardSet, teacher_record
from mmkit.data.shards import convert_llava_json
from mmkit.synth.llava_data import write_llava_dataset

# Bump when the world or the teachers change what they write, so stale caches are not reused.
SYNTH_DATA_VERSION = 1


@DATASETS.register("synthetic")
class SyntheticDataset(DatasetSource):
    def __init__(
        self,
        split: str = "train",
        count: int = 2000,
        seed: int = 0,
        teacher: str = "rules",
        teacher_options: dict[str, Any] | None = None,
        resolution: int = 64,
        samples_per_shard: int = 500,
    ) -> None:
        self.options = {
            "split": split, "count": count, "seed": seed, "teacher": teacher,
            "teacher_options": dict(teacher_options or {}), "resolution": resolution,
        }
        self.samples_per_shard = samples_per_shard

    def teacher(self) -> dict[str, Any]:
        return teacher_record(self.options["teacher"], self.options["teacher_options"])

    def shard_set(self) -> ShardSet:
        identity = {**self.options, "per_shard": self.samples_per_shard, "version": SYNTH_DATA_VERSION}
        options = self.options
        folder = build_once(cache_folder("synthetic", identity), self._build, announce=(
            f"data: writing the synthetic {options['split']} set ({options['count']} scenes, "
            f"{options['teacher']} teacher) and its shards (seconds to a few minutes)"))
        return ShardSet.from_folder(folder)

    def _build(self, out: Path) -> None:
        raw = out / "raw"
        json_path = write_llava_dataset(raw, **self.options)
        convert_llava_json(json_path, raw / "images", out, self.samples_per_shard)
