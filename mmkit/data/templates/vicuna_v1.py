"""LLaVA v1 / v1.5: ``SYSTEM USER: ... ASSISTANT: ...</s>USER: ...`` (Vicuna v1 style)."""
from __future__ import annotations

from mmkit.data.templates.base import EOS, HUMAN, LLAVA_SYSTEM, ConversationTemplate, Segment
from mmkit.registry import TEMPLATES


@TEMPLATES.register("vicuna_v1")
class VicunaV1Template(ConversationTemplate):
    def __init__(self, system: str = LLAVA_SYSTEM) -> None:
        self.system = system

    def segments(self, turns: list[tuple[str, str]]) -> list[Segment]:
        segments: list[Segment] = []
        for index, (role, text) in enumerate(turns):
            if role == HUMAN:
                prefix = f"{self.system} " if index == 0 else ""
                segments.append(Segment(f"{prefix}USER: {text} ASSISTANT:", trained=False))
            else:
                segments += [Segment(f" {text}", trained=True), Segment(EOS, trained=True)]
        return segments
