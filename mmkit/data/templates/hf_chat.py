"""A model's own transformers chat template (Jinja), as a conversation format.

An imported model keeps the prompt format it was trained with: ``python -m mmkit.export from-hf``
points ``template.path`` at the chat template it copied from the source folder. mmkit then
renders prompts with that template, and tokenizes them as LLaVA's training does. The trained spans
come from rendering the conversation one message at a time: each assistant message adds its
header, its reply and its end marker, and the reply with everything after it trains.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers.utils.chat_template_utils import render_jinja_template

from mmkit.core.errors import ConfigError, DataError
from mmkit.core.interfaces import IMAGE_TOKEN
from mmkit.core.registry import TEMPLATES
from mmkit.data.templates.llava_tokenization import RenderedConversation
from mmkit.data.templates.template import HUMAN, ConversationTemplate

# Where a saved processor or tokenizer keeps its chat template, in the order transformers reads them.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


def read_chat_template(folder: Path) -> str | None:
    """The chat template saved in ``folder``, or None when it holds none."""
    for name in TEMPLATE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".jinja"):
            return path.read_text(encoding="utf-8")
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    return None


@TEMPLATES.register("hf_chat")
class HFChatTemplate(ConversationTemplate):
    def __init__(self, path: str) -> None:
        template = read_chat_template(Path(path))
        if template is None:
            raise ConfigError(f"template.path={path}: no chat template there ({', '.join(TEMPLATE_FILES)})")
        self.chat_template = template

    def render(self, turns: list[tuple[str, str]], eos_token: str | None) -> RenderedConversation:
        messages = [_message(role, text) for role, text in turns]
        ends_with_human = turns[-1][0] == HUMAN
        text = ""
        trained: list[tuple[int, int]] = []
        for count, (role, reply) in enumerate(turns, start=1):
            longer = self._render(messages[:count], eos_token, generation_prompt=False)
            if not longer.startswith(text):
                raise DataError("the chat template renders a conversation's start differently once it goes on, "
                                "so its replies cannot be found in the text")
            if role != HUMAN:
                start = longer.find(reply, len(text)) if reply else len(longer)
                if start < 0:
                    raise DataError("the chat template does not write the reply as given, so it cannot be labelled")
                trained.append((start, len(longer)))
            text = longer
        if ends_with_human:
            text = self._render(messages, eos_token, generation_prompt=True)
        return RenderedConversation(text, tuple(trained))

    def jinja(self, image_text: str = IMAGE_TOKEN) -> str:
        return self.chat_template

    def check_tokenizer(self, tokenizer, key: str) -> None:
        """The model's own format: its tokenizer was made for it."""

    def _render(self, messages: list[dict], eos_token: str | None, generation_prompt: bool) -> str:
        rendered, _ = render_jinja_template([messages], chat_template=self.chat_template,
                                            add_generation_prompt=generation_prompt, eos_token=eos_token or "", bos_token="")
        return rendered[0]


def _message(role: str, text: str) -> dict:
    """One mmkit turn as a chat message: ``<image>`` (and the newline templates write after it) as
    an image part, in place."""
    parts: list[dict] = []
    for index, piece in enumerate(text.split(IMAGE_TOKEN)):
        if index:
            parts.append({"type": "image"})
            piece = piece.removeprefix("\n")
        if piece:
            parts.append({"type": "text", "text": piece})
    return {"role": "user" if role == HUMAN else "assistant", "content": parts}
