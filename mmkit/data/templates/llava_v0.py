"""The original LLaVA format with ``###`` separators: ``SYSTEM###Human: ...###Assistant: ...###``."""
from __future__ import annotations

from mmkit.core.registry import TEMPLATES
from mmkit.data.templates.template import ChatTemplate


@TEMPLATES.register("llava_v0")
class LlavaV0Template(ChatTemplate):
    system_suffix = "###"
    human_format = "Human: {text}###Assistant:"
    reply_format = " {text}###"
    reply_ends_with_eos = False
    stop_text = "###"
