"""The preallocated KV cache gives what transformers' DynamicCache gives, token for token."""
from __future__ import annotations

import pytest
import torch
from conftest import save_random_llama
from transformers import LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

from mmkit.models import kv_cache
from mmkit.models.kv_cache import PreallocatedLayer, preallocated_cache


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = save_random_llama(tmp_path_factory.mktemp("kv_lm"), num_key_value_heads=2, initializer_range=0.2)
    return LlamaForCausalLM.from_pretrained(folder).eval()


def states(generator: torch.Generator, length: int, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 2, length, 8, generator=generator), torch.randn(batch, 2, length, 8, generator=generator)


def test_a_layer_holds_what_concatenation_holds_past_its_capacity_and_after_edits():
    generator = torch.Generator().manual_seed(0)
    preallocated, dynamic = PreallocatedLayer(capacity=6), DynamicLayer()
    steps = [states(generator, n) for n in (4, 1, 1, 3, 1)]  # 10 positions: the 6 planned are outgrown
    for keys, values in steps:
        got, expected = preallocated.update(keys, values), dynamic.update(keys, values)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert preallocated.get_seq_length() == dynamic.get_seq_length() == 10
    for edit in (lambda layer: layer.crop(-2), lambda layer: layer.batch_select_indices(torch.tensor([2, 0])),
                 lambda layer: layer.batch_repeat_interleave(2), lambda layer: layer.reorder_cache(torch.tensor([3, 1, 0, 2]))):
        edit(preallocated)
        edit(dynamic)
        keys, values = states(generator, 1, batch=dynamic.keys.shape[0])
        for a, b in zip(preallocated.update(keys, values), dynamic.update(keys, values)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("sampling", [{"do_sample": False}, {"do_sample": True, "temperature": 0.9, "top_p": 0.8}])
def test_generate_with_the_preallocated_cache_equals_the_default_cache(lm, sampling, monkeypatch):
    """Left-padded rows of different lengths, greedy and sampled (same seed); with room for half
    the new tokens at first, so the buffers also grow mid-generation."""
    monkeypatch.setattr(kv_cache, "FIRST_NEW_TOKENS", 8)
    ids = torch.randint(5, 200, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :2] = 0
    outputs = []
    for cache in ({}, preallocated_cache(lm, ids.shape[1], 16)):
        torch.manual_seed(3)
        with torch.no_grad():
            outputs.append(lm.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16,
                                       pad_token_id=0, **sampling, **cache))
    assert torch.equal(outputs[0], outputs[1])
    assert len(set(outputs[0][:, ids.shape[1]:].flatten().tolist())) > 3  # the replies are not one token repeated


def test_sliding_window_models_keep_transformers_own_cache(lm):
    lm.config.sliding_window = 4
    try:
        assert preallocated_cache(lm, 9, 16) == {}
    finally:
        lm.config.sliding_window = None
