"""A KV cache that grows in place instead of by concatenation.

transformers' default ``DynamicCache`` appends each step's keys and values with ``torch.cat``, which
copies the whole cache of every layer at every new token (what that costs is measured in
experiments/bench/RESULTS.md). Here every layer writes the new positions into
a buffer and hands attention a view of the part filled so far, so a step copies only its own
tokens. The buffer starts at the prompt plus up to ``FIRST_NEW_TOKENS`` new tokens, not the whole
``max_new_tokens`` (evaluations allow 1024 and most answers are short), and doubles when full.
Mask sizes and sequence lengths are ``DynamicLayer``'s, read from the view.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

FIRST_NEW_TOKENS = 256


class PreallocatedLayer(DynamicLayer):
    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._allocate(key_states[..., :0, :], value_states[..., :0, :], self.capacity)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self.length + new > self._key_buffer.shape[-2]:
            self._allocate(self.keys, self.values, max(2 * self._key_buffer.shape[-2], self.length + new))
        self._key_buffer[..., self.length : self.length + new, :] = key_states
        self._value_buffer[..., self.length : self.length + new, :] = value_states
        self._view(self.length + new)
        return self.keys, self.values

    def _view(self, length: int) -> None:
        self.length = length
        self.keys = self._key_buffer[..., :length, :]
        self.values = self._value_buffer[..., :length, :]

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """Fresh buffers of ``capacity`` positions holding ``keys``/``values`` at their start."""
        length = keys.shape[-2]
        self._key_buffer = keys.new_empty(*keys.shape[:-2], max(capacity, length), keys.shape[-1])
        self._value_buffer = values.new_empty(*values.shape[:-2], max(capacity, length), values.shape[-1])
        self._key_buffer[..., :length, :] = keys
        self._value_buffer[..., :length, :] = values
        self._view(length)

    def reset(self) -> None:
        super().reset()
        self.length = 0
        self._key_buffer = self._value_buffer = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.is_initialized:  # a shorter view of the same buffers
            self._view(self.keys.shape[-2])

    # Row edits (beam search, contrastive search) replace the views with new tensors: buffers for them.
    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._adopt()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._adopt()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._adopt()

    def _adopt(self) -> None:
        if self.is_initialized and self.keys is not None:
            self._allocate(self.keys, self.values, self._key_buffer.shape[-2])


def preallocated_cache(model: PreTrainedModel, prompt_length: int, max_new_tokens: int) -> dict[str, Any]:
    """``generate`` keyword arguments that give ``model`` a :class:`PreallocatedLayer` per layer
    (transformers 5.24 renamed ``past_key_values`` to ``cache``); none where a layer is not plain
    full attention (sliding windows, linear attention), whose caches transformers builds itself."""
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if getattr(config, "sliding_window", None) or set(layer_types) != {"full_attention"}:
        return {}
    capacity = prompt_length + min(max_new_tokens, FIRST_NEW_TOKENS)
    layers = [PreallocatedLayer(capacity) for _ in range(config.num_hidden_layers)]
    forward = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
    name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    return {name: Cache(layers=layers)}
