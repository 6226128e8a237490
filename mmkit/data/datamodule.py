"""Streaming training data over WebDataset shards, split by rank and by dataloader worker."""
from __future__ import annotations

import random
import warnings
from typing import Any, Iterator

import lightning as L
import webdataset as wds

from mmkit.data.collate import Collator, StreamErrors, length_grouped
from mmkit.data.datasets.base import DatasetSource, ShardSet
from mmkit.data.samples import SampleEncoder
from mmkit.errors import DataError


class ShardDataModule(L.LightningDataModule):
    def __init__(
        self,
        source: DatasetSource,
        sample_encoder: SampleEncoder,
        batch_size: int,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        batching: str = "pad",
        pack_length: int | None = None,
        group_batches: int = 32,
        prefetch_factor: int = 4,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.source = source
        self.sample_encoder = sample_encoder
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.stream_errors = StreamErrors()
        self.collator = Collator(sample_encoder.tokenizer.pad_token_id, batching, pack_length, self.stream_errors)
        self.group_batches = group_batches if batching == "group" else 0
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.shards: ShardSet | None = None

    def prepare_data(self) -> None:
        # Runs on one process per node before the others start: builds any cached shards.
        self.source.shard_set()

    def setup(self, stage: str | None = None) -> None:
        self.shards = self.source.shard_set()

    def batches_per_epoch(self, world_size: int) -> int:
        """The same count on every rank: a rank that runs out of batches first would hang DDP."""
        assert self.shards is not None, "setup() first"
        return max(1, self.shards.num_samples // (world_size * self.batch_size))

    def train_dataloader(self) -> wds.WebLoader:
        assert self.shards is not None, "setup() first"
        world_size = self.trainer.world_size if self.trainer is not None else 1
        readers = world_size * max(1, self.num_workers)
        if len(self.shards.urls) < readers:
            raise DataError(
                f"the data has {len(self.shards.urls)} shard(s) but {world_size} rank(s) x "
                f"{max(1, self.num_workers)} worker(s) read it; every reader needs at least one shard "
                f"(write smaller shards, or lower data.num_workers)"
            )
        shuffled = self.shuffle_buffer > 0
        dataset = wds.WebDataset(
            list(self.shards.urls),
            shardshuffle=len(self.shards.urls) if shuffled else False,
            detshuffle=True,
            seed=self.seed,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            handler=self.stream_errors,
            empty_check=False,
        )
        if shuffled:
            dataset = dataset.shuffle(self.shuffle_buffer, seed=self.seed)
        dataset = dataset.map(self.sample_encoder)
        if self.group_batches:
            dataset = dataset.batched(self.batch_size * self.group_batches, collation_fn=list, partial=True)
            dataset = dataset.compose(self._length_grouped).map(self.collator)
        else:
            dataset = dataset.batched(self.batch_size, collation_fn=self.collator, partial=True)
        batches = self.batches_per_epoch(world_size)
        workers = {"prefetch_factor": self.prefetch_factor} if self.num_workers else {}
        loader = wds.WebLoader(
            dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, **workers
        ).with_epoch(batches)
        with warnings.catch_warnings():
            # with_length only gives the progress bar its total; with_epoch fixes the epoch's size.
            warnings.simplefilter("ignore", UserWarning)
            return loader.with_length(batches)

    def _length_grouped(self, megabatches: Iterator[list[Any]]) -> Iterator[list[Any]]:
        """Each megabatch of ``group_batches`` micro-batches, cut into micro-batches of like length."""
        rng = random.Random(self.seed)
        for items in megabatches:
            yield from length_grouped(items, self.batch_size, rng)
