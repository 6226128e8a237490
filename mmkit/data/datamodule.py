"""Streaming training data over WebDataset shards, split by rank and by dataloader worker, in an
order fixed by the seed and the epoch so that a resumed run continues mid-epoch
(:mod:`mmkit.data.resumable`)."""
from __future__ import annotations

import random
from functools import partial
from itertools import count, islice
from typing import Any, Callable, Iterator

import lightning as L
import webdataset as wds
from torch.utils.data import get_worker_info
from webdataset.tariterators import tarfile_samples

from mmkit.core.errors import DataError
from mmkit.data.collate import Collator, StreamErrors, length_grouped
from mmkit.data.datasets.dataset_source import DatasetSource, ShardSet
from mmkit.data.resumable import ResumableBatches
from mmkit.data.samples import SampleEncoder


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

    def train_dataloader(self) -> ResumableBatches:
        assert self.shards is not None, "setup() first"
        world_size = self.trainer.world_size if self.trainer is not None else 1
        readers = world_size * max(1, self.num_workers)
        if len(self.shards.urls) < readers:
            raise DataError(
                f"the data has {len(self.shards.urls)} shard(s) but {world_size} rank(s) x "
                f"{max(1, self.num_workers)} worker(s) read it; every reader needs at least one shard "
                f"(write smaller shards, or lower data.num_workers)"
            )
        return ResumableBatches(self._open_epoch, self.batches_per_epoch(world_size), self._progress)

    def _progress(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 0
        return self.trainer.current_epoch, self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _open_epoch(self, epoch: int, trained: int) -> Iterator[dict[str, Any]]:
        """The epoch's batches after the first ``trained``: the rotation over the readers starts at
        the reader whose turn it is, and each reader first drops the samples it had delivered."""
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        readers = max(1, self.num_workers)
        group = max(1, self.group_batches)
        # Reader r delivered batches r, r + readers, ... of the first ``trained``.
        delivered = {reader: max(0, -(-(trained - reader) // readers)) for reader in range(readers)}
        role = partial(_reader, offset=trained % readers, readers=readers)
        stages: list[Any] = [
            partial(self._reader_samples, epoch, rank, world_size, role),
            # Whole groups of batches are dropped unread; inside a group, the length grouping
            # needs every sample's length, so those are encoded and dropped after grouping.
            partial(_drop_first, delivered, role, per_batch=self.batch_size * group, batches=lambda n: n // group),
            wds.map(self.sample_encoder),
        ]
        if self.group_batches:
            stages += [
                wds.batched(self.batch_size * group, collation_fn=list, partial=True),
                partial(self._length_grouped, epoch),
                partial(_drop_first, delivered, role, per_batch=1, batches=lambda n: n % group),
                wds.map(self.collator),
            ]
        else:
            stages.append(wds.batched(self.batch_size, collation_fn=self.collator, partial=True))
        pipeline = wds.DataPipeline(*stages)
        workers = {"prefetch_factor": self.prefetch_factor} if self.num_workers else {}
        return iter(wds.WebLoader(pipeline, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                  **workers))

    def _reader_samples(self, epoch: int, rank: int, world_size: int, role: Callable[[], int]) -> Iterator[dict[str, Any]]:
        """This reader's raw samples: its share of the shards, pass after pass, each pass in the
        order the seed, the epoch and the pass give, so every rank has as many batches as an epoch
        takes and a new process reads exactly the same stream."""
        assert self.shards is not None
        reader, readers = role(), max(1, self.num_workers)
        for number in count():
            urls = list(self.shards.urls)
            if self.shuffle_buffer > 0:
                random.Random(f"{self.seed}:{epoch}:{number}").shuffle(urls)
            mine = urls[rank::world_size][reader::readers]
            samples = tarfile_samples(({"url": url} for url in mine), handler=self.stream_errors)
            if self.shuffle_buffer > 0:  # within the pass: an epoch holds no repeat before a pass ends
                samples = wds.shuffle(self.shuffle_buffer, seed=f"{self.seed}:{epoch}:{number}")(samples)
            read = 0
            for sample in samples:
                read += 1
                yield sample
            if not read:
                raise DataError(f"no readable sample in the shards {mine}: {self.stream_errors.pending[-3:]}")

    def _length_grouped(self, epoch: int, megabatches: Iterator[list[Any]]) -> Iterator[list[Any]]:
        """Each megabatch of ``group_batches`` micro-batches, cut into micro-batches of like length."""
        for items in megabatches:
            # Seeded by the megabatch itself, so a resumed reader that dropped earlier megabatches
            # orders this one exactly as an uninterrupted reader does.
            rng = random.Random(f"{self.seed}:{epoch}:{items[0].key}")
            yield from length_grouped(items, self.batch_size, rng)


def _reader(offset: int, readers: int) -> int:
    """The reader this dataloader worker plays: the first worker the DataLoader asks plays the
    reader whose turn it is."""
    info = get_worker_info()
    return ((info.id if info is not None else 0) + offset) % readers


def _drop_first(delivered: dict[int, int], role: Callable[[], int], items: Iterator[Any], per_batch: int,
                batches: Callable[[int], int]) -> Iterator[Any]:
    """Drop ``per_batch`` items for each of ``batches(batches this reader delivered)``."""
    yield from islice(items, batches(delivered[role()]) * per_batch, None)
