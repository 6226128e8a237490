"""One stored sample (LLaVA record + image bytes) -> model inputs, or a recorded reason to skip it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from mmkit.core.errors import DataError
from mmkit.core.interfaces import IMAGE_TOKEN
from mmkit.data.images import ImageProcessor
from mmkit.data.llava_records import IMAGE_EXTENSIONS
from mmkit.data.templates.llava_tokenization import IGNORE_INDEX
from mmkit.data.templates.template import ConversationTemplate


@dataclass
class EncodedSample:
    key: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None


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
    ) -> None:
        self.template = template
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length

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
        image_bytes = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        placeholders = sum(turn["value"].count(IMAGE_TOKEN) for turn in record["conversations"])
        expected = 0 if image_bytes is None else 1
        if placeholders != expected:
            raise DataError(f"{placeholders} {IMAGE_TOKEN} placeholders for {expected} image(s)")
        encoded = self.template.encode(record["conversations"], self.tokenizer, self.num_image_tokens)
        if len(encoded.input_ids) > self.max_length:
            raise DataError(f"{len(encoded.input_ids)} tokens exceed data.max_length={self.max_length}")
        if all(label == IGNORE_INDEX for label in encoded.labels):
            raise DataError("no assistant tokens to train on")
        # uint8 until the model normalises it on its device: a quarter of the bytes through
        # the worker queues and host-to-device copies.
        pixel_values = None if image_bytes is None else self.image_processor.resize_and_crop(
            self.image_processor.decode(image_bytes))
        return EncodedSample(
            key=key,
            input_ids=torch.tensor(encoded.input_ids, dtype=torch.long),
            labels=torch.tensor(encoded.labels, dtype=torch.long),
            pixel_values=pixel_values,
        )
