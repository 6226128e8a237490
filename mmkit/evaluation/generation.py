"""Batched greedy answers from a VisionLanguageModel, prompted exactly as it was trained."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from mmkit.data.images import ImageProcessor
from mmkit.data.templates.base import ConversationTemplate
from mmkit.models.vlm import VisionLanguageModel


@dataclass(frozen=True)
class Prompt:
    conversation: list[dict]  # LLaVA turns ending with the human turn to answer
    image: Image.Image | Path | None  # a path is opened only when the prompt is answered

    @property
    def text(self) -> str:
        """The question as asked: the last human turn."""
        return str(self.conversation[-1]["value"])

    def load_image(self) -> Image.Image | None:
        if isinstance(self.image, Path):
            from mmkit.data.images import decode_image

            return decode_image(self.image.read_bytes())
        return self.image


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
        for _, texts in self.answer_batches(prompts, progress, desc):
            answers += texts
        return answers

    def answer_batches(
        self, prompts: Sequence[Prompt], progress: bool = True, desc: str = "answering"
    ) -> Iterator[tuple[slice, list[str]]]:
        """(which prompts, their answers) one batch at a time, so callers can save as they go."""
        with tqdm(total=len(prompts), desc=desc, unit="item", disable=not progress or not prompts) as bar:
            for start in range(0, len(prompts), self.batch_size):
                batch = slice(start, min(start + self.batch_size, len(prompts)))
                yield batch, self._answer_batch(prompts[batch])
                bar.update(batch.stop - batch.start)

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
        images = [self.image_processor(p.load_image()) for p in prompts if p.image is not None]
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
