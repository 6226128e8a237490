"""Several dataset sources mixed into one, written once as cached shards.

    data:
      name: mixture
      sources:
        - data: {name: shards, path: shards/conversation}
        - data: {name: shards, path: shards/detail}
          fraction: 0.05      # keep round(0.05 x its records), chosen by the seed
        - data: {name: shards, path: shards/complex}
          fraction: 0.1

Each source keeps ``fraction`` of its records. Without weights the mixture holds every kept record
once, so a source's share is its size. With a ``weight`` on every source, source i gets
``weight_i / sum(weights)`` of the mixture's ``samples``, exactly (largest remainders), drawing its
kept records in seeded passes: it repeats a record only after it has used all of them.

Each source's samples are spread evenly over the mixture (jittered by the seed), so every shard
holds each source's share to within a sample or so. The mixture is written as shards like any other
source: the data module's split by rank and worker, its shuffling and its mid-epoch resumption
apply unchanged, and every rank trains on the same mix.
"""
from __future__ import annotations

import json
import math
import random
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import webdataset as wds

from mmkit.core.cache import build_once, cache_folder
from mmkit.core.errors import ConfigError, DataError
from mmkit.core.registry import DATASETS
from mmkit.data.datasets.dataset_source import DatasetSource, ShardSet, sample_key
from mmkit.data.shards import MANIFEST, file_sha256

# Bump when the same config would mix differently, so stale caches are not reused.
MIXTURE_VERSION = 1
SOURCE_KEYS = ("data", "weight", "fraction")
COMPOSITION = "mixture.json"  # beside the manifest: what each source gave

# Where one record of a source lies: (tar file, sample key, (extension, byte offset, size) per member).
Record = tuple[str, str, list[tuple[str, int, int]]]


@dataclass(frozen=True)
class MixedSource:
    """One checked entry of ``data.sources``."""

    key: str  # data.sources[i], for messages
    source: DatasetSource
    weight: float | None
    fraction: float


@dataclass(frozen=True)
class Draw:
    """One sample of the mixture: record ``record`` of source ``source``, drawn in pass ``repeat``."""

    source: int
    record: int
    repeat: int


def _checked_number(value: Any, key: str, valid: Callable[[float], bool], rule: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not valid(value):
        raise ConfigError(f"{key}={value!r}: {rule}")
    return float(value)


def _positive_int(value: Any, key: str, rule: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r}: {rule}")


def mixed_source(entry: Any, key: str) -> MixedSource:
    """``{data: {name: ...}, weight, fraction}`` checked, its source built through the registry."""
    if not isinstance(entry, Mapping) or not isinstance(entry.get("data"), Mapping):
        raise ConfigError(f"{key}: needs data: {{name: ...}} (the source's own config), optionally weight or fraction")
    unknown = sorted(set(entry) - set(SOURCE_KEYS))
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {', '.join(unknown)}; a source takes {', '.join(SOURCE_KEYS)}")
    fraction = _checked_number(entry.get("fraction", 1.0), f"{key}.fraction", lambda v: 0 < v <= 1, "must be in (0, 1]")
    weight = entry.get("weight")
    if weight is not None:
        weight = _checked_number(weight, f"{key}.weight", lambda v: v > 0, "must be > 0")
    return MixedSource(key, DATASETS.build(entry["data"], f"{key}.data"), weight, fraction)


def kept_records(count: int, fraction: float, seed: int, index: int, key: str) -> list[int]:
    """The indices of the ``round(fraction x count)`` records a source keeps, chosen by the seed."""
    keep = round(fraction * count)
    if keep == 0:
        raise ConfigError(f"{key}.fraction={fraction:g}: keeps none of its {count} records")
    if keep == count:
        return list(range(count))
    return sorted(random.Random(f"{seed}:{index}:fraction").sample(range(count), keep))


def apportion(total: int, shares: Sequence[float]) -> list[int]:
    """``total`` split in proportion to ``shares``, exactly: the floors, then one more to each of
    the largest remainders (the earlier source first on a tie)."""
    quotas = [total * share / sum(shares) for share in shares]
    counts = [math.floor(quota) for quota in quotas]
    by_remainder = sorted(range(len(shares)), key=lambda i: counts[i] - quotas[i])
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return counts


def plan_mixture(kept: Sequence[Sequence[int]], counts: Sequence[int], seed: int) -> list[Draw]:
    """The mixture's samples in order, ``counts[i]`` from source i. Its k-th sample sits at
    (k + jitter) / counts[i] along the mixture, so any stretch holds each source's share."""
    placed: list[tuple[float, Draw]] = []
    for index, (records, count) in enumerate(zip(kept, counts)):
        jitter = random.Random(f"{seed}:{index}:order")
        for position, (repeat, record) in enumerate(islice(_passes(records, seed, index), count)):
            placed.append(((position + jitter.random()) / count, Draw(index, record, repeat)))
    placed.sort(key=lambda item: (item[0], item[1].source))
    return [draw for _, draw in placed]


def _passes(records: Sequence[int], seed: int, index: int) -> Iterator[tuple[int, int]]:
    """(pass, record) over a source's kept records without end, each pass in its own seeded order."""
    repeat = 0
    while True:
        order = list(records)
        random.Random(f"{seed}:{index}:pass{repeat}").shuffle(order)
        yield from ((repeat, record) for record in order)
        repeat += 1


@DATASETS.register("mixture")
class MixtureDataset(DatasetSource):
    def __init__(
        self,
        sources: Sequence[Mapping[str, Any]],
        samples: int | None = None,
        seed: int = 0,
        samples_per_shard: int = 1000,
    ) -> None:
        """``samples=None``: the kept records, summed. ``seed`` chooses the kept records and the
        interleaving; it is the data's own, so runs with another ``seed=`` train on the same mixture."""
        if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence) or not sources:
            raise ConfigError(f"data.sources={sources!r}: a non-empty list of sources, each {{data: {{name: ...}}}}")
        self.sources = [mixed_source(entry, f"data.sources[{i}]") for i, entry in enumerate(sources)]
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            raise ConfigError(f"{self.sources[weighted.index(False)].key}.weight: missing; weight every source or none")
        if samples is not None:
            _positive_int(samples, "data.samples", "a positive number of samples, or null (the kept records, summed)")
        _positive_int(samples_per_shard, "data.samples_per_shard", "a positive integer")
        self.samples = samples
        self.seed = seed
        self.samples_per_shard = samples_per_shard

    def teacher(self) -> dict[str, Any] | None:
        """The sources' teacher when they share one (an evaluation flags a judge that wrote the data)."""
        known = [t for t in (s.source.teacher() for s in self.sources) if t is not None]
        return known[0] if known and all(t == known[0] for t in known) else None

    def shard_set(self) -> ShardSet:
        shard_sets = [s.source.shard_set() for s in self.sources]
        identity = {
            "sources": [{"sha256": shards.sha256, "samples": shards.num_samples,
                         "weight": s.weight, "fraction": s.fraction} for s, shards in zip(self.sources, shard_sets)],
            "samples": self.samples, "seed": self.seed, "per_shard": self.samples_per_shard, "version": MIXTURE_VERSION,
        }
        folder = build_once(cache_folder("mixture", identity), lambda out: self._build(shard_sets, out))
        return ShardSet.from_folder(folder)

    def _build(self, shard_sets: Sequence[ShardSet], out: Path) -> None:
        indexes = [_index(shards) for shards in shard_sets]
        kept = [kept_records(len(records), s.fraction, self.seed, i, s.key)
                for i, (s, records) in enumerate(zip(self.sources, indexes))]
        weights = [s.weight for s in self.sources if s.weight is not None]
        total = self.samples or sum(map(len, kept))
        counts = apportion(total, weights or [len(records) for records in kept])
        for s, count in zip(self.sources, counts):
            if count == 0:
                raise ConfigError(f"{s.key}: gets none of the mixture's {total} samples; raise its weight or samples")
        out.mkdir(parents=True)
        plan = plan_mixture(kept, counts, self.seed)
        _write_shards((_sample(indexes[draw.source][draw.record], draw) for draw in plan), out, self.samples_per_shard)
        composition = [
            {"source": s.key, "records": len(records), "kept": len(keep), "samples": count,
             "weight": s.weight, "fraction": s.fraction}
            for s, records, keep, count in zip(self.sources, indexes, kept, counts)
        ]
        (out / COMPOSITION).write_text(json.dumps({"seed": self.seed, "sources": composition}, indent=1))


def _index(shards: ShardSet) -> list[Record]:
    """Where each record of ``shards`` lies, from the tar headers alone (no sample is read here)."""
    records: list[Record] = []
    seen: set[str] = set()
    for url in shards.urls:
        members: dict[str, list[tuple[str, int, int]]] = {}
        try:
            with tarfile.open(url) as archive:
                for member in archive.getmembers():
                    if member.isfile():
                        key = sample_key(member.name)
                        extension = member.name[len(key) + 1:]
                        members.setdefault(key, []).append((extension, member.offset_data, member.size))
        except (OSError, tarfile.TarError) as exc:
            raise DataError(f"{url}: unreadable shard ({exc})") from None
        for key, parts in members.items():
            # A key that another shard of the source also has would merge with it if the two met.
            unique = key if key not in seen else f"{key}_{len(records)}"
            seen.add(unique)
            records.append((url, unique, parts))
    if len(records) != shards.num_samples:
        folder = Path(shards.urls[0]).parent
        raise DataError(f"{folder}: the shards hold {len(records)} samples and {MANIFEST} says {shards.num_samples}")
    return records


def _sample(record: Record, draw: Draw) -> dict[str, Any]:
    """The record's members as a sample, its key naming the source (keys may repeat across sources)
    and the pass (a record drawn again is another sample)."""
    url, key, parts = record
    sample: dict[str, Any] = {"__key__": f"s{draw.source}-{key}" + (f"-r{draw.repeat}" if draw.repeat else "")}
    with open(url, "rb") as handle:
        for extension, offset, size in parts:
            handle.seek(offset)
            sample[extension] = handle.read(size)
    return sample


def _write_shards(samples: Iterator[dict[str, Any]], out: Path, per_shard: int) -> None:
    """The shards and their manifest, under plain names: ``build_once`` publishes the whole folder."""
    shards = []
    while chunk := list(islice(samples, per_shard)):
        path = out / f"shard-{len(shards):06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as writer:  # mtime 0: the same mixture gives the same bytes
            for sample in chunk:
                writer.write(sample)
        shards.append({"file": path.name, "samples": len(chunk), "sha256": file_sha256(path)})
    manifest = {"shards": shards, "num_samples": sum(s["samples"] for s in shards), "skipped": []}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
