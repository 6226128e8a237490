"""The mixture dataset: exact shares by weight, fractions of a source, determinism, mid-epoch
resumption and the split across ranks, over two real shard folders."""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from mmkit.core.errors import ConfigError
from mmkit.core.interfaces import ImageStats
from mmkit.core.registry import DATASETS, TEMPLATES, load_components
from mmkit.data.datamodule import ShardDataModule
from mmkit.data.datasets.dataset_source import DatasetSource, sample_key
from mmkit.data.datasets.mixture import COMPOSITION, apportion
from mmkit.data.images import ImageProcessor
from mmkit.data.samples import SampleEncoder
from mmkit.data.shards import convert_llava_json
from mmkit.models.decoders.hf_causal_lm import prepare_tokenizer

load_components()

SIZES = {"a": 60, "b": 30}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """Shard folders ``a`` (records a00..a59) and ``b`` (b00..b29), ten records a shard."""
    root = tmp_path_factory.mktemp("sources")
    folders = {}
    for name, count in SIZES.items():
        (root / name / "images").mkdir(parents=True)
        Image.new("RGB", (16, 16), (200, 0, 0)).save(root / name / "images" / "red.png")
        records = [{"id": f"{name}{index:02d}", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}]}
            for index in range(count)]
        (root / name / "data.json").write_text(json.dumps(records))
        convert_llava_json(root / name / "data.json", root / name / "images", root / name / "shards",
                           samples_per_shard=10, progress=False)
        folders[name] = str(root / name / "shards")
    return folders


def mixture(folders: dict[str, str], entries: dict[str, dict], **options) -> DatasetSource:
    """A mixture of the named folders, each with its entry's weight/fraction, built through the registry."""
    sources = [{"data": {"name": "shards", "path": folders[name]}, **entry} for name, entry in entries.items()]
    return DATASETS.build({"name": "mixture", "sources": sources, **options}, "data")


def shard_keys(url: str) -> list[str]:
    with tarfile.open(url) as archive:
        return [sample_key(name) for name in archive.getnames() if name.endswith(".json")]


def record(key: str) -> str:
    """The source record a mixture key names: ``s1-b07-r2`` -> ``b07``."""
    return key.split("-")[1]


def datamodule(source: DatasetSource, num_workers: int = 0) -> ShardDataModule:
    encoder = SampleEncoder(TEMPLATES.get("vicuna_v1")(), prepare_tokenizer("zoo://tiny-llama"),
                            ImageProcessor(ImageStats(16, (0.5,) * 3, (0.5,) * 3)), 4, 512)
    module = ShardDataModule(source, encoder, batch_size=4, num_workers=num_workers, shuffle_buffer=50, seed=0)
    module.setup()
    return module


def epoch_keys(module: ShardDataModule) -> list[str]:
    return [key for batch in module.train_dataloader() for key in batch["keys"]]


def test_apportion_is_exact_and_gives_ties_to_the_earlier_source():
    assert apportion(300, [2.0, 1.0]) == [200, 100]
    assert apportion(10, [1.0, 1.0, 1.0]) == [4, 3, 3]
    assert apportion(7, [0.5, 0.25, 0.25]) == [3, 2, 2]  # quotas 3.5, 1.75, 1.75: the larger remainders win


def test_a_weight_2_source_gives_exactly_twice_the_samples_in_every_shard_and_the_stream(folders):
    """a (60 records) at weight 2 and b (30) at weight 1, 300 samples: 200 and 100, each record
    drawn 3 or 4 times, and every shard of 30 holds 20 and 10."""
    shards = mixture(folders, {"a": {"weight": 2}, "b": {"weight": 1}}, samples=300, samples_per_shard=30).shard_set()
    assert shards.num_samples == 300 and len(shards.urls) == 10
    for url in shards.urls:
        assert Counter(key[:2] for key in shard_keys(url)) == {"s0": 20, "s1": 10}

    keys = epoch_keys(datamodule(mixture(folders, {"a": {"weight": 2}, "b": {"weight": 1}}, samples=300,
                                         samples_per_shard=30)))
    assert len(keys) == len(set(keys)) == 300
    assert Counter(key[:2] for key in keys) == {"s0": 200, "s1": 100}
    draws = Counter(record(key) for key in keys)
    assert set(draws) == {f"a{i:02d}" for i in range(60)} | {f"b{i:02d}" for i in range(30)}
    assert set(draws.values()) == {3, 4}  # 200/60 and 100/30: passes, never a record a fifth time
    composition = json.loads((Path(shards.urls[0]).parent / COMPOSITION).read_text())
    assert [(s["records"], s["kept"], s["samples"]) for s in composition["sources"]] == [(60, 60, 200), (30, 30, 100)]


def test_a_fraction_keeps_exactly_round_f_n_distinct_records_each_once(folders):
    keys = [key for url in mixture(folders, {"a": {"fraction": 0.25}, "b": {"fraction": 0.1}},
                                   samples_per_shard=6).shard_set().urls for key in shard_keys(url)]
    assert len(keys) == len(set(keys)) == round(0.25 * 60) + round(0.1 * 30) == 18
    kept_b = sorted(record(key) for key in keys if key.startswith("s1-"))
    assert len(kept_b) == 3 and len({record(key) for key in keys if key.startswith("s0-")}) == 15

    other_seed = mixture(folders, {"a": {"fraction": 0.25}, "b": {"fraction": 0.1}}, samples_per_shard=6, seed=1)
    reseeded = [record(k) for url in other_seed.shard_set().urls for k in shard_keys(url) if k.startswith("s1-")]
    assert len(reseeded) == 3 and sorted(reseeded) != kept_b
    # With weights, a source still draws only the records it kept: 3 records, 10 times each.
    weighted = mixture(folders, {"a": {"weight": 1}, "b": {"weight": 1, "fraction": 0.1}}, samples=60)
    drawn = Counter(record(k) for url in weighted.shard_set().urls for k in shard_keys(url) if k.startswith("s1-"))
    assert sorted(drawn) == kept_b and set(drawn.values()) == {10}


def test_the_same_config_writes_the_same_bytes_and_another_seed_another_order(folders, tmp_path, monkeypatch):
    entries = {"a": {"weight": 3}, "b": {"weight": 1, "fraction": 0.5}}
    first = mixture(folders, entries, samples=120, samples_per_shard=20).shard_set()
    with monkeypatch.context() as cold_cache:  # built a second time, from scratch
        cold_cache.setenv("MMKIT_HOME", str(tmp_path))
        again = mixture(folders, entries, samples=120, samples_per_shard=20).shard_set()
    assert again.urls[0].startswith(str(tmp_path)) and again.sha256 == first.sha256
    reseeded = mixture(folders, entries, samples=120, samples_per_shard=20, seed=1).shard_set()
    assert reseeded.sha256 != first.sha256
    assert epoch_keys(datamodule(mixture(folders, entries, samples=120, samples_per_shard=20))) == \
        epoch_keys(datamodule(mixture(folders, entries, samples=120, samples_per_shard=20)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_epoch_resumed_mid_way_reads_exactly_the_batches_left(folders, num_workers):
    """As tests/test_datamodule.py checks the other sources: a new process's loader, handed the
    position a checkpoint saved, continues the uninterrupted epoch."""
    entries = {"a": {"weight": 2}, "b": {"weight": 1, "fraction": 0.5}}
    source = mixture(folders, entries, samples=48, samples_per_shard=8)
    full = [batch["keys"] for batch in datamodule(source, num_workers).train_dataloader()]
    assert len(full) == 12
    for trained in (1, 5, 11):
        loader = datamodule(source, num_workers).train_dataloader()
        loader.progress = lambda trained=trained: (0, trained)
        stream = iter(loader)
        seen = [next(stream)["keys"] for _ in range(trained + 1)]  # the trainer's prefetch
        state = loader.state_dict()
        resumed = datamodule(source, num_workers).train_dataloader()
        resumed.load_state_dict(state)
        assert seen[:trained] + [batch["keys"] for batch in resumed] == full, trained


def test_two_ranks_read_disjoint_halves_that_cover_the_mixture_each_with_the_weights(folders):
    source = mixture(folders, {"a": {"weight": 2}, "b": {"weight": 1}}, samples=240, samples_per_shard=24)
    per_rank = []
    for rank in (0, 1):
        module = datamodule(source)
        module.trainer = SimpleNamespace(global_rank=rank, world_size=2)  # what DDP's rank r sees
        loader = module.train_dataloader()
        loader.progress = lambda: (0, 0)
        per_rank.append([key for batch in loader for key in batch["keys"]])
    rank0, rank1 = per_rank
    assert len(rank0) == len(rank1) == 120 and not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == sorted(k for url in source.shard_set().urls for k in shard_keys(url))
    assert Counter(k[:2] for k in rank0) == Counter(k[:2] for k in rank1) == {"s0": 80, "s1": 40}


@pytest.mark.parametrize("sources,options,message", [
    ([], {}, "data.sources=[]: a non-empty list of sources"),
    ([{"data": {"name": "shards", "path": "x"}}, {"data": {"name": "shards", "path": "y"}, "fraction": 1.5}], {},
     "data.sources[1].fraction=1.5: must be in (0, 1]"),
    ([{"data": {"name": "shards", "path": "x"}}, {"data": {"name": "shards", "path": "y"}, "fraction": 0}], {},
     "data.sources[1].fraction=0: must be in (0, 1]"),
    ([{"data": {"name": "shards", "path": "x"}, "weight": -1}], {}, "data.sources[0].weight=-1: must be > 0"),
    ([{"data": {"name": "shards", "path": "x"}, "weight": "2"}], {}, "data.sources[0].weight='2': must be > 0"),
    ([{"data": {"name": "shards", "path": "x"}, "weight": 2}, {"data": {"name": "shards", "path": "y"}}], {},
     "data.sources[1].weight: missing; weight every source or none"),
    ([{"data": {"name": "shards", "path": "x"}, "wieght": 2}], {}, "data.sources[0]: unknown key(s) wieght"),
    ([{"name": "shards", "path": "x"}], {}, "data.sources[0]: needs data: {name: ...}"),
    ([{"data": {"name": "shardz", "path": "x"}}], {}, "data.sources[0].data.name='shardz': unknown dataset"),
    ([{"data": {"name": "shards", "folder": "x"}}], {}, "data.sources[0].data: 'shards' takes no option(s) folder"),
    ([{"data": {"name": "shards", "path": "x"}}], {"samples": 0}, "data.samples=0: a positive number"),
    ([{"data": {"name": "shards", "path": "x"}}], {"samples_per_shard": 0}, "data.samples_per_shard=0: a positive"),
])
def test_config_errors_name_the_key(sources, options, message):
    with pytest.raises(ConfigError) as raised:
        DATASETS.build({"name": "mixture", "sources": sources, **options}, "data")
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_a_fraction_or_weight_that_leaves_a_source_nothing_is_refused(folders):
    with pytest.raises(ConfigError, match=r"^data.sources\[1\].fraction=0.01: keeps none of its 30 records"):
        mixture(folders, {"a": {}, "b": {"fraction": 0.01}}).shard_set()
    with pytest.raises(ConfigError, match=r"^data.sources\[1\]: gets none of the mixture's 10 samples"):
        mixture(folders, {"a": {"weight": 100}, "b": {"weight": 1}}, samples=10).shard_set()
