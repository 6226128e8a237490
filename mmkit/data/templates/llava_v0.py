"""The original LLaVA format with ``###`` separators: ``SYSTEM###Human: ...###Assistant: ...###``."""
from __future__ import annotations

from mmkit.data.templates.base import HUMAN, LLAVA_SYSTEM, ConversationTemplate, Segment
from mmkit.registry import TEMPLATES


@TEMPLATES.register("llava_v0")
class LlavaV0Template(ConversationTemplate):
    stop_text = "###"

    def __init__(self, system: str = LLAVA_SYSTEM) -> None:
        self.system = system

    def segments(self, turns: list[tuple[str, str]]) -> list[Segment]:
        segments: list[Segment] = []
        for index, (role, text) in enumerate(turns):
            if role == HUMAN:
                prefix = f"{self.system}###" if index == 0 else ""
                segments.append(Segment(f"{prefix}Human: {text}###Assistant:", trained=False))
            else:
                segments.append(Segment(f" {text}###", trained=True))
        return segments
