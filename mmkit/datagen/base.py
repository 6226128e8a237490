"""The teacher interface, and the LLaVA turn format every teacher writes.

A teacher sees an image only through its symbolic view (``{"captions": [...], "objects":
[{"category": ..., "bbox": [x1, y1, x2, y2]}, ...]}``), never the pixels, as GPT-4 saw COCO
images when it wrote LLaVA's instruction data.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import Any, Sequence

from mmkit.registry import TEACHERS

IMAGE_PLACEHOLDER = "<image>"

Turn = dict[str, str]
Conversation = list[Turn]


class Teacher(ABC):
    """Writes instruction-following conversations about one image from its symbolic view."""

    @abstractmethod
    def write(self, scene_view: dict[str, Any], rng: random.Random) -> list[Conversation]:
        """Conversations of alternating ``human``/``gpt`` turns; the first human turn of each
        holds ``<image>`` once (see :func:`conversation`)."""


TEACHERS.set_base(Teacher)


def with_image(text: str, rng: random.Random) -> str:
    """``text`` with the image placeholder before or after it, drawn at random as LLaVA does."""
    if rng.random() < 0.5:
        return f"{IMAGE_PLACEHOLDER}\n{text}"
    return f"{text}\n{IMAGE_PLACEHOLDER}"


def conversation(pairs: Sequence[tuple[str, str]], rng: random.Random) -> Conversation:
    """LLaVA turns from (instruction, reply) pairs, the image placed in the first instruction."""
    turns: Conversation = []
    for index, (instruction, reply) in enumerate(pairs):
        turns.append({"from": "human", "value": with_image(instruction, rng) if index == 0 else instruction})
        turns.append({"from": "gpt", "value": reply})
    return turns
