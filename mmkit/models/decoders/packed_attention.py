"""``attn_implementation="packed_sdpa"``: SDPA that attends within each packed sample only.

A packed row holds several samples one after the other, their position ids restarting at 0 for
each. transformers' own ``sdpa`` handles such rows by building a dense block-diagonal mask of
``row_length x row_length``: correct, but it computes every masked-out block, so a row of 16
samples costs as much attention as one sample 16 times as long. This implementation runs causal
SDPA on each sample's span instead, so attention costs ``sum(length**2)``, like flash-attention's
varlen kernel, on any device. Inputs that are not packed (a padding mask, a KV cache, queries
shorter than keys) go to transformers' ``sdpa`` unchanged, so generation behaves exactly as with it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "packed_sdpa"


def sample_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the ``(start, end)`` of each sample: a new sample starts wherever a position does
    not follow its predecessor by one (the same rule as transformers' packed-sequence detection)."""
    starts_mask = torch.ones_like(position_ids, dtype=torch.bool)
    starts_mask[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    length = position_ids.shape[1]
    spans = []
    for row in starts_mask.tolist():
        starts = [index for index, is_start in enumerate(row) if is_start]
        spans.append(list(zip(starts, starts[1:] + [length])))
    return spans


def packed_sdpa_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    # Without a padding mask, over a full (cache-less) square of queries and keys, the sample
    # structure comes from the position ids inside the attention; no dense mask is needed.
    if attention_mask is None and q_length == kv_length and q_offset == 0 and kv_offset == 0:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask, **kwargs)


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    grouped_query = query.shape[1] != key.shape[1]
    position_ids = position_ids.expand(query.shape[0], -1)
    rows = []
    for row, spans in enumerate(sample_spans(position_ids)):
        sizes = [end - start for start, end in spans]
        # split, not slicing: its backward writes each gradient once instead of a zero-filled
        # full-length tensor per sample.
        pieces = [
            F.scaled_dot_product_attention(
                sample_query, sample_key, sample_value, dropout_p=dropout, scale=scaling, is_causal=True,
                enable_gqa=grouped_query,
            )
            for sample_query, sample_key, sample_value in zip(
                query[row : row + 1].split(sizes, dim=2),
                key[row : row + 1].split(sizes, dim=2),
                value[row : row + 1].split(sizes, dim=2),
            )
        ]
        rows.append(torch.cat(pieces, dim=2))
    # transformers' attention functions return [batch, length, heads, head_dim].
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, packed_sdpa_attention)
AttentionMaskInterface.register(NAME, packed_sdpa_mask)
