"""One stored sample (LLaVA record + image bytes) -> model inputs, or a recorded reason to skip it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from mmkit.core.errors import ConfigError, DataError
from mmkit.core.interfaces import IMAGE_TOKEN
from mmkit.data.images import ImageProcessor
from mmkit.data.llava_records import IMAGE_EXTENSIONS
from mmkit.data.templates.llava_tokenization import IGNORE_INDEX
from mmkit.data.templates.template import ASSISTANT, ROLE_ALIASES, ConversationTemplate

# What to do with a sample longer than data.max_length: cut it there, as LLaVA's training does
# (the ids and the labels alike), or skip it.
TOO_LONG = ("truncate", "skip")
# What to do with a conversation whose first turn is the assistant's: drop that turn, as LLaVA's
# preprocessing does, or skip the sample.
LEADING_GPT_TURN = ("drop", "skip")


@dataclass
class EncodedSample:
    key: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    truncated_from: int | None = None  # its length before it was cut to data.max_length; None: not cut


@dataclass
class SkippedSample:
    key: str
    reason: str


class SampleEncoder:
    """Turns WebDataset samples into training inputs for one template/tokenizer/encoder."""

    def __init__(
        self,
        template: ConversationTemplate,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: ImageProcessor,
        num_image_tokens: int,
        max_length: int,
        too_long: str = "truncate",
        leading_gpt_turn: str = "drop",
    ) -> None:
        if too_long not in TOO_LONG:
            raise ConfigError(f"data.too_long={too_long!r}: choose one of {', '.join(TOO_LONG)}")
        if leading_gpt_turn not in LEADING_GPT_TURN:
            raise ConfigError(f"data.leading_gpt_turn={leading_gpt_turn!r}: choose one of {', '.join(LEADING_GPT_TURN)}")
        self.template = template
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.too_long = too_long
        self.leading_gpt_turn = leading_gpt_turn
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def __call__(self, sample: dict[str, Any]) -> EncodedSample | SkippedSample:
        key = str(sample.get("__key__", "?"))
        try:
            return self.encode(key, sample)
        except DataError as exc:
            return SkippedSample(key, str(exc))

    def encode(self, key: str, sample: dict[str, Any]) -> EncodedSample:
        if "json" not in sample:
            raise DataError("no .json member")
        try:
            record = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"undecodable JSON: {exc}") from None
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise DataError("the JSON record has no 'conversations' list")
        for index, turn in enumerate(record["conversations"]):
            if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
                raise DataError(f"conversation turn {index} is not {{'from': text, 'value': text}}")
        conversation = self._from_the_human(record["conversations"])
        image_bytes = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        placeholders = sum(turn["value"].count(IMAGE_TOKEN) for turn in conversation)
        expected = 0 if image_bytes is None else 1
        if placeholders != expected:
            raise DataError(f"{placeholders} {IMAGE_TOKEN} placeholders for {expected} image(s)")
        encoded = self.template.encode(conversation, self.tokenizer, self.num_image_tokens)
        input_ids, labels = encoded.input_ids, encoded.labels
        truncated_from = None
        if len(input_ids) > self.max_length:
            self._check_truncation(input_ids)
            truncated_from = len(input_ids)
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError("no assistant tokens to train on")
        # uint8 until the model normalises it on its device: a quarter of the bytes through
        # the worker queues and host-to-device copies.
        pixel_values = None if image_bytes is None else self.image_processor.resize_and_crop(
            self.image_processor.decode(image_bytes))
        return EncodedSample(
            key=key,
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            pixel_values=pixel_values,
            truncated_from=truncated_from,
        )

    def _from_the_human(self, conversation: list[dict[str, str]]) -> list[dict[str, str]]:
        """The conversation without a first turn of the assistant's, which LLaVA drops
        (``preprocess``: ``if roles[source[0]["from"]] != conv.roles[0]: source = source[1:]``)."""
        if not conversation or ROLE_ALIASES.get(conversation[0]["from"].lower()) != ASSISTANT:
            return conversation
        if self.leading_gpt_turn == "skip":
            raise DataError(f"the conversation starts with a {conversation[0]['from']!r} turn "
                            "(data.leading_gpt_turn=skip)")
        return conversation[1:]

    def _check_truncation(self, input_ids: list[int]) -> None:
        """DataError unless the sample may be cut at data.max_length: the policy allows it, and the
        cut leaves every image token (a part of an image would not match its features)."""
        if self.too_long == "skip":
            raise DataError(f"{len(input_ids)} tokens exceed data.max_length={self.max_length} (data.too_long=skip)")
        image_tokens = input_ids.count(self.image_token_id)
        if input_ids[: self.max_length].count(self.image_token_id) != image_tokens:
            raise DataError(f"{len(input_ids)} tokens exceed data.max_length={self.max_length}, and cutting there "
                            f"would cut the image's {image_tokens} tokens")
