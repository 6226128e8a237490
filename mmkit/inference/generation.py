"""Answers from a VisionLanguageModel, prompted exactly as it was trained: batched (greedy or
sampled, stop strings, KV cache) or streamed piece by piece."""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from mmkit.core.errors import ConfigError, DataError
from mmkit.data.images import DEFAULT_LIMITS, ImageLimits, ImageProcessor, read_image_file
from mmkit.data.templates.template import ConversationTemplate
from mmkit.models.vlm import VisionLanguageModel


@dataclass(frozen=True)
class Prompt:
    conversation: list[dict]  # LLaVA turns ending with the human turn to answer
    image: Image.Image | Path | None  # a path is opened only when the prompt is answered
    system: str | None = None  # replaces the template's system prompt (an API's system message)

    @property
    def text(self) -> str:
        """The question as asked: the last human turn."""
        return str(self.conversation[-1]["value"])

    def load_image(self, limits: ImageLimits | ImageProcessor = DEFAULT_LIMITS) -> Image.Image | None:
        """The image, a path decoded now; one over ``limits`` is refused from its header with a
        DataError naming the file."""
        if isinstance(self.image, Path):
            return read_image_file(self.image, limits)
        return self.image


@dataclass(frozen=True)
class Sampling:
    """How to continue a prompt. ``temperature`` 0 is greedy decoding (the paper's evaluations);
    above 0 samples, from the smallest set of tokens whose probability reaches ``top_p``.
    Text from the first of ``stop`` on is dropped, and generation ends there."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}: must be in (0, 1]")

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


@dataclass(frozen=True)
class Reply:
    text: str
    completion_tokens: int  # tokens generated, the end-of-sequence token excluded
    finish_reason: str  # "stop": the model ended it or a stop string did; "length": max_new_tokens ran out


class AnswerGenerator:
    """Answers prompts with a model, in batches (left-padded, KV cache), or one streamed reply."""

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

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def replies(self, prompts: Sequence[Prompt], sampling: Sampling | None = None) -> list[Reply]:
        """Replies with their token counts and finish reasons, batched (no progress bar)."""
        replies: list[Reply] = []
        sampling = sampling or Sampling(max_new_tokens=self.max_new_tokens)
        for start in range(0, len(prompts), self.batch_size):
            replies += self._replies(prompts[start : start + self.batch_size], sampling)
        return replies

    def answer(
        self, prompts: Sequence[Prompt], progress: bool = True, desc: str = "answering", sampling: Sampling | None = None
    ) -> list[str]:
        answers: list[str] = []
        for _, texts in self.answer_batches(prompts, progress, desc, sampling):
            answers += texts
        return answers

    def answer_batches(
        self,
        prompts: Sequence[Prompt],
        progress: bool = True,
        desc: str = "answering",
        sampling: Sampling | None = None,
    ) -> Iterator[tuple[slice, list[str]]]:
        """(which prompts, their answers) one batch at a time, so callers can save as they go."""
        sampling = sampling or Sampling(max_new_tokens=self.max_new_tokens)
        with tqdm(total=len(prompts), desc=desc, unit="item", disable=not progress or not prompts) as bar:
            for start in range(0, len(prompts), self.batch_size):
                batch = slice(start, min(start + self.batch_size, len(prompts)))
                yield batch, [reply.text for reply in self._replies(prompts[batch], sampling)]
                bar.update(batch.stop - batch.start)

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """One image's embeddings ``[1, num_image_tokens, E]``, to reuse across prompts."""
        with torch.no_grad():
            return self.model.encode_images(self.image_processor(image).unsqueeze(0).to(self.device))

    def stream(
        self,
        prompt: Prompt,
        sampling: Sampling | None = None,
        image_embeds: torch.Tensor | None = None,
        on_finish: Callable[[Reply], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> Iterator[str]:
        """The reply to one prompt, piece by piece as it is generated; with ``image_embeds`` the
        prompt's image is not encoded again. Text that could begin a stop string is held back
        until it is clear that it does not. ``on_finish`` gets the whole :class:`Reply` at the end,
        unless ``cancelled`` was set: then generation stops at its next token and the text ends there."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        sampling = sampling or Sampling(max_new_tokens=self.max_new_tokens)
        streamer = TextIteratorStreamer(self.model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        inputs = self._inputs([prompt], with_images=image_embeds is None)
        failure: list[BaseException] = []
        generated: list[torch.Tensor] = []
        extra: dict = {}
        if cancelled is not None:

            class _Cancelled(StoppingCriteria):
                def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
                    return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool, device=input_ids.device)

            extra["stopping_criteria"] = StoppingCriteriaList([_Cancelled()])

        def generate() -> None:
            try:
                generated.append(
                    self._generate(inputs, sampling, image_embeds=image_embeds, streamer=streamer, **extra)[0])
            except BaseException as exc:  # re-raised in the caller's thread
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        stops = self._stops(sampling)
        pending, stopped, started = "", False, False
        for piece in streamer:
            if stopped or (cancelled is not None and cancelled.is_set()):  # drain: generation ends by itself
                continue
            pending += piece
            cut = _first_stop(pending, stops)
            if cut is not None:
                pending, stopped = pending[:cut], True
                continue
            if not started:  # a reply starts at its first visible character, as answer() gives it
                pending = pending.lstrip()
            # Trailing whitespace waits for what follows it: at the end of a reply it is dropped, as
            # answer() strips it.
            safe = min(len(pending) - _longest_stop_prefix(pending, stops), len(pending.rstrip()))
            if safe > 0:
                yield pending[:safe]
                pending, started = pending[safe:], True
        worker.join()
        if failure:
            raise failure[0]
        if cancelled is not None and cancelled.is_set():
            return
        pending = pending.rstrip() if started else pending.strip()
        if pending:
            yield pending
        if on_finish is not None:
            on_finish(self._reply(generated[0], sampling))

    def _replies(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Reply]:
        generated = self._generate(self._inputs(prompts, with_images=True), sampling)
        return [self._reply(row, sampling) for row in generated]

    def _reply(self, row: torch.Tensor, sampling: Sampling) -> Reply:
        tokenizer = self.model.tokenizer
        ids = row.tolist()
        ended = tokenizer.eos_token_id in ids
        ids = ids[: ids.index(tokenizer.eos_token_id)] if ended else [i for i in ids if i != tokenizer.pad_token_id]
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        text = _cut(decoded, self._stops(sampling))
        ended = ended or text != decoded or len(ids) < sampling.max_new_tokens
        return Reply(text.strip(), len(ids), "stop" if ended else "length")

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The token ids the model reads for ``prompt``, image positions included."""
        template = self.template
        if prompt.system is not None:
            if not hasattr(template, "system"):
                raise DataError(f"a system prompt was given, but the {type(template).__name__} format has none")
            template = copy.copy(template)
            template.system = prompt.system
        return template.encode(prompt.conversation, self.model.tokenizer, self.model.num_image_tokens, for_generation=True).input_ids

    def _inputs(self, prompts: Sequence[Prompt], with_images: bool) -> dict[str, torch.Tensor | None]:
        tokenizer = self.model.tokenizer
        encoded = [self.prompt_ids(p) for p in prompts]
        # Left padding keeps every prompt's last token at the end, where generation continues.
        length = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), length), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, length - len(ids) :] = torch.tensor(ids)
            attention_mask[row, length - len(ids) :] = 1
        pixel_values = None
        if with_images:
            # The processor's limits: the run's image_limits and the area its preprocessing needs.
            images = [self.image_processor(p.load_image(self.image_processor)) for p in prompts if p.image is not None]
            pixel_values = torch.stack(images) if images else None
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}

    def _generate(self, inputs: dict, sampling: Sampling, **kwargs) -> torch.Tensor:
        device = self.device
        stops = self._stops(sampling)
        if stops:
            kwargs.update(stop_strings=list(stops), tokenizer=self.model.tokenizer)
        pixel_values = inputs["pixel_values"]
        return self.model.generate(
            inputs["input_ids"].to(device),
            inputs["attention_mask"].to(device),
            None if pixel_values is None else pixel_values.to(device),
            max_new_tokens=sampling.max_new_tokens,
            **sampling.generate_kwargs(),
            **kwargs,
        )

    def _stops(self, sampling: Sampling) -> tuple[str, ...]:
        stop_text = self.template.stop_text
        return tuple(s for s in (*sampling.stop, *([stop_text] if stop_text else [])) if s)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    positions = [text.index(stop) for stop in stops if stop in text]
    return min(positions) if positions else None


def _cut(text: str, stops: Sequence[str]) -> str:
    cut = _first_stop(text, stops)
    return text if cut is None else text[:cut]


def _longest_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string."""
    return max((n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
