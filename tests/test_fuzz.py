"""Fuzzing the two doors bad input comes through: stored samples (random conversations, random
bytes as images) into the data path, and random override values into config validation. Only
the documented outcomes may come out: an encoded sample or a skip with its reason; a valid
config or one ``ConfigError`` line."""
from __future__ import annotations

import io
import json

import pytest
import torch
from conftest import compose
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmkit.core.errors import ConfigError
from mmkit.core.interfaces import ImageStats
from mmkit.core.registry import TEMPLATES, load_components
from mmkit.data.collate import Collator
from mmkit.data.images import ImageProcessor
from mmkit.data.samples import EncodedSample, SampleEncoder, SkippedSample
from mmkit.data.templates.llava_tokenization import IGNORE_INDEX
from mmkit.models.decoders.hf_causal_lm import prepare_tokenizer

load_components()
MAX_LENGTH = 96
IMAGE_TOKENS = 4


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 12), (200, 40, 90)).save(buffer, format="JPEG")
    return buffer.getvalue()


JPEG = _jpeg()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
words = st.lists(st.sampled_from(["<image>", "\n", "What", " is", " it?", " é", "</s>", "###", " USER:", "Yes."]),
                 max_size=12).map("".join)
turns = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "bot"]) | st.text(max_size=4),
                               "value": words | st.text(max_size=20) | json_values}) | json_values
records = st.fixed_dictionaries({"id": st.text(max_size=6), "conversations": st.lists(turns, max_size=5)}) | json_values
images = st.one_of(
    st.binary(max_size=200),
    st.integers(0, len(JPEG)).map(lambda cut: JPEG[:cut]),  # truncated anywhere
    st.tuples(st.integers(0, len(JPEG) - 1), st.integers(0, 255)).map(  # one byte changed
        lambda change: JPEG[: change[0]] + bytes([change[1]]) + JPEG[change[0] + 1:]),
    st.just(JPEG),
)
samples = st.fixed_dictionaries(
    {"__key__": st.text(min_size=1, max_size=8),
     "json": records.map(lambda record: json.dumps(record).encode()) | st.binary(max_size=100)},
    optional={"jpg": images},
)


@pytest.fixture(scope="module")
def encoders():
    tokenizer = prepare_tokenizer("zoo://tiny-llama")
    processor = ImageProcessor(ImageStats(16, (0.5,) * 3, (0.5,) * 3))
    return [SampleEncoder(TEMPLATES.build({"name": name}, "template"), tokenizer, processor, IMAGE_TOKENS, MAX_LENGTH)
            for name in ("vicuna_v1", "llava_v0", "plain")]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(samples, min_size=1, max_size=4), which=st.integers(0, 2))
def test_random_samples_are_encoded_or_skipped_with_a_reason(encoders, batch, which):
    encoder = encoders[which]
    results = [encoder(sample) for sample in batch]
    for sample, result in zip(batch, results):
        assert isinstance(result, (EncodedSample, SkippedSample))
        assert result.key == sample["__key__"]
        if isinstance(result, SkippedSample):
            assert result.reason
            continue
        assert len(result.input_ids) == len(result.labels) <= MAX_LENGTH
        assert (result.labels != IGNORE_INDEX).any()
        if "jpg" in sample:
            assert result.pixel_values.dtype == torch.uint8 and result.pixel_values.shape == (3, 16, 16)
    for batching in ("pad", "pack"):
        collated = Collator(encoder.tokenizer.pad_token_id, batching)(results)
        assert len(collated["keys"]) + len(collated["skipped"]) == len(batch)


KEYS = [
    "seed", "guards.max_skip_fraction", "guards.min_samples_checked", "guards.max_nonfinite_steps",
    "checkpoint.every_n_steps", "checkpoint.keep_last", "checkpoint.keep_after_stage", "peak_tflops", "resume",
    "data.max_length", "data.num_workers", "data.batching", "data.pack_length", "data.shuffle_buffer",
    "recipe.stages.pretrain.epochs", "recipe.stages.pretrain.max_steps", "recipe.stages.finetune.micro_batch_size",
    "recipe.stages.finetune.global_batch_size", "recipe.stages.finetune.optimizer.lr",
    "recipe.stages.finetune.optimizer.betas", "recipe.stages.pretrain.schedule.warmup_ratio",
    "recipe.stages.pretrain.train", "recipe.stages.finetune.template.name", "connector.name", "encoder.layer",
    "decoder.lora.enabled", "log_sample_keys", "no_such_key", "guards.no_such_key",
]
VALUES = st.one_of(
    st.integers(-3, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet="abcxyz_01", min_size=1, max_size=6),
    st.sampled_from(["null", "true", "false", "[0.9,0.999]", "[2]", "[connector,decoder]", "[]", "{a: 1}", "''"]),
)


@settings(max_examples=30, deadline=None)
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
def test_random_override_values_give_a_valid_config_or_one_config_error(overrides):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from mmkit.core.config import check_composition
    from mmkit.training.recipe import check_recipe

    arguments = [f"{key}={value}" for key, value in dict(overrides).items()]
    try:
        OverridesParser.create().parse_overrides(arguments)
    except HydraException:
        assume(False)  # not an override at all: Hydra's own parser reports it
    try:
        check_composition("config", arguments)
        check_recipe(compose(arguments))
    except ConfigError as error:
        message = str(error)
        assert message and "\n" not in message
