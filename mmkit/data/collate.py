"""Batch encoded samples: right-pad ids and labels, stack the images, carry the skips along."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from mmkit.data.samples import EncodedSample, SkippedSample
from mmkit.data.templates.base import IGNORE_INDEX


class Collator:
    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[EncodedSample | SkippedSample]) -> dict[str, Any]:
        samples = [item for item in items if isinstance(item, EncodedSample)]
        # Skips travel inside the batch so a count made in a dataloader worker reaches the trainer.
        skipped = [(item.key, item.reason) for item in items if isinstance(item, SkippedSample)]
        batch: dict[str, Any] = {"keys": [s.key for s in samples], "skipped": skipped}
        if not samples:
            return batch
        length = max(len(s.input_ids) for s in samples)
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample.input_ids)
            input_ids[row, :n] = sample.input_ids
            labels[row, :n] = sample.labels
            attention_mask[row, :n] = 1
        images = [s.pixel_values for s in samples if s.pixel_values is not None]
        batch.update(
            input_ids=input_ids,
            labels=labels,
            attention_mask=attention_mask,
            pixel_values=torch.stack(images) if images else None,
        )
        return batch
