"""Batch encoded samples, padded or packed, and carry the skips along.

``pad`` (LLaVA's way): one sample per row, right-padded to the longest. ``pack``: the same samples
laid end to end in as few rows as fit ``pack_length`` tokens (first-fit decreasing), position ids
restarting at each sample; the decoder confines attention to each sample (``packed_sdpa``, or
transformers' block-diagonal mask / flash-attention varlen), so the loss and gradients equal
those of the padded batch while the padding disappears.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from mmkit.core.errors import ConfigError
from mmkit.data.samples import EncodedSample, SkippedSample
from mmkit.data.templates.llava_tokenization import IGNORE_INDEX

BATCHING = ("pad", "group", "pack")


def first_fit_decreasing(lengths: Sequence[int], capacity: int | None) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``capacity`` (``None``: one bin)."""
    if capacity is None:
        return [list(range(len(lengths)))]
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        target = next((b for b, free in enumerate(room) if free >= lengths[index]), None)
        if target is None:
            bins.append([])
            room.append(capacity)
            target = len(bins) - 1
        bins[target].append(index)
        room[target] -= lengths[index]
    return bins


def length_grouped(items: Sequence[Any], batch_size: int, rng: random.Random) -> list[list[Any]]:
    """LLaVA-1.5's ``group_by_modality_length`` over one megabatch: sorted by (has image, length),
    cut into batches of like samples, the batches in ``rng``'s order. Skipped samples sort first."""
    ordered = sorted(items, key=_modality_length)
    batches = [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]
    rng.shuffle(batches)
    return batches


def _modality_length(item: Any) -> tuple[bool, int]:
    input_ids = getattr(item, "input_ids", None)  # a skipped sample has none
    return (getattr(item, "pixel_values", None) is not None, 0 if input_ids is None else len(input_ids))


class StreamErrors:
    """WebDataset's exception handler: a shard that cannot be read on (truncated, corrupt tar) is
    recorded with its reason and reading goes on with the next shard. The collator of the same
    dataloader worker moves the records into the next batch's skips, so none is lost silently."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, str]] = []

    def __call__(self, exc: Exception) -> bool:
        shard = next((arg for arg in reversed(exc.args) if isinstance(arg, str) and arg.endswith(".tar")), "?")
        message = str(exc.args[0]) if exc.args else ""
        self.pending.append((f"shard:{shard}", f"unreadable from here on ({type(exc).__name__}: {message})"))
        return True

    def drain(self) -> list[tuple[str, str]]:
        records, self.pending = self.pending, []
        return records


class Collator:
    def __init__(
        self,
        pad_token_id: int,
        batching: str = "pad",
        pack_length: int | None = None,
        stream_errors: StreamErrors | None = None,
    ) -> None:
        if batching not in BATCHING:
            raise ConfigError(f"data.batching={batching!r}: choose one of {', '.join(BATCHING)}")
        if pack_length is not None and pack_length < 1:
            raise ConfigError(f"data.pack_length={pack_length}: must be a positive token count, or null for one row")
        self.pad_token_id = pad_token_id
        self.stream_errors = stream_errors
        self.pack = batching == "pack"
        self.pack_length = pack_length

    def __call__(self, items: Sequence[EncodedSample | SkippedSample]) -> dict[str, Any]:
        samples = [item for item in items if isinstance(item, EncodedSample)]
        # Skips travel inside the batch so a count made in a dataloader worker reaches the trainer.
        skipped = [(item.key, item.reason) for item in items if isinstance(item, SkippedSample)]
        if self.stream_errors is not None:
            skipped += self.stream_errors.drain()
        batch: dict[str, Any] = {"keys": [s.key for s in samples], "skipped": skipped,
                                 "truncated": sum(s.truncated_from is not None for s in samples)}
        if not samples:
            return batch
        lengths = [len(s.input_ids) for s in samples]
        if self.pack:
            # A sample longer than a row still gets a row of its own.
            rows = first_fit_decreasing(lengths, None if self.pack_length is None else max(self.pack_length, max(lengths)))
        else:
            rows = [[index] for index in range(len(samples))]
        width = max(sum(lengths[i] for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        ordered: list[EncodedSample] = []  # images must follow the samples' reading order in the rows
        segments: list[int] = []  # every sample's (and padding tail's) length, row after row
        for row_index, row in enumerate(rows):
            start = 0
            for index in row:
                sample, end = samples[index], start + lengths[index]
                input_ids[row_index, start:end] = sample.input_ids
                labels[row_index, start:end] = sample.labels
                # A sample's first label would be predicted by the previous sample's last token.
                labels[row_index, start] = IGNORE_INDEX
                attention_mask[row_index, start:end] = 1
                position_ids[row_index, start:end] = torch.arange(lengths[index])
                ordered.append(sample)
                start = end
            # The padding tail is a sample of its own (positions from 0), so no real token sees it.
            position_ids[row_index, start:] = torch.arange(width - start)
            segments += [lengths[index] for index in row] + ([width - start] if width > start else [])
        images = [s.pixel_values for s in ordered if s.pixel_values is not None]
        batch.update(
            keys=[s.key for s in ordered],
            input_ids=input_ids,
            labels=labels,
            # Packed rows carry no padding mask: the position ids say where each sample starts.
            attention_mask=None if self.pack else attention_mask,
            position_ids=position_ids if self.pack else None,
            # A plain list, so it stays on the host: attention reads it without a device sync.
            sample_lengths=segments if self.pack else None,
            pixel_values=torch.stack(images) if images else None,
            num_real_tokens=sum(lengths),
            sum_squared_lengths=sum(length**2 for length in lengths),
            num_tokens=len(rows) * width,
            num_images=len(images),
        )
        return batch
