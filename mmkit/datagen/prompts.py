"""Prompts for a text-only chat model that writes LLaVA's three response types, and parsers
that turn its replies back into conversations.

The design follows the LLaVA paper (the teacher is given an image's captions and its objects'
categories with boxes, never the pixels; one system prompt and a few hand-written examples per
response type; it answers as if it saw the image). The wording and the examples are our own.

A request is ``system prompt, (example context, example reply) * k, scene context``; the
context is the scene's symbolic view written out as text (:func:`format_context`). Replies with
questions use ``Question:`` / ``Answer:`` blocks, which :func:`parse_reply` reads back.
"""
from __future__ import annotations

import re
from typing import Any

from mmkit.datagen.teacher import IMAGE_PLACEHOLDER, RESPONSE_TYPES, UnusableOutput

_SHARED = (
    "You are a visual assistant describing a single image. You cannot see its pixels. Instead you "
    "are given the notes an annotator made about it: a few captions, each describing the whole "
    "image in its own words, and a list of the objects in it, each with its category and its box "
    "[x1, y1, x2, y2]. Box coordinates are fractions of the image's width and height, from 0 to 1, "
    "measured from the top-left corner: x grows to the right and y grows downwards. Where an object "
    "is, how big it is and how objects lie relative to each other can all be read off the boxes.\n"
    "Treat the notes as what you see, and write as someone looking at the image: never mention "
    "captions, notes, annotations, boxes or coordinates, never quote a number from a box, and never "
    "state anything the notes do not support."
)

SYSTEM_PROMPTS: dict[str, str] = {
    "conversation": _SHARED + "\n\n" + (
        "Task: write a conversation in which a person asks about the image and you answer. Ask "
        "varied questions whose answers are certain from what you see: which objects there are, "
        "their colours and sizes, how many there are of a kind, where each one is in the image, "
        "and how two objects are placed relative to each other. Include at least one question "
        "about something that is not in the image, and answer it with a clear no. Keep answers "
        "short, exact and friendly.\n"
        "Write three to five question-answer pairs in exactly this form, with a blank line "
        "between pairs and nothing before or after them:\n"
        "Question: <the person's question>\n"
        "Answer: <your answer>"
    ),
    "detailed": _SHARED + "\n\n" + (
        "Task: describe the image in detail for someone who cannot see it. Cover every object: what "
        "it is, its colour and size, and where it is in the image; then say how the objects are "
        "arranged relative to each other and which parts of the image are empty. Use the captions "
        "for the overall picture and the object list for exact positions and counts. Write one or "
        "two plain paragraphs: no lists, no headings, no questions."
    ),
    "reasoning": _SHARED + "\n\n" + (
        "Task: ask one question about the image that cannot be answered by naming a single thing: "
        "answering it must combine several facts, for example counting the objects that share a "
        "property, comparing the sizes or places of several objects, or working out what is true "
        "of one part of the image. The question must have a definite answer. Then answer it: state "
        "the facts you use one by one, then the conclusion that follows from them.\n"
        "Use exactly this form, with nothing before or after it:\n"
        "Question: <the question>\n"
        "Answer: <the facts and the conclusion>"
    ),
}

# Hand-written examples: (symbolic view, reply for each response type).
_EXAMPLE_VIEWS: tuple[dict[str, Any], ...] = (
    {
        "captions": [
            "Three shapes on a gray background: a large green square in the top left, a small red "
            "circle in the top right and a small green triangle in the bottom right.",
            "A picture of a small red circle, a large green square and a small green triangle.",
            "There are three shapes in the image. A small green triangle is in the bottom right. "
            "A large green square is in the top left. A small red circle is in the top right.",
            "In the top right there is a small red circle, in the top left there is a large green "
            "square, and in the bottom right there is a small green triangle.",
            "A large green square, a small green triangle and a small red circle are drawn on a gray background.",
        ],
        "objects": [
            {"category": "green square", "bbox": [0.06, 0.08, 0.42, 0.44]},
            {"category": "red circle", "bbox": [0.6, 0.2, 0.78, 0.38]},
            {"category": "green triangle", "bbox": [0.7, 0.62, 0.88, 0.8]},
        ],
    },
    {
        "captions": [
            "Two objects on a white background: a large yellow circle in the top right and a small "
            "blue triangle in the bottom left.",
            "An image of a small blue triangle and a large yellow circle.",
            "There are two shapes in the picture. A large yellow circle is in the top right. A small "
            "blue triangle is in the bottom left.",
            "In the bottom left there is a small blue triangle, and in the top right there is a large yellow circle.",
            "A large yellow circle and a small blue triangle are shown on a white background.",
        ],
        "objects": [
            {"category": "yellow circle", "bbox": [0.55, 0.1, 0.91, 0.46]},
            {"category": "blue triangle", "bbox": [0.12, 0.6, 0.3, 0.78]},
        ],
    },
)

_EXAMPLE_REPLIES: dict[str, tuple[str, ...]] = {
    "conversation": (
        "Question: What shapes can you see in the picture?\n"
        "Answer: There are three shapes: a square, a circle and a triangle.\n\n"
        "Question: What colour is the circle?\n"
        "Answer: The circle is red.\n\n"
        "Question: Is there anything blue in the image?\n"
        "Answer: No, nothing in the image is blue. The shapes are green and red.\n\n"
        "Question: Which is bigger, the square or the triangle?\n"
        "Answer: The square. It is large, while the triangle is small.\n\n"
        "Question: Where is the triangle?\n"
        "Answer: In the bottom right of the image, below the red circle.",
        "Question: How many objects are in the image?\n"
        "Answer: Two.\n\n"
        "Question: What is in the top right of the picture?\n"
        "Answer: A large yellow circle.\n\n"
        "Question: Is the triangle above the circle?\n"
        "Answer: No. The triangle is below the circle, in the bottom left of the image.\n\n"
        "Question: Can you see a square?\n"
        "Answer: No, there is no square in the image.",
    ),
    "detailed": (
        "The image shows three shapes on a plain gray background. In the top left there is a large "
        "green square, the biggest object in the picture. To its right, in the top right, is a small "
        "red circle. Below the circle, in the bottom right, sits a small green triangle of the same "
        "green as the square. The bottom left of the image is empty.",
        "Two shapes stand out against a white background. A large yellow circle takes up much of the "
        "top right of the image, while a small blue triangle sits in the bottom left, below and to the "
        "left of the circle. The top left and the bottom right of the picture are empty.",
    ),
    "reasoning": (
        "Question: How many of the shapes are green, and are they the same size?\n"
        "Answer: The square in the top left is green, and so is the triangle in the bottom right; the "
        "circle is red. The square is large and the triangle is small. So two shapes are green, and "
        "they are not the same size.",
        "Question: Is the larger of the two objects in the left or the right half of the image?\n"
        "Answer: The yellow circle is large and the blue triangle is small, so the circle is the larger "
        "object. The circle is in the top right of the image, so the larger object is in the right half.",
    ),
}


def format_context(view: dict[str, Any]) -> str:
    """The symbolic view as the teacher reads it: captions, then ``- category: [x1, y1, x2, y2]``."""
    lines = ["Captions:"]
    lines += [f"- {caption}" for caption in view["captions"]]
    lines.append("Objects:")
    for annotation in view["objects"]:
        box = ", ".join(repr(round(float(c), 3)) for c in annotation["bbox"])
        lines.append(f"- {annotation['category']}: [{box}]")
    return "\n".join(lines)


def build_messages(response_type: str, view: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages that ask for ``response_type`` about the scene ``view``."""
    if response_type not in SYSTEM_PROMPTS:
        raise ValueError(f"no prompt for response type {response_type!r}; known: {', '.join(RESPONSE_TYPES)}")
    messages = [{"role": "system", "content": SYSTEM_PROMPTS[response_type]}]
    for example, reply in zip(_EXAMPLE_VIEWS, _EXAMPLE_REPLIES[response_type]):
        messages.append({"role": "user", "content": format_context(example)})
        messages.append({"role": "assistant", "content": reply})
    messages.append({"role": "user", "content": format_context(view)})
    return messages


# ---------------------------------------------------------------------------------------------
# Reading replies back

# "Question: ...", "**Question 2:** ...", "Q: ...", "- Answer: ..." (the label and what follows).
_LABEL = re.compile(r"^[\s*_#>-]*(question|answer|q|a)\s*\d*\s*[*_]*\s*[:：][*_\s]*(.*)$", re.IGNORECASE)
# What would give away that the teacher read notes rather than saw the image.
_LEAKS = re.compile(
    r"bounding box|\bcaptions?\b|\bannotat\w*|\bcoordinates?\b|\[\s*\d*\.\d+\s*,\s*\d*\.\d+", re.IGNORECASE
)


def parse_reply(response_type: str, text: str) -> list[tuple[str, str]]:
    """(question, answer) pairs from a reply of ``response_type``; a ``detailed`` reply gives one
    pair with an empty question (the caller draws the instruction). Raises UnusableOutput."""
    if not isinstance(text, str) or not text.strip():
        raise UnusableOutput(response_type, "the reply is empty")
    if IMAGE_PLACEHOLDER in text:
        raise UnusableOutput(response_type, f"the reply contains the image placeholder {IMAGE_PLACEHOLDER}")
    leak = _LEAKS.search(text)
    if leak:
        raise UnusableOutput(response_type, f"the reply mentions the notes ({leak.group(0)!r}) instead of the image")
    if response_type == "detailed":
        return [("", _parse_description(text))]
    pairs = _parse_pairs(response_type, text)
    if response_type == "reasoning" and len(pairs) != 1:
        raise UnusableOutput(response_type, f"expected one Question/Answer pair, found {len(pairs)}")
    return pairs


def _parse_description(text: str) -> str:
    lines = text.strip().splitlines()
    if any(_LABEL.match(line) for line in lines):
        raise UnusableOutput("detailed", "a description was asked for, but the reply has Question/Answer lines")
    description = re.sub(r"^\s*(?:detailed\s+)?description\s*:\s*", "", text.strip(), flags=re.IGNORECASE)
    if not description:
        raise UnusableOutput("detailed", "the reply is empty")
    return description


def _parse_pairs(response_type: str, text: str) -> list[tuple[str, str]]:
    blocks: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        match = _LABEL.match(line)
        if match:
            label = "question" if match[1].lower() in ("question", "q") else "answer"
            blocks.append((label, [match[2]]))
        elif blocks:
            blocks[-1][1].append(line)
        # Lines before the first label (a preamble such as "Sure, here you go:") are dropped.
    if not blocks:
        raise UnusableOutput(response_type, "no 'Question:' / 'Answer:' lines in the reply")
    pairs: list[tuple[str, str]] = []
    question: str | None = None
    for label, lines in blocks:
        content = "\n".join(line.rstrip() for line in lines).strip()
        number = len(pairs) + 1
        if not content:
            raise UnusableOutput(response_type, f"{label} {number} is empty")
        if label == "question":
            if question is not None:
                raise UnusableOutput(response_type, f"question {number} has no answer")
            question = content
        else:
            if question is None:
                raise UnusableOutput(response_type, f"answer {number} has no question before it")
            pairs.append((question, content))
            question = None
    if question is not None:
        raise UnusableOutput(response_type, f"question {len(pairs) + 1} has no answer (was the reply cut off?)")
    return pairs
