"""Training batches that a resumed run can start in the middle of an epoch.

Each epoch is a fixed number of batches. Every dataloader worker ("reader") reads its own endless,
deterministic stream: its shards, shuffled from the seed, the epoch and the pass, through a seeded
shuffle buffer. PyTorch's DataLoader takes batches from the workers in strict rotation, so batch
``i`` of an epoch always comes from reader ``i % readers``, and the position saved with a
checkpoint is simply how many batches of the epoch were trained. A resumed run starts its
rotation at the reader whose turn it is, and each reader drops the samples of the batches it had
delivered before they are decoded or tokenised: no trained sample is trained on again and none is
skipped.
"""
from __future__ import annotations

import time
from itertools import islice
from typing import Any, Callable, Iterator

from mmkit.core.distributed import gather_objects, rank_and_world
from mmkit.core.errors import ConfigError

_END = object()
# (epoch, batches of it already trained) -> the rest of the epoch's batches
OpenEpoch = Callable[[int, int], Iterator[dict[str, Any]]]
# -> (epoch, batches of it trained so far), as the Trainer counts them
Progress = Callable[[], tuple[int, int]]


class ResumableBatches:
    """What ``train_dataloader`` returns: Lightning iterates it once per epoch and, since it has
    ``state_dict``/``load_state_dict``, stores its position in every checkpoint."""

    def __init__(self, open_epoch: OpenEpoch, batches_per_epoch: int, progress: Progress) -> None:
        self.open_epoch = open_epoch
        self.batches_per_epoch = batches_per_epoch
        self.progress = progress
        self._resume: dict[str, int] | None = None
        # Seconds the training loop spent blocked on the next batch (starting the epoch's workers
        # included): what the throughput monitor reports as data_wait_share.
        self.wait_seconds = 0.0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.progress()[0]
        resume, self._resume = self._resume, None
        trained = resume["batches"] if resume and resume["epoch"] == epoch else 0
        if trained >= self.batches_per_epoch:
            return
        epoch_batches = self.open_epoch(epoch, trained)
        batches = islice(epoch_batches, self.batches_per_epoch - trained)
        try:
            while True:
                asked = time.perf_counter()
                batch = next(batches, _END)
                self.wait_seconds += time.perf_counter() - asked
                if batch is _END:
                    return
                yield batch
        finally:  # an epoch left early (max_steps) shuts its workers down now, not at garbage collection
            close = getattr(epoch_batches, "close", None)
            if close is not None:
                close()

    def state_dict(self) -> dict[str, Any]:
        """Every rank's position (they are equal unless a rank fell behind). Lightning calls this
        on every rank while it assembles a checkpoint, so the gather is matched on all of them."""
        epoch, trained = self.progress()
        return {"ranks": gather_objects({"epoch": epoch, "batches": trained})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rank, world = rank_and_world()
        if len(state["ranks"]) != world:
            raise ConfigError(
                f"resume: the checkpoint was written by {len(state['ranks'])} rank(s) and this run has {world}; "
                "the data position is kept per rank, so resume with the same trainer.devices x trainer.num_nodes"
            )
        mine = state["ranks"][rank]
        self._resume = {"epoch": int(mine["epoch"]), "batches": int(mine["batches"])}
