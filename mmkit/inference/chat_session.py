"""One multi-turn conversation with a model about one image: what ``python -m mmkit.chat`` runs
in the terminal, usable from any program."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from mmkit.core.interfaces import IMAGE_TOKEN
from mmkit.data.images import DEFAULT_LIMITS, ImageLimits, read_image_file
from mmkit.inference.generation import AnswerGenerator, Prompt, Sampling


class ChatSession:
    """One conversation with a model: its turns so far and its image's embeddings."""

    def __init__(self, generator: AnswerGenerator, sampling: Sampling) -> None:
        self.generator = generator
        self.sampling = sampling
        self.turns: list[dict] = []
        self.image: Image.Image | None = None
        self.image_embeds = None

    def set_image(self, image: Image.Image | None) -> None:
        """Start a new conversation about ``image`` (None: text only), encoding it once."""
        self.image = image
        self.image_embeds = None if image is None else self.generator.encode_image(image)
        self.turns = []

    def reset(self) -> None:
        self.turns = []

    def reply(self, text: str) -> Iterator[str]:
        """Stream the model's reply to ``text``; the exchange joins the conversation when done."""
        value = f"{IMAGE_TOKEN}\n{text}" if self.image is not None and not self.turns else text
        conversation = [*self.turns, {"from": "human", "value": value}]
        pieces: list[str] = []
        for piece in self.generator.stream(Prompt(conversation, self.image), self.sampling, self.image_embeds):
            pieces.append(piece)
            yield piece
        self.turns = [*conversation, {"from": "gpt", "value": "".join(pieces)}]


def open_image(path: str, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """The image file ``path``; one over ``limits`` is refused from its header. A DataError names it as ``image=PATH``."""
    return read_image_file(Path(path), limits, name=f"image={path}")
