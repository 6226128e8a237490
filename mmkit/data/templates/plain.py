"""LLaVA's stage-1 format: the image, then the caption; the instruction is dropped."""
from __future__ import annotations

from mmkit.core.interfaces import IMAGE_TOKEN
from mmkit.core.registry import TEMPLATES
from mmkit.data.templates.template import ConversationTemplate, Segment


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
