"""Batched greedy answers from a VisionLanguageModel, prompted exactly as it was trained."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image
from tqdm import tqdm

from mmkit.data.images import ImageProcessor
from mmkit.data.templates.base import ConversationTemplate
from mmkit.models.vlm import VisionLanguageModel


@dataclass(frozen=True)
class Prompt:
    conversation: list[dict]  # LLaVA turns ending with the human turn to answer
    image: Image.Image | None


class AnswerGenerator:
    def __init__(
        self,
        model: VisionLanguageModel,
        template: ConversationTemplate,
        image_processor: ImageProcessor,
        batch_size: int = 32,
        max_new_tokens: int = 32,
    ) -> None:
        self.model = model
        self.template = template
        self.image_processor = image_processor
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens

    def answer(self, prompts: Sequence[Prompt], progress: bool = True, desc: str = "answering") -> list[str]:
        answers: list[str] = []
        starts = range(0, len(prompts), self.batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
            answers += self._answer_batch(prompts[start : start + self.batch_size])
        return answers

    def _answer_batch(self, prompts: Sequence[Prompt]) -> list[str]:
        tokenizer = self.model.tokenizer
        encoded = [
            self.template.encode(p.conversation, tokenizer, self.model.num_image_tokens, for_generation=True).input_ids
            for p in prompts
        ]
        # Left padding keeps every prompt's last token at the end, where generation continues.
        length = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), length), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, length - len(ids) :] = torch.tensor(ids)
            attention_mask[row, length - len(ids) :] = 1
        images = [self.image_processor(p.image) for p in prompts if p.image is not None]
        pixel_values = torch.stack(images) if images else None
        device = next(self.model.parameters()).device
        generated = self.model.generate(
            input_ids.to(device),
            attention_mask.to(device),
            None if pixel_values is None else pixel_values.to(device),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
        )
        return [self._clean(tokenizer.decode(row, skip_special_tokens=True)) for row in generated]

    def _clean(self, text: str) -> str:
        stop = self.template.stop_text
        if stop and stop in text:
            text = text[: text.index(stop)]
        return text.strip()
