"""A KV cache whose buffers are allocated once per generate call.

transformers' default ``DynamicCache`` appends each step's keys and values with ``torch.cat``, which
copies the whole cache of every layer at every new token: 13% of a batch-8 generate call of the
generation benchmark's model went to those copies. Here every layer writes the new positions into a
buffer sized for the prompt plus ``max_new_tokens`` and hands attention a view of the part filled so
far, so a step copies only its own tokens. Everything else (mask sizes, sequence length, cropping,
beam reordering) is ``DynamicLayer``'s, on that view.
"""
from __future__ import annotations

import inspect

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[-2]
        if not self.is_initialized:
            self.device = key_states.device
            self._allocate(key_states[..., :0, :], value_states[..., :0, :], max(self.capacity, new))
            self.is_initialized = True
        elif self.length + new > self._key_buffer.shape[-2]:  # longer than planned: grow geometrically
            self._allocate(self.keys, self.values, max(2 * self._key_buffer.shape[-2], self.length + new))
        self._key_buffer[..., self.length : self.length + new, :] = key_states
        self._value_buffer[..., self.length : self.length + new, :] = value_states
        self.length += new
        self.keys = self._key_buffer[..., : self.length, :]
        self.values = self._value_buffer[..., : self.length, :]
        return self.keys, self.values

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """Fresh buffers of ``capacity`` positions holding ``keys``/``values`` at their start."""
        self.length = keys.shape[-2]
        self._key_buffer = keys.new_empty(*keys.shape[:-2], capacity, keys.shape[-1])
        self._value_buffer = values.new_empty(*values.shape[:-2], capacity, values.shape[-1])
        self._key_buffer[..., : self.length, :] = keys
        self._value_buffer[..., : self.length, :] = values
        self.keys = self._key_buffer[..., : self.length, :]
        self.values = self._value_buffer[..., : self.length, :]

    def _adopt(self) -> None:
        """After ``DynamicLayer`` replaced the views (cropped, reordered or repeated rows), buffers
        for them again."""
        if self.is_initialized and self.keys is not None:
            self._allocate(self.keys, self.values, max(self.capacity, self.keys.shape[-2]))

    def reset(self) -> None:
        super().reset()
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._adopt()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._adopt()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._adopt()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._adopt()


def preallocated_cache(model: PreTrainedModel, capacity: int) -> dict[str, Cache]:
    """``generate`` keyword arguments that give ``model`` a :class:`PreallocatedLayer` cache of
    ``capacity`` positions per layer (transformers 5.24 renamed ``past_key_values`` to ``cache``)."""
    layers = [PreallocatedLayer(capacity) for _ in range(model.config.get_text_config().num_hidden_layers)]
    forward = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
    name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    return {name: Cache(layers=layers)}
