"""The interface of dataset components and the shard sets they produce."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mmkit.core.errors import DataError
from mmkit.core.registry import DATASETS
from mmkit.data.shards import MANIFEST, file_sha256


@dataclass(frozen=True)
class ShardSet:
    """Shard files ready to stream, with their sample count and content hashes."""

    urls: tuple[str, ...]
    num_samples: int
    sha256: dict[str, str]

    @classmethod
    def from_folder(cls, folder: Path) -> "ShardSet":
        """Read ``manifest.json`` if present; otherwise count samples and hash the tars."""
        folder = Path(folder)
        manifest_path = folder / MANIFEST
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            shards = manifest["shards"]
            missing = [s["file"] for s in shards if not (folder / s["file"]).is_file()]
            if missing:
                raise DataError(f"{folder}: manifest lists missing shards {missing[:3]}")
            return cls(
                urls=tuple(str(folder / s["file"]) for s in shards),
                num_samples=sum(s["samples"] for s in shards),
                sha256={s["file"]: s["sha256"] for s in shards},
            )
        tars = sorted(folder.glob("*.tar"))
        if not tars:
            raise DataError(f"{folder}: no .tar shards and no {MANIFEST}")
        return cls(
            urls=tuple(str(t) for t in tars),
            num_samples=sum(_count_samples(t) for t in tars),
            sha256={t.name: file_sha256(t) for t in tars},
        )


def sample_key(member_name: str) -> str:
    """The sample a tar member belongs to: its name up to the first dot, as WebDataset groups them."""
    return member_name.split(".", 1)[0]


def _count_samples(tar_path: Path) -> int:
    import tarfile

    with tarfile.open(tar_path) as archive:
        return len({sample_key(member.name) for member in archive.getmembers() if member.isfile()})


class DatasetSource:
    """Config -> shards. Sources that build data cache it under ``$MMKIT_HOME/data``."""

    def shard_set(self) -> ShardSet:
        raise NotImplementedError

    def teacher(self) -> dict[str, Any] | None:
        """Who wrote this data (``teacher``, and for a model its ``model`` and ``base_url``), where
        the source knows: evaluations flag a judge that is the same model."""
        return None


def teacher_record(name: str, options: dict[str, Any]) -> dict[str, Any]:
    return {"teacher": name, "model": options.get("model"), "base_url": options.get("base_url")}


def given_or_built(path: str | Path | None, build: Callable[[], Path]) -> Path:
    """``path`` when one is configured, else the synthetic stand-in ``build()`` makes (cached)."""
    return Path(path) if path else build()


DATASETS.set_base(DatasetSource)
