"""Stage-1 data: LLaVA's naive expansion of a caption into a one-turn conversation.

A brief-description instruction drawn at random is answered by one of the image's captions.
The instructions are our own wordings in the spirit of the LLaVA paper's list.
"""
from __future__ import annotations

import random
from typing import Any

from mmkit.core.registry import TEACHERS
from mmkit.datagen.teacher import Teacher, Written, conversation

BRIEF_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the image briefly.",
    "Give a short description of this image.",
    "What does the picture show? Answer in one or two sentences.",
    "Write a brief caption for the image.",
    "Summarise the contents of the image.",
    "Tell me briefly what you see.",
    "Provide a concise account of the picture.",
    "Sum up the image in a few words.",
    "What is in this image? Keep it short.",
    "Offer a quick description of the scene.",
    "Caption this picture briefly.",
)


@TEACHERS.register("caption")
class CaptionTeacher(Teacher):
    """One conversation per image (type ``caption``): a brief-description instruction and a
    caption as the reply."""

    def write(self, scene_view: dict[str, Any], rng: random.Random) -> list[Written]:
        instruction = rng.choice(BRIEF_INSTRUCTIONS)
        caption = rng.choice(scene_view["captions"])
        return [Written("caption", conversation([(instruction, caption)], rng))]
