"""The teacher interface, and the LLaVA turn format every teacher writes.

A teacher sees an image only through its symbolic view (``{"captions": [...], "objects":
[{"category": ..., "bbox": [x1, y1, x2, y2]}, ...]}``), never the pixels, as GPT-4 saw COCO
images when it wrote LLaVA's instruction data.

``Teacher.write`` returns :class:`Written` items, each a conversation tagged with its response
type (LLaVA's ``conversation``, ``detailed``, ``reasoning``; ``caption`` for stage-1 data), so a
caller can count what it got by type. ``Teacher.write_many`` is the batch path: sequential by
default, concurrent where a teacher waits on a server; it reports a response the teacher could
not use as :class:`Failed` instead of stopping the batch.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Iterable, Iterator, NamedTuple, Sequence

from mmkit.core.errors import ConfigError, DataError
from mmkit.core.registry import TEACHERS

IMAGE_PLACEHOLDER = "<image>"

Turn = dict[str, str]
Conversation = list[Turn]

# LLaVA's three response types, in the order teachers write them.
RESPONSE_TYPES: tuple[str, ...] = ("conversation", "detailed", "reasoning")


class Written(NamedTuple):
    """One conversation a teacher wrote, with its response type."""

    type: str
    conversation: Conversation


class Failed(NamedTuple):
    """A response of ``type`` the teacher could not turn into a conversation, and why."""

    type: str
    reason: str


class UnusableOutput(DataError):
    """The teacher's output for one response type cannot be used (e.g. it does not parse).

    Batch writers count these per type and go on; any other error (a server that refuses the
    request, a network that stays down) stops the run.
    """

    def __init__(self, response_type: str, reason: str) -> None:
        super().__init__(f"{response_type}: {reason}")
        self.response_type = response_type
        self.reason = reason


class Teacher(ABC):
    """Writes instruction-following conversations about one image from its symbolic view."""

    # Constructor options that change how a teacher works but not what it writes (threads,
    # retries, cache folder...); a resumed run may change them, unlike the others.
    operational_options: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def write(self, scene_view: dict[str, Any], rng: random.Random) -> list[Written]:
        """Typed conversations of alternating ``human``/``gpt`` turns; the first human turn of
        each holds ``<image>`` once (see :func:`conversation`). Raises :class:`UnusableOutput`
        when the teacher's output for one of them cannot be used."""

    def stats(self) -> dict[str, int]:
        """Counters worth reporting after a run (e.g. requests sent, cache hits); none by default."""
        return {}

    def requests(self, view: dict[str, Any], rng: random.Random) -> list[tuple[str, list[dict[str, str]]]]:
        """The (response type, chat messages) requests :meth:`write` would send about ``view``, for
        a dry run's count and cost; none for a teacher that asks no model."""
        return []

    @property
    def max_reply_tokens(self) -> int | None:
        """The most tokens a reply may have (the model's ``max_tokens``); None without a model."""
        return None

    def example_replies(self, response_type: str) -> list[str]:
        """The few-shot example replies of ``response_type``, from which a dry run expects the
        length of a reply; none for a teacher without examples."""
        return []

    def write_many(
        self, views: Iterable[tuple[dict[str, Any], random.Random]]
    ) -> Iterator[list[Written | Failed]]:
        """For each ``(view, rng)`` in order, what :meth:`write` gives, with an unusable response
        reported as :class:`Failed` in place of the scene's conversations. Lazy: a caller that
        saves each scene's result as it comes loses nothing already yielded if stopped."""
        for view, rng in views:
            try:
                yield list(self.write(view, rng))
            except UnusableOutput as exc:
                yield [Failed(exc.response_type, exc.reason)]


TEACHERS.set_base(Teacher)


def build_teacher(name: str, options: dict[str, Any] | None = None) -> Teacher:
    """The teacher registered as ``name``, built with ``options``; an unknown name or option is a
    ConfigError naming it (``teacher='gpt5'``, ``teacher: 'rules' takes no option(s) ...``)."""
    TEACHERS.get(name, key="teacher")
    return TEACHERS.build({"name": name, **(options or {})}, key="teacher")


def response_types(types: str | Sequence[str], key: str = "types") -> tuple[str, ...]:
    """Validated response types from a list or a comma-separated string (``"detailed,reasoning"``)."""
    listed = [t.strip() for t in types.split(",")] if isinstance(types, str) else [str(t) for t in types]
    unknown = [t for t in listed if t not in RESPONSE_TYPES]
    if unknown or not listed or len(set(listed)) != len(listed):
        raise ConfigError(f"{key}={list(listed)!r}: choose one or more of {', '.join(RESPONSE_TYPES)}, each once")
    return tuple(listed)


def with_image(text: str, rng: random.Random) -> str:
    """``text`` with the image placeholder before or after it, drawn at random as LLaVA does."""
    if rng.random() < 0.5:
        return f"{IMAGE_PLACEHOLDER}\n{text}"
    return f"{text}\n{IMAGE_PLACEHOLDER}"


def text_rng(seed: int, image_id: str) -> random.Random:
    """The generator for everything written about one image (its view, then its conversations),
    so the data depend on neither the order replies arrive in nor where a run resumed."""
    return random.Random(f"mmkit-text:{seed}:{image_id}")


def outcome_records(image_id: str, image: str, outcomes: Sequence[Written | Failed]) -> list[dict[str, Any]]:
    """One dict per outcome about an image: ``{"id", "image", "type", "conversations"}`` for a
    conversation, ``{"id", "image", "type", "error"}`` for a failure. Ids are ``<image_id>-<index>``,
    the index counting the image's outcomes, so an id does not change when another outcome fails."""
    records = []
    for index, outcome in enumerate(outcomes):
        record: dict[str, Any] = {"id": f"{image_id}-{index}", "image": image, "type": outcome.type}
        if isinstance(outcome, Failed):
            record["error"] = outcome.reason
        else:
            record["conversations"] = outcome.conversation
        records.append(record)
    return records


def conversation(pairs: Sequence[tuple[str, str]], rng: random.Random) -> Conversation:
    """LLaVA turns from (instruction, reply) pairs, the image placed in the first instruction."""
    turns: Conversation = []
    for index, (instruction, reply) in enumerate(pairs):
        turns.append({"from": "human", "value": with_image(instruction, rng) if index == 0 else instruction})
        turns.append({"from": "gpt", "value": reply})
    return turns
