"""LLaVA v1 / v1.5: ``SYSTEM USER: ... ASSISTANT: ...</s>USER: ...`` (Vicuna v1 style)."""
from __future__ import annotations

from mmkit.core.registry import TEMPLATES
from mmkit.data.templates.template import ChatTemplate


@TEMPLATES.register("vicuna_v1")
class VicunaV1Template(ChatTemplate):
    system_suffix = " "
    human_format = "USER: {text} ASSISTANT:"
    reply_format = " {text}"
    reply_ends_with_eos = True  # the end marker is the eos token itself, never the text "</s>"
