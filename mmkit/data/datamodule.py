"""Streaming training data over WebDataset shards, split by rank and by dataloader worker."""
from __future__ import annotations

import warnings

import lightning as L
import webdataset as wds

from mmkit.data.collate import Collator
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
    ) -> None:
        super().__init__()
        self.source = source
        self.sample_encoder = sample_encoder
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
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
            handler=wds.warn_and_continue,
            empty_check=False,
        )
        if shuffled:
            dataset = dataset.shuffle(self.shuffle_buffer, seed=self.seed)
        collator = Collator(self.sample_encoder.tokenizer.pad_token_id)
        dataset = dataset.map(self.sample_encoder).batched(self.batch_size, collation_fn=collator, partial=True)
        batches = self.batches_per_epoch(world_size)
        loader = wds.WebLoader(dataset, batch_size=None, num_workers=self.num_workers).with_epoch(batches)
        with warnings.catch_warnings():
            # with_length only gives the progress bar its total; with_epoch fixes the epoch's size.
            warnings.simplefilter("ignore", UserWarning)
            return loader.with_length(batches)
