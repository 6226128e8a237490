"""ScienceQA as training data: a split in one of LLaVA's prompt formats, converted once to shards."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from mmkit.core.cache import build_once, cache_folder
from mmkit.core.registry import DATASETS
from mmkit.data.datasets.dataset_source import DatasetSource, ShardSet, given_or_built
from mmkit.data.scienceqa_layout import image_path, llava_record, load_problems, split_format
from mmkit.data.shards import convert_llava_json
from mmkit.synth.scienceqa_questions import synthetic_scienceqa_dir


def write_llava_json(data_dir: Path, split: str, prompt_format: str, out: Path) -> tuple[Path, Path]:
    """ScienceQA ``split`` as a LLaVA JSON file + image folder under ``out``."""
    split_format(prompt_format, "data.prompt_format")
    problems = load_problems(data_dir, split)
    images = out / "images"
    records = []
    for problem in problems:
        source = image_path(data_dir, problem)
        if source is not None:
            (images / problem.pid).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, images / problem.pid / problem.image)
        records.append(llava_record(problem, prompt_format))
    path = out / f"llava_{split}_{prompt_format}.json"
    path.write_text(json.dumps(records))
    return path, images


@DATASETS.register("scienceqa")
class ScienceQADataset(DatasetSource):
    def __init__(
        self, data_dir: str | None = None, split: str = "train", prompt_format: str = "QCM-LEA",
        samples_per_shard: int = 1000,
    ) -> None:
        """``data_dir=None`` uses mmkit's synthetic ScienceQA-format set."""
        split_format(prompt_format, "data.prompt_format")
        self.data_dir = data_dir
        self.split = split
        self.prompt_format = prompt_format
        self.samples_per_shard = samples_per_shard

    def shard_set(self) -> ShardSet:
        data_dir = given_or_built(self.data_dir, synthetic_scienceqa_dir)
        problems = data_dir / "problems.json"
        stat = problems.stat() if problems.is_file() else None
        folder = cache_folder("scienceqa", {
            "data_dir": str(data_dir.resolve()), "mtime": stat and stat.st_mtime_ns, "split": self.split,
            "format": self.prompt_format, "per_shard": self.samples_per_shard,
        })

        def build(out: Path) -> None:
            json_path, images = write_llava_json(data_dir, self.split, self.prompt_format, out / "raw")
            convert_llava_json(json_path, images, out, self.samples_per_shard)

        build_once(folder, build, announce=f"data: converting ScienceQA's {self.split} split in {data_dir} to shards "
                                           "(seconds to a few minutes)")
        return ShardSet.from_folder(folder)
