"""Annotation sources: the images a teacher writes about, each with the symbolic view it is
shown (captions, and object boxes with their labels), as GPT-4 was shown COCO's annotations when
it wrote LLaVA's instruction data.

A source lists its images (:class:`AnnotatedImage`: an id and the image's path relative to the
source's ``image_root``) and gives each image's view, ``{"captions": [...], "objects":
[{"category": label, "bbox": [x1, y1, x2, y2]}]}``, with boxes as fractions of the image's width
and height, rounded to 3 decimals as LLaVA's prompts write them. The view takes the image's
random generator: the synthetic world draws its captions from it, and the teacher then draws
from the same generator, so a source that draws nothing leaves the teacher's draws unchanged.

Sources register in :data:`~mmkit.core.registry.SOURCES` (``coco``, ``jsonl``, ``synthetic``,
and any plugin's), and ``python -m mmkit.datagen --source NAME --source-option KEY=VALUE``
builds one.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mmkit.core.errors import DataError
from mmkit.core.registry import SOURCES

View = dict[str, Any]


@dataclass(frozen=True)
class AnnotatedImage:
    """One image of a source: ``id`` names its records (``<id>-<index>``), ``image`` is its path
    relative to the source's image root (the ``image`` field of LLaVA's JSON); ``annotation`` is
    what the source needs to give its view."""

    id: str
    image: str
    annotation: Any = None


class AnnotationSource(ABC):
    """Images with captions and labelled boxes, read from annotation files or made up."""

    # What the progress bar and the summary call one image ("scene" for the synthetic world).
    unit: ClassVar[str] = "image"
    # Constructor options that do not change what is written (a resumed run may change them).
    operational_options: ClassVar[frozenset[str]] = frozenset()

    @property
    @abstractmethod
    def image_root(self) -> Path:
        """The folder the images' ``image`` paths are relative to."""

    @property
    def output_name(self) -> str:
        """The LLaVA JSON's file name in the output folder."""
        return "llava_instruct.json"

    @abstractmethod
    def images(self) -> list[AnnotatedImage]:
        """Every image, in a fixed order: the first N of them are what ``--count N`` takes."""

    @abstractmethod
    def view(self, image: AnnotatedImage, rng: random.Random) -> View:
        """The captions and labelled boxes the teacher is shown for ``image``."""

    @abstractmethod
    def vocabulary(self) -> list[str]:
        """Every object label the source can give, for the quality report's check of objects
        that a conversation mentions but its image lacks."""

    def describe(self) -> str:
        """A few words for the summary (e.g. ``coco (captions_val2017.json)``)."""
        return self.__class__.__name__

    def prepare(self, images: list[AnnotatedImage], out: Path, progress: bool) -> None:
        """Make sure the images' files exist under :attr:`image_root` before anything is written
        about them; by default they must be there already."""
        missing = [image.image for image in images if not (self.image_root / image.image).is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} image(s) are not in the image folder {self.image_root}, e.g. {missing[0]!r}; "
                "set --source-option images=<folder the annotations' file names are relative to>"
            )


SOURCES.set_base(AnnotationSource)


def normalised_box(box: list[float], width: float, height: float, key: str) -> list[float]:
    """``[x1, y1, x2, y2]`` in pixels as fractions of the image's width and height, with 3
    decimals, clipped to the image (COCO's boxes can overhang by a fraction of a pixel)."""
    if width <= 0 or height <= 0:
        raise DataError(f"{key}: the image has no size ({width} x {height})")
    x1, y1, x2, y2 = (float(c) for c in box)
    if not x2 > x1 or not y2 > y1:
        raise DataError(f"{key}: the box {box} is empty or reversed (expected x1 < x2 and y1 < y2)")
    fractions = (x1 / width, y1 / height, x2 / width, y2 / height)
    return [round(min(max(c, 0.0), 1.0), 3) for c in fractions]
