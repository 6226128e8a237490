"""A LLaVA JSON file + image folder, converted once to cached shards."""
from __future__ import annotations

from pathlib import Path

from mmkit.core.cache import build_once, cache_folder
from mmkit.core.distributed import launcher_rank, wait_for_rank_zero
from mmkit.core.registry import DATASETS
from mmkit.data.datasets.dataset_source import DatasetSource, ShardSet
from mmkit.data.shards import MANIFEST, convert_llava_json


@DATASETS.register("llava_json")
class LlavaJsonDataset(DatasetSource):
    def __init__(self, json: str, image_folder: str | None = None, samples_per_shard: int = 1000) -> None:
        self.json = Path(json)
        self.image_folder = Path(image_folder) if image_folder else None
        self.samples_per_shard = samples_per_shard

    def shard_set(self) -> ShardSet:
        stat = self.json.stat() if self.json.exists() else None
        folder = cache_folder(
            "llava_json",
            {"json": str(self.json.resolve()), "mtime": stat and stat.st_mtime_ns, "size": stat and stat.st_size,
             "images": str(self.image_folder), "per_shard": self.samples_per_shard},
        )
        # Once per job: under torchrun or SLURM, rank 0 converts (with every CPU) and the other ranks
        # wait for the finished folder, which build_once renames into place with its manifest.
        if launcher_rank() == 0:
            build_once(folder, lambda out: convert_llava_json(
                self.json, self.image_folder, out, self.samples_per_shard),
                announce=f"data: converting {self.json} to shards, with a progress bar (665K records took 5 min on "
                         "2 CPU cores: experiments/convert_665k.md)")
        else:
            wait_for_rank_zero(folder / MANIFEST, f"convert {self.json} to shards")
        return ShardSet.from_folder(folder)
