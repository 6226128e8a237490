"""``attn_implementation="packed_sdpa"``: SDPA that attends within each packed sample only.

A packed row holds several samples one after the other, their position ids restarting at 0 for
each. transformers' own ``sdpa`` handles such rows by building a dense block-diagonal mask of
``row_length x row_length``: correct, but it computes every masked-out block, so a row of 16
samples costs as much attention as one sample 16 times as long. This implementation runs causal
SDPA on each sample's span instead, so attention costs ``sum(length**2)``, on any device. On a GPU
in half precision all samples go to PyTorch's own varlen flash-attention kernel in one call: a call
per sample would also work, but the cuDNN kernel SDPA picks there builds a plan for every new
length, which made a 7B-shaped step three times slower until every length had been seen
(experiments/bench/RESULTS.md). Inputs that are not packed (a padding mask, a KV cache, queries
shorter than keys) go to transformers' ``sdpa`` unchanged, so generation behaves exactly as with it.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "packed_sdpa"

try:  # PyTorch 2.10 and later, CUDA only
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older PyTorch
    varlen_attn = None
# 2.10 takes ``is_causal``; later versions a ``window_size`` where (-1, 0) is causal, and ``enable_gqa``.
_VARLEN_PARAMETERS = set(inspect.signature(varlen_attn).parameters) if varlen_attn else set()


def sample_lengths(position_ids: torch.Tensor) -> list[int]:
    """The length of each sample, row after row: a new sample starts wherever a position does not
    follow its predecessor by one (transformers' rule for packed sequences), and at every row."""
    starts_mask = torch.ones_like(position_ids, dtype=torch.bool)
    starts_mask[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    starts = starts_mask.flatten().nonzero().flatten().tolist() + [position_ids.numel()]
    return [end - start for start, end in zip(starts, starts[1:])]


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
    # The samples arrive as tensors and ints only (flash-attention's ``cu_seq_lens_q`` and
    # ``max_length_q``), never as a Python list: ``decoder.compile`` compiles the layers around this
    # function, and compiled code specialises on a list's contents, recompiling at every batch.
    offsets = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or (offsets is None and position_ids is None) or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.is_cuda and torch.is_autocast_enabled("cuda"):
        # SDPA under autocast computes in the autocast dtype whatever its inputs are. Casting here
        # lets fp32 queries (bf16-mixed: Llama's rotary embedding promotes them to the fp32
        # residual stream's dtype) take the varlen kernel instead of a cuDNN call per sample,
        # which is far slower on every new length (measured in experiments/bench/RESULTS.md).
        dtype = torch.get_autocast_dtype("cuda")
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if dropout == 0.0 and _varlen_applies(query, key, offsets, scaling):
        longest = kwargs.get("max_length_q") or int((offsets[1:] - offsets[:-1]).max())
        return _varlen_attention(query, key, value, offsets, longest, scaling), None
    return _attention_per_sample(query, key, value, offsets, position_ids, dropout, scaling), None


@torch.compiler.disable  # the lengths are data: compiled code would break the graph or specialise on them
def _attention_per_sample(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, offsets: torch.Tensor | None,
                          position_ids: torch.Tensor | None, dropout: float, scaling: float | None) -> torch.Tensor:
    """Causal SDPA over each sample's span; [batch, heads, length, head_dim] in, [batch, length,
    heads, head_dim] out."""
    batch, heads, length, _ = query.shape
    if offsets is not None:  # VisionLanguageModel's offsets carry the lengths as ints
        lengths = getattr(offsets, "sample_lengths", None) or (offsets[1:] - offsets[:-1]).tolist()
    else:  # costs a device sync per layer; mmkit's packed batches carry the offsets
        lengths = sample_lengths(position_ids.expand(batch, -1))

    def flat(states: torch.Tensor) -> list[torch.Tensor]:
        # Rows end to end as one sequence (every row starts a sample), then one piece per sample:
        # split's backward writes each gradient once, unlike slicing.
        states = states.transpose(0, 1).reshape(1, states.shape[1], batch * length, states.shape[-1])
        return list(states.split(lengths, dim=2))

    pieces = [
        F.scaled_dot_product_attention(
            sample_query, sample_key, sample_value, dropout_p=dropout, scale=scaling, is_causal=True,
            enable_gqa=heads != key.shape[1],
        )
        for sample_query, sample_key, sample_value in zip(flat(query), flat(key), flat(value))
    ]
    output = torch.cat(pieces, dim=2).reshape(heads, batch, length, -1)
    # transformers' attention functions return [batch, length, heads, head_dim].
    return output.permute(1, 2, 0, 3).contiguous()


def _varlen_applies(query: torch.Tensor, key: torch.Tensor, offsets: torch.Tensor | None,
                    scaling: float | None) -> bool:
    default_scale = scaling is None or abs(scaling - query.shape[-1] ** -0.5) < 1e-12
    return (
        varlen_attn is not None and offsets is not None and query.is_cuda
        and query.dtype in (torch.bfloat16, torch.float16)
        and (default_scale or "scale" in _VARLEN_PARAMETERS)
    )


def _varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, offsets: torch.Tensor,
                      longest: int, scaling: float | None) -> torch.Tensor:
    """[batch, heads, length, head_dim] in, [batch, length, heads, head_dim] out; every row starts a
    sample, so the rows end to end are the varlen kernel's one long sequence of samples."""
    batch, heads, length, head_dim = query.shape

    def tokens_first(states: torch.Tensor) -> torch.Tensor:
        return states.transpose(1, 2).reshape(batch * length, states.shape[1], head_dim)

    options: dict = {}
    if "is_causal" in _VARLEN_PARAMETERS:
        options["is_causal"] = True
    else:
        options["window_size"] = (-1, 0)
    if "scale" in _VARLEN_PARAMETERS and scaling is not None:
        options["scale"] = scaling
    if query.shape[1] != key.shape[1]:
        if "enable_gqa" in _VARLEN_PARAMETERS:
            options["enable_gqa"] = True
        else:  # each key/value head serves the query heads next to it, as transformers' repeat_kv
            key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    offsets = offsets.to(device=query.device, dtype=torch.int32)
    output = varlen_attn(tokens_first(query), tokens_first(key), tokens_first(value), offsets, offsets,
                         longest, longest, **options)
    return output.reshape(batch, length, heads, head_dim)


AttentionInterface.register(NAME, packed_sdpa_attention)
AttentionMaskInterface.register(NAME, packed_sdpa_mask)
