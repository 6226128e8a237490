"""Any dataset's captions and boxes as a source: one JSON object a line, one line an image.

    {"image": "kitchen/0001.jpg", "captions": ["A cat on a stove."],
     "boxes": [{"label": "cat", "bbox": [12, 40, 200, 310]}, {"label": "oven", "bbox": [0, 150, 640, 480]}]}

- ``image``: the path relative to the image folder (``--source-option images=``, default: the
  file's own folder); ``id``: optional, the image's stem otherwise; ids must be unique.
- ``captions``: a list of strings (or ``caption``: one string); ``boxes``: optional.
- ``bbox``: ``[x1, y1, x2, y2]``, in pixels or as fractions of the image's size (``boxes=auto``,
  the default, takes a box whose coordinates all lie in [0, 1] as fractions). A pixel box becomes
  fractions of the image's ``width`` and ``height``, from the line or, when absent, from the
  image file's header.

The quality report's check for objects a conversation mentions but its image lacks knows the
labels that appear anywhere in the file.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from mmkit.core.errors import ConfigError, DataError
from mmkit.core.registry import SOURCES
from mmkit.data.images import header_size
from mmkit.datagen.source import AnnotatedImage, AnnotationSource, View, normalised_box

BOX_UNITS = ("auto", "pixels", "fractions")


@SOURCES.register("jsonl")
class JsonlSource(AnnotationSource):
    def __init__(self, path: str, images: str | None = None, boxes: str = "auto") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"source.path={path!r}: no such file")
        if boxes not in BOX_UNITS:
            raise ConfigError(f"source.boxes={boxes!r}: choose one of {', '.join(BOX_UNITS)}")
        self.boxes = boxes
        self._image_root = Path(images) if images else self.path.parent
        self._lines = self._read()

    def _read(self) -> list[tuple[str, dict[str, Any]]]:
        lines, seen = [], {}
        with open(self.path, encoding="utf-8") as handle:
            for number, text in enumerate(handle, 1):
                if not text.strip():
                    continue
                where = f"{self.path}:{number}"
                try:
                    record = json.loads(text)
                except ValueError as exc:
                    raise DataError(f"{where}: not valid JSON ({exc})") from None
                if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                    raise DataError(f"{where}: expected an object with an 'image' path")
                image_id = str(record.get("id", Path(record["image"]).stem))
                if image_id in seen:
                    raise DataError(f"{where}: id {image_id!r} is also line {seen[image_id]}'s; ids must be unique")
                seen[image_id] = number
                lines.append((where, {**record, "id": image_id}))
        return lines

    @property
    def image_root(self) -> Path:
        return self._image_root

    def images(self) -> list[AnnotatedImage]:
        return [AnnotatedImage(id=record["id"], image=record["image"], annotation=(where, record))
                for where, record in self._lines]

    def view(self, image: AnnotatedImage, rng: random.Random) -> View:
        where, record = image.annotation
        captions = record.get("captions", [record["caption"]] if "caption" in record else None)
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise DataError(f"{where}: 'captions' must be a non-empty list of strings (or 'caption' one string)")
        boxes = record.get("boxes", [])
        if not isinstance(boxes, list):
            raise DataError(f"{where}: 'boxes' must be a list of {{'label', 'bbox'}}")
        objects = []
        for number, box in enumerate(boxes):
            key = f"{where}: boxes[{number}]"
            if not isinstance(box, dict) or not isinstance(box.get("label"), str) or not _four_numbers(box.get("bbox")):
                raise DataError(f"{key}: expected {{'label': str, 'bbox': [x1, y1, x2, y2]}}")
            objects.append({"category": box["label"], "bbox": self._fractions(box["bbox"], record, image, key)})
        return {"captions": [c.strip() for c in captions], "objects": objects}

    def _fractions(self, bbox: list[float], record: dict[str, Any], image: AnnotatedImage, key: str) -> list[float]:
        in_unit_square = all(0.0 <= float(c) <= 1.0 for c in bbox)
        if self.boxes == "fractions" or (self.boxes == "auto" and in_unit_square):
            return normalised_box(bbox, 1.0, 1.0, key)
        width, height = record.get("width"), record.get("height")
        if width is None or height is None:
            width, height = self._size_from_file(image, key)
        return normalised_box(bbox, float(width), float(height), key)

    def _size_from_file(self, image: AnnotatedImage, key: str) -> tuple[int, int]:
        path = self.image_root / image.image
        try:
            size = header_size(path.read_bytes())
        except OSError:
            size = None
        if size is None:
            raise DataError(f"{key}: a box in pixels needs the image's size: give 'width' and 'height' on the line, "
                            f"or the image itself at {path}")
        return size

    def vocabulary(self) -> list[str]:
        return sorted({box["label"] for _, record in self._lines for box in record.get("boxes", [])
                       if isinstance(box, dict) and isinstance(box.get("label"), str)})

    def describe(self) -> str:
        return f"jsonl ({self.path.name})"


def _four_numbers(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 4
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in value))
