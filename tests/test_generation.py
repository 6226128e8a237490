"""Generation: batched greedy equals one-at-a-time, sampling, stop strings, streaming, image reuse."""
from __future__ import annotations

import pytest
import torch

from mmkit.core.errors import ConfigError
from mmkit.inference.from_run import build_generator
from mmkit.inference.generation import Prompt, Sampling
from mmkit.synth.world import generate_scenes, render

QUESTIONS = [
    "What colour is the circle?", "How many objects?", "Describe the image in detail, please.",
    "Is there a red square in the picture or not?", "Where?", "Which is larger, the circle or the square?",
]


@pytest.fixture(scope="module")
def generator(lively_model):
    cfg, model = lively_model
    return build_generator(cfg, model, batch_size=4, max_new_tokens=16)


@pytest.fixture(scope="module")
def prompts():
    scenes = generate_scenes("test", len(QUESTIONS), seed=0)
    return [Prompt([{"from": "human", "value": f"<image>\n{q}"}], render(s)) for q, s in zip(QUESTIONS, scenes)]


def test_batched_greedy_generation_gives_the_same_text_as_one_at_a_time(generator, prompts):
    batched = generator.answer(prompts, progress=False)
    assert batched == [generator.answer([p], progress=False)[0] for p in prompts]
    assert len(set(batched)) == len(batched)  # the prompts really get different replies


def test_sampling_follows_temperature_and_top_p(generator, prompts):
    greedy = generator.answer(prompts[:3], progress=False)
    # top_p so small that only the most likely token is ever kept: sampling becomes greedy.
    assert generator.answer(prompts[:3], progress=False, sampling=Sampling(16, temperature=1.0, top_p=1e-9)) == greedy
    torch.manual_seed(0)
    sampled = generator.answer(prompts[:3], progress=False, sampling=Sampling(16, temperature=1.5))
    torch.manual_seed(0)
    assert generator.answer(prompts[:3], progress=False, sampling=Sampling(16, temperature=1.5)) == sampled
    assert sampled != greedy


def test_stop_strings_and_max_new_tokens(generator, prompts):
    full = generator.answer(prompts[:1], progress=False, sampling=Sampling(16))[0]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert generator.answer(prompts[:1], progress=False, sampling=Sampling(16, stop=(stop,)))[0] == full[: full.index(stop)].strip()
    (short,) = generator.replies(prompts[:1], Sampling(2))
    assert (short.completion_tokens, short.finish_reason) == (2, "length") and full.startswith(short.text)
    (stopped,) = generator.replies(prompts[:1], Sampling(16, stop=(stop,)))
    assert stopped.finish_reason == "stop" and stopped.completion_tokens < 16
    with pytest.raises(ConfigError, match="top_p"):
        Sampling(16, temperature=1.0, top_p=0)


def test_streaming_yields_the_batched_text_piece_by_piece_and_reuses_the_image(generator, prompts):
    for prompt in prompts[:3]:
        pieces = list(generator.stream(prompt, Sampling(16)))
        assert len(pieces) > 1 and "".join(pieces) == generator.answer([prompt], progress=False)[0]
    full = generator.answer(prompts[:1], progress=False)[0]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert "".join(generator.stream(prompts[0], Sampling(16, stop=(stop,)))) == full[: full.index(stop)].strip()
    image_embeds = generator.encode_image(prompts[0].load_image())
    assert "".join(generator.stream(prompts[0], Sampling(16), image_embeds=image_embeds)) == full
