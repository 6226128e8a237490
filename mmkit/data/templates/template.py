"""Shared machinery of conversation templates: masks correct by construction.

A template renders a conversation into *segments*, each either trained (the assistant's reply
and its end marker) or not. Every segment is tokenized on its own and the ids are concatenated,
so the labels never depend on re-finding text inside a rendered string (the original LLaVA
code does that and silently zeroes a sample's labels when a tokenizer disagrees).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from mmkit.core.errors import ConfigError, DataError
from mmkit.core.interfaces import IMAGE_TOKEN
from mmkit.core.registry import TEMPLATES

IGNORE_INDEX = -100
HUMAN, ASSISTANT = "human", "gpt"
ROLE_ALIASES = {"human": HUMAN, "user": HUMAN, "gpt": ASSISTANT, "assistant": ASSISTANT}

LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


class EndOfSequence:
    """Stands for the tokenizer's eos id inside a segment list (never tokenized as text)."""


EOS = EndOfSequence()


@dataclass(frozen=True)
class Segment:
    content: str | EndOfSequence
    trained: bool


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]


def normalise_turns(conversation: Sequence[dict]) -> list[tuple[str, str]]:
    """LLaVA turns ``{"from", "value"}`` -> ``[(role, text)]``, checked to alternate from the human."""
    turns: list[tuple[str, str]] = []
    for index, turn in enumerate(conversation):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"turn {index} is not a {{'from', 'value'}} record")
        role = ROLE_ALIASES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise DataError(f"turn {index} has an unknown speaker {turn.get('from')!r}")
        expected = HUMAN if index % 2 == 0 else ASSISTANT
        if role != expected:
            raise DataError(f"turn {index} is from {role!r} but conversations alternate human, gpt, ...")
        turns.append((role, turn["value"]))
    if not turns:
        raise DataError("the conversation is empty")
    return turns


class ConversationTemplate:
    """Renders conversations into segments; subclasses define the format."""

    #: text after which generation stops, when the end marker is not the eos token
    stop_text: str | None = None

    def segments(self, turns: list[tuple[str, str]]) -> list[Segment]:
        raise NotImplementedError

    def encode(
        self,
        conversation: Sequence[dict],
        tokenizer: PreTrainedTokenizerBase,
        num_image_tokens: int,
        for_generation: bool = False,
    ) -> EncodedConversation:
        """Token ids and labels; with ``for_generation`` the conversation ends on a human turn
        and the ids end with the assistant's header, ready for ``generate``."""
        turns = normalise_turns(conversation)
        ends_with_human = turns[-1][0] == HUMAN
        if for_generation != ends_with_human:
            raise DataError(
                "a prompt for generation must end with a human turn"
                if for_generation
                else "the conversation has no assistant reply to train on after its last human turn"
            )
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        input_ids: list[int] = []
        labels: list[int] = []
        if tokenizer.bos_token_id is not None:
            input_ids.append(tokenizer.bos_token_id)
            labels.append(IGNORE_INDEX)
        for segment in self.segments(turns):
            ids = self._segment_ids(segment.content, tokenizer, image_token_id, num_image_tokens)
            input_ids += ids
            if segment.trained:
                labels += [IGNORE_INDEX if i == image_token_id else i for i in ids]
            else:
                labels += [IGNORE_INDEX] * len(ids)
        return EncodedConversation(input_ids, labels)

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase, key: str) -> None:
        """One line naming ``key`` if this format's own text (system prompt, role names,
        separators, stop text) turns into the tokenizer's unknown token, or its replies end with an
        eos token the tokenizer does not have: it would train on markers the model cannot see."""
        probe = normalise_turns([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes"}])
        contents = [segment.content for segment in self.segments(probe)]
        if any(isinstance(content, EndOfSequence) for content in contents) and tokenizer.eos_token_id is None:
            raise ConfigError(f"{key}: this format ends every reply with the eos token, but the tokenizer has none")
        texts = [content for content in contents if isinstance(content, str)] + ([self.stop_text] if self.stop_text else [])
        for text in texts:
            ids = tokenizer.encode(text, add_special_tokens=False)
            if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
                unknown = [piece for piece in text.split() if tokenizer.unk_token_id in tokenizer.encode(piece, add_special_tokens=False)]
                raise ConfigError(
                    f"{key}: the tokenizer cannot represent {unknown[:3] or [text]!r} of this format's text "
                    f"(it becomes {tokenizer.unk_token!r}); choose another template or tokenizer"
                )

    @staticmethod
    def _segment_ids(
        content: str | EndOfSequence,
        tokenizer: PreTrainedTokenizerBase,
        image_token_id: int,
        num_image_tokens: int,
    ) -> list[int]:
        if isinstance(content, EndOfSequence):
            return [tokenizer.eos_token_id]
        ids: list[int] = []
        # <image> is expanded to the encoder+connector's token count here, so every sequence
        # length is known before the model runs.
        for index, piece in enumerate(content.split(IMAGE_TOKEN)):
            if index:
                ids += [image_token_id] * num_image_tokens
            if piece:
                ids += tokenizer.encode(piece, add_special_tokens=False)
        return ids


class ChatTemplate(ConversationTemplate):
    """A system prompt, then human turns as untrained prompts and assistant turns as trained replies.

    Subclasses set the formats; ``{text}`` is the turn's text. The human format ends with the
    assistant's header, so a conversation ending on a human turn is a generation prompt.
    """

    system_suffix: str
    human_format: str
    reply_format: str
    reply_ends_with_eos: bool

    def __init__(self, system: str = LLAVA_SYSTEM) -> None:
        self.system = system

    def segments(self, turns: list[tuple[str, str]]) -> list[Segment]:
        segments: list[Segment] = []
        for index, (role, text) in enumerate(turns):
            if role == HUMAN:
                prefix = self.system + self.system_suffix if index == 0 else ""
                segments.append(Segment(prefix + self.human_format.format(text=text), trained=False))
            else:
                segments.append(Segment(self.reply_format.format(text=text), trained=True))
                if self.reply_ends_with_eos:
                    segments.append(Segment(EOS, trained=True))
        return segments

    def jinja(self) -> str:
        """The same format as a transformers chat template (``apply_chat_template``), for exported
        models: a ``system`` message replaces the default system prompt, image parts become
        ``<image>`` lines ahead of the text, and ``add_generation_prompt`` needs nothing added
        because every human turn already ends with the assistant's header."""
        human_prefix, human_suffix = self.human_format.split("{text}")
        reply_prefix, reply_suffix = self.reply_format.split("{text}")
        eos = "{{ eos_token }}" if self.reply_ends_with_eos else ""
        return (
            "{%- set ns = namespace(system=" + _jinja_string(self.system) + ", text='', first=true) -%}"
            "{%- for message in messages -%}"
            "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
            "{%- else -%}{%- set ns.text = '' -%}"
            "{%- for part in message['content'] if part['type'] == 'image' -%}"
            "{%- set ns.text = ns.text + '" + IMAGE_TOKEN + "\n' -%}{%- endfor -%}"
            "{%- for part in message['content'] if part['type'] == 'text' -%}"
            "{%- set ns.text = ns.text + part['text'] -%}{%- endfor -%}"
            "{%- endif -%}"
            "{%- if message['role'] == 'system' -%}{%- set ns.system = ns.text -%}"
            "{%- elif message['role'] == 'user' -%}"
            "{%- if ns.first -%}{{ ns.system + " + _jinja_string(self.system_suffix) + " }}{%- set ns.first = false -%}{%- endif -%}"
            "{{ " + _jinja_string(human_prefix) + " + ns.text + " + _jinja_string(human_suffix) + " }}"
            "{%- else -%}{{ " + _jinja_string(reply_prefix) + " + ns.text + " + _jinja_string(reply_suffix) + " }}" + eos +
            "{%- endif -%}"
            "{%- endfor -%}"
        )


def _jinja_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


TEMPLATES.set_base(ConversationTemplate)
