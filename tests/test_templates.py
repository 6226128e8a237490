"""Conversation templates: labels unmask exactly the assistant replies, image tokens expand exactly."""
from __future__ import annotations

import pytest

from mmkit.core.errors import DataError
from mmkit.core.registry import TEMPLATES, load_components
from mmkit.data.templates.llava_tokenization import IGNORE_INDEX
from mmkit.data.templates.template import LLAVA_SYSTEM
from mmkit.models.decoders.hf_causal_lm import prepare_tokenizer

load_components()
NUM_IMAGE_TOKENS = 7

CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat colour is the circle?"},
    {"from": "gpt", "value": "Red."},
    {"from": "human", "value": "How many objects are there?"},
    {"from": "gpt", "value": "There are three objects: a red circle, a blue square and a green triangle."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return prepare_tokenizer("zoo://tiny-llama")


def trained_spans(labels: list[int]) -> list[list[int]]:
    """Maximal runs of label positions that are not ignored."""
    spans, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


def render_without_images(tokenizer, input_ids: list[int]) -> str:
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    text, run = [], []
    for token in input_ids:
        if token == image_id:
            if run:
                text.append(tokenizer.decode(run))
                run = []
            text.append("<IMG>")
        else:
            run.append(token)
    return "".join(text) + tokenizer.decode(run)


def encode(name: str, tokenizer, conversation=CONVERSATION, **options):
    template = TEMPLATES.get(name)(**options)
    return template.encode(conversation, tokenizer, NUM_IMAGE_TOKENS)


@pytest.mark.parametrize(
    "name, reply_format",
    [("vicuna_v1", " {}</s>"), ("llava_v0", " {}###")],
)
def test_labels_decode_to_exactly_the_assistant_replies(tokenizer, name, reply_format):
    encoded = encode(name, tokenizer)
    assert len(encoded.input_ids) == len(encoded.labels)
    replies = [turn["value"] for turn in CONVERSATION if turn["from"] == "gpt"]
    spans = trained_spans(encoded.labels)
    assert [tokenizer.decode(span) for span in spans] == [reply_format.format(r) for r in replies]
    # Trained positions carry their own token as the label.
    for token, label in zip(encoded.input_ids, encoded.labels):
        assert label in (IGNORE_INDEX, token)


def test_vicuna_v1_renders_llava_format(tokenizer):
    encoded = encode("vicuna_v1", tokenizer)
    assert encoded.input_ids[0] == tokenizer.bos_token_id
    text = render_without_images(tokenizer, encoded.input_ids[1:])
    expected = (
        f"{LLAVA_SYSTEM} USER: " + "<IMG>" * NUM_IMAGE_TOKENS + "\nWhat colour is the circle? ASSISTANT: Red.</s>"
        "USER: How many objects are there? ASSISTANT: There are three objects: a red circle, a blue square "
        "and a green triangle.</s>"
    )
    assert text == expected


def test_llava_v0_renders_hash_separators(tokenizer):
    text = render_without_images(tokenizer, encode("llava_v0", tokenizer).input_ids[1:])
    assert text.startswith(f"{LLAVA_SYSTEM}###Human: <IMG>")
    assert text.endswith("###Human: How many objects are there?###Assistant: There are three objects: "
                         "a red circle, a blue square and a green triangle.###")


def test_plain_trains_on_caption_and_separator_only(tokenizer):
    conversation = [{"from": "human", "value": "Describe the image briefly.\n<image>"}, {"from": "gpt", "value": "A red circle."}]
    encoded = encode("plain", tokenizer, conversation)
    text = render_without_images(tokenizer, encoded.input_ids[1:])
    assert text == "<IMG>" * NUM_IMAGE_TOKENS + "A red circle.\n"  # the instruction is dropped
    assert [tokenizer.decode(s) for s in trained_spans(encoded.labels)] == ["A red circle.\n"]


@pytest.mark.parametrize("name", ["plain", "vicuna_v1", "llava_v0"])
def test_image_placeholder_expands_to_a_contiguous_untrained_block(tokenizer, name):
    encoded = encode(name, tokenizer)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    positions = [i for i, token in enumerate(encoded.input_ids) if token == image_id]
    assert len(positions) == NUM_IMAGE_TOKENS
    assert positions == list(range(positions[0], positions[0] + NUM_IMAGE_TOKENS))
    assert all(encoded.labels[i] == IGNORE_INDEX for i in positions)


def test_generation_prompt_ends_with_the_assistant_header(tokenizer):
    template = TEMPLATES.get("vicuna_v1")()
    prompt = template.encode(CONVERSATION[:3], tokenizer, NUM_IMAGE_TOKENS, for_generation=True)
    assert render_without_images(tokenizer, prompt.input_ids).endswith("USER: How many objects are there? ASSISTANT:")
    assert [tokenizer.decode(span) for span in trained_spans(prompt.labels)] == [" Red.</s>"]
    full = encode("vicuna_v1", tokenizer)
    # The prompt is a prefix of the training sequence: what the model saw in training is what it is asked.
    assert full.input_ids[: len(prompt.input_ids)] == prompt.input_ids


@pytest.mark.parametrize(
    "conversation, message",
    [
        ([{"from": "human", "value": "<image>\nHi"}], "no assistant reply"),
        ([{"from": "gpt", "value": "Hello"}], "alternate"),
        ([{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}], "unknown speaker"),
        ([], "empty"),
        ([{"from": "human"}], "not a"),
    ],
)
def test_malformed_conversations_raise_data_errors(tokenizer, conversation, message):
    with pytest.raises(DataError, match=message):
        encode("vicuna_v1", tokenizer, conversation)


def test_a_format_whose_text_the_tokenizer_cannot_represent_is_refused_naming_the_key():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mmkit.core.errors import ConfigError
    from mmkit.models.decoders.hf_causal_lm import prepare_tokenizer

    for name in ("vicuna_v1", "llava_v0", "plain"):  # every built-in format with the zoo's byte-level BPE
        TEMPLATES.build({"name": name}, "template").check_tokenizer(prepare_tokenizer("zoo://tiny-llama"), "template")
    words = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "Hi": 3, "Yes": 4}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    narrow = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    with pytest.raises(ConfigError, match=r"^recipe\.stages\.finetune\.template: the tokenizer cannot represent \['A', 'chat'"):
        TEMPLATES.build({"name": "vicuna_v1"}, "template").check_tokenizer(narrow, "recipe.stages.finetune.template")
    no_eos = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>")
    with pytest.raises(ConfigError, match="ends every reply with the eos token, but the tokenizer has none"):
        TEMPLATES.build({"name": "vicuna_v1"}, "template").check_tokenizer(no_eos, "template")
