"""Shared machinery of conversation templates.

A template renders a conversation into *segments*, each either trained (the assistant's reply
and its end marker) or not. The segments are joined into one text, which is tokenized as LLaVA's
training tokenizes it; the labels follow the characters of the trained segments
(:mod:`mmkit.data.templates.llava_tokenization`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from mmkit.core.errors import ConfigError, DataError
from mmkit.core.interfaces import IMAGE_TOKEN
from mmkit.core.registry import TEMPLATES
from mmkit.data.templates.llava_tokenization import EncodedConversation, RenderedConversation, encode_rendered

HUMAN, ASSISTANT = "human", "gpt"
ROLE_ALIASES = {"human": HUMAN, "user": HUMAN, "gpt": ASSISTANT, "assistant": ASSISTANT}

LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


class EndOfSequence:
    """Stands for the tokenizer's eos token inside a segment list: its text depends on the tokenizer."""


EOS = EndOfSequence()


@dataclass(frozen=True)
class Segment:
    content: str | EndOfSequence
    trained: bool


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
        return encode_rendered(self.render(turns, tokenizer.eos_token), tokenizer, num_image_tokens)

    def render(self, turns: list[tuple[str, str]], eos_token: str | None) -> RenderedConversation:
        """The segments as one text, with the character spans of the trained ones."""
        pieces: list[str] = []
        trained: list[tuple[int, int]] = []
        length = 0
        for segment in self.segments(turns):
            text = segment.content
            if isinstance(text, EndOfSequence):
                if eos_token is None:
                    raise DataError("this format ends every reply with the eos token, but the tokenizer has none")
                text = eos_token
            if segment.trained and text:
                if trained and trained[-1][1] == length:
                    trained[-1] = (trained[-1][0], length + len(text))  # a reply and its end marker: one span
                else:
                    trained.append((length, length + len(text)))
            pieces.append(text)
            length += len(text)
        return RenderedConversation("".join(pieces), tuple(trained))

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

    def jinja(self, image_text: str = IMAGE_TOKEN) -> str:
        """The same format as a transformers chat template (``apply_chat_template``), for exported
        models: a ``system`` message replaces the default system prompt, image parts become
        ``image_text`` lines ahead of the text, and ``add_generation_prompt`` needs nothing added
        because every human turn already ends with the assistant's header. ``image_text`` is
        ``<image>`` plus what a processor's one-pass tokenization needs after it to give the ids
        of LLaVA's tokenization, which tokenizes the text after an image on its own
        (:func:`mmkit.data.templates.llava_tokenization.image_text_for`)."""
        human_prefix, human_suffix = self.human_format.split("{text}")
        reply_prefix, reply_suffix = self.reply_format.split("{text}")
        eos = "{{ eos_token }}" if self.reply_ends_with_eos else ""
        return (
            "{%- set ns = namespace(system=" + _jinja_string(self.system) + ", text='', first=true) -%}"
            "{%- for message in messages -%}"
            "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
            "{%- else -%}{%- set ns.text = '' -%}"
            "{%- for part in message['content'] if part['type'] == 'image' -%}"
            "{%- set ns.text = ns.text + " + _jinja_string(image_text + "\n") + " -%}{%- endfor -%}"
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
