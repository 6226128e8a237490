"""LLaVA's stage-1 format: the image, then the caption; the instruction is dropped."""
from __future__ import annotations

from mmkit.core.interfaces import IMAGE_TOKEN
from mmkit.core.registry import TEMPLATES
from mmkit.data.templates.template import ConversationTemplate, Segment, _jinja_string


@TEMPLATES.register("plain")
class PlainTemplate(ConversationTemplate):

    def __init__(self, separator: str = "\n") -> None:
        self.separator = separator
        self.stop_text = separator

    def segments(self, turns: list[tuple[str, str]]) -> list[Segment]:
        image = IMAGE_TOKEN if IMAGE_TOKEN in turns[0][1] else ""
        segments = [Segment(image, trained=False)]
        if len(turns) > 1:
            segments.append(Segment(turns[1][1] + self.separator, trained=True))
        return segments

    def jinja(self, image_text: str = IMAGE_TOKEN) -> str:
        """This format as a transformers chat template: the user's image (its words are dropped,
        as in training), then each assistant message and the separator."""
        return (
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}"
            "{%- if message['content'] is not string -%}"
            "{%- for part in message['content'] if part['type'] == 'image' -%}{{ " + _jinja_string(image_text) + " }}"
            "{%- endfor -%}{%- endif -%}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
            "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
            "{%- endif -%}{{ " + _jinja_string(self.separator) + " }}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )
