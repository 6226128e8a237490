"""Streaming from shards: worker splitting, shuffling, padding, and the shard-count guard."""
from __future__ import annotations

import json
import time
from itertools import islice
from types import SimpleNamespace

import pytest
from PIL import Image

from mmkit.core.errors import DataError
from mmkit.core.interfaces import ImageStats
from mmkit.core.registry import TEMPLATES, load_components
from mmkit.data.datamodule import ShardDataModule
from mmkit.data.datasets.shards import ShardFolder
from mmkit.data.images import ImageProcessor
from mmkit.data.resumable import ResumableBatches
from mmkit.data.samples import SampleEncoder
from mmkit.data.shards import convert_llava_json
from mmkit.data.templates.llava_tokenization import IGNORE_INDEX
from mmkit.models.decoders.hf_causal_lm import prepare_tokenizer

load_components()


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    records = []
    for index in range(24):
        Image.new("RGB", (16, 16), (index * 10, 0, 0)).save(root / "images" / f"{index}.png")
        answer = "Yes." if index % 2 else "It is a fairly long answer about the picture."
        records.append({"id": f"s{index:02d}", "image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nIs it red?"}, {"from": "gpt", "value": answer}]})
    (root / "data.json").write_text(json.dumps(records))
    convert_llava_json(root / "data.json", root / "images", root / "shards", samples_per_shard=6, progress=False)
    return root / "shards"


def datamodule(shard_folder, num_workers: int, shuffle_buffer: int = 100, seed: int = 0, **batching) -> ShardDataModule:
    tokenizer = prepare_tokenizer("zoo://tiny-llama")
    encoder = SampleEncoder(
        TEMPLATES.get("vicuna_v1")(), tokenizer, ImageProcessor(ImageStats(16, (0.5,) * 3, (0.5,) * 3)), 4, 512
    )
    module = ShardDataModule(ShardFolder(str(shard_folder)), encoder, batch_size=4, num_workers=num_workers,
                             shuffle_buffer=shuffle_buffer, seed=seed, **batching)
    module.setup()
    return module


def epoch_keys(module: ShardDataModule) -> list[str]:
    return [key for batch in module.train_dataloader() for key in batch["keys"]]


def test_two_workers_read_disjoint_shards_and_cover_the_epoch(shard_folder):
    keys = epoch_keys(datamodule(shard_folder, num_workers=2))
    assert len(keys) == 24 and len(set(keys)) == 24


def test_shuffling_is_seeded(shard_folder):
    first = epoch_keys(datamodule(shard_folder, num_workers=0, seed=1))
    again = epoch_keys(datamodule(shard_folder, num_workers=0, seed=1))
    other = epoch_keys(datamodule(shard_folder, num_workers=0, seed=2))
    unshuffled = epoch_keys(datamodule(shard_folder, num_workers=0, shuffle_buffer=0))
    assert first == again and sorted(first) == sorted(other) == unshuffled
    assert first != unshuffled and first != other


def test_batches_are_right_padded_with_ignored_labels(shard_folder):
    batch = next(iter(datamodule(shard_folder, num_workers=0, shuffle_buffer=0).train_dataloader()))
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths.max() == batch["input_ids"].shape[1] and lengths.min() < lengths.max()
    for row, length in enumerate(lengths.tolist()):
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        assert (batch["attention_mask"][row, :length] == 1).all()
    assert batch["pixel_values"].shape == (4, 3, 16, 16)


def test_more_readers_than_shards_is_refused(shard_folder):
    module = datamodule(shard_folder, num_workers=5)
    with pytest.raises(DataError, match="4 shard\\(s\\) but 1 rank\\(s\\) x 5 worker\\(s\\)"):
        module.train_dataloader()


def test_length_grouping_makes_batches_of_like_lengths_and_keeps_every_sample(shard_folder):
    grouped = list(datamodule(shard_folder, num_workers=0, batching="group", group_batches=6).train_dataloader())
    random_batches = list(datamodule(shard_folder, num_workers=0).train_dataloader())
    assert sorted(k for b in grouped for k in b["keys"]) == sorted(k for b in random_batches for k in b["keys"])

    def real_share(batches):
        return sum(b["num_real_tokens"] for b in batches) / sum(b["num_tokens"] for b in batches)

    # Two lengths of answer: grouped batches hold one length each, so they carry no padding.
    assert real_share(grouped) == 1.0 and real_share(random_batches) < 0.95


def test_packed_batches_from_two_workers(shard_folder):
    batches = list(datamodule(shard_folder, num_workers=2, batching="pack").train_dataloader())
    assert sorted(k for b in batches for k in b["keys"]) == [f"s{i:02d}" for i in range(24)]
    for batch in batches:
        assert batch["input_ids"].shape == (1, batch["num_real_tokens"]) and batch["attention_mask"] is None
        assert batch["pixel_values"].shape[0] == len(batch["keys"]) == batch["num_images"]


def test_a_truncated_shard_is_read_up_to_the_damage_and_recorded(shard_folder, tmp_path):
    import shutil
    import tarfile

    damaged = tmp_path / "shards"
    shutil.copytree(shard_folder, damaged)
    shard = sorted(damaged.glob("*.tar"))[1]
    with tarfile.open(shard) as archive:  # cut inside a member's data, as a crashed copy leaves it
        middle = archive.getmembers()[len(archive.getmembers()) // 2]
    shard.write_bytes(shard.read_bytes()[: middle.offset_data + middle.size // 2])
    batches = list(datamodule(damaged, num_workers=0, shuffle_buffer=0).train_dataloader())
    trained = [key for batch in batches for key in batch["keys"]]
    skipped = [entry for batch in batches for entry in batch["skipped"]]
    # Every other shard is read whole, the damaged one up to the damage, and the damage is on record.
    # The epoch keeps its 6 batches of 4: the next pass over the shards fills the samples lost.
    readable = len(set(trained))
    samples_skipped = [key for key, _ in skipped if not key.startswith("shard:")]  # a sample cut in two
    assert 18 <= readable < 24 and len(trained) + len(samples_skipped) == 24
    assert len(set(trained[:readable])) == readable
    assert any(key == f"shard:{shard}" and "unreadable from here on" in reason for key, reason in skipped), skipped


@pytest.mark.parametrize("num_workers,batching", [(0, {}), (2, {}), (2, {"batching": "group", "group_batches": 2})])
def test_an_epoch_resumed_from_a_saved_position_reads_exactly_the_batches_left(shard_folder, num_workers, batching):
    """Lightning saves ``state_dict()`` with a checkpoint after some batches were trained (one more
    may already be prefetched) and hands it to a new process's loader."""
    full = [batch["keys"] for batch in datamodule(shard_folder, num_workers, **batching).train_dataloader()]
    assert len(full) == 6
    for trained in (1, 3, 5):
        loader = datamodule(shard_folder, num_workers, **batching).train_dataloader()
        loader.progress = lambda: (0, trained)
        stream = iter(loader)
        seen = [next(stream)["keys"] for _ in range(trained + 1)]  # the trainer's prefetch
        state = loader.state_dict()
        assert state == {"ranks": [{"epoch": 0, "batches": trained}]}

        resumed = datamodule(shard_folder, num_workers, **batching).train_dataloader()
        resumed.load_state_dict(state)
        rest = [batch["keys"] for batch in resumed]
        assert seen[:trained] + rest == full, trained


def test_each_epoch_has_its_own_order(shard_folder):
    module = datamodule(shard_folder, num_workers=0)
    first = [key for batch in islice(module._open_epoch(0, 0), 6) for key in batch["keys"]]
    second = [key for batch in islice(module._open_epoch(1, 0), 6) for key in batch["keys"]]
    assert sorted(first) == sorted(second) and first != second


def test_resumable_batches_clock_how_long_the_loop_waited_for_each_batch(monkeypatch):
    """The throughput monitor's data_wait_share comes from this clock. The clock is the test's own,
    moved by the data (0.05 s a batch) and by the training steps (0.1 s each): what is counted does
    not depend on how busy the machine is."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr("mmkit.data.resumable.time", SimpleNamespace(perf_counter=lambda: clock.now))

    def slow_epoch(epoch: int, trained: int):
        for index in range(trained, 5):
            clock.now += 0.05
            yield {"index": index}

    batches = ResumableBatches(slow_epoch, 3, lambda: (0, 0))
    consumed = []
    for batch in batches:
        clock.now += 0.1  # the training step: not waiting
        consumed.append(batch["index"])
    assert consumed == [0, 1, 2]
    assert batches.wait_seconds == pytest.approx(0.15)  # the 0.3 s of steps are not counted
