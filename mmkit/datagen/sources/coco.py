"""COCO's annotation files as a source: ``captions_*.json`` (five captions an image) and
``instances_*.json`` (labelled boxes), the two files LLaVA's teacher was shown.

    python -m mmkit.datagen --source coco \\
        --source-option captions=coco/annotations/captions_train2017.json \\
        --source-option instances=coco/annotations/instances_train2017.json ...

COCO's boxes are ``[x, y, width, height]`` in pixels; they become ``[x1, y1, x2, y2]`` fractions
of the image's own width and height, with 3 decimals, as in LLaVA's prompts. An image's id is
its file name's stem (``000000033471``), as in LLaVA's JSON; the images come in the order of
their COCO ids. The image folder defaults to COCO's layout: ``annotations/captions_train2017.json``
beside ``train2017/``.
"""
from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from mmkit.core.errors import ConfigError, DataError
from mmkit.core.registry import SOURCES
from mmkit.datagen.source import AnnotatedImage, AnnotationSource, View, normalised_box

_SPLIT_IN_NAME = re.compile(r"^captions_(\w+)\.json$")


def _read_json(path: Path, option: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"source.{option}={str(path)!r}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a COCO annotation file (an object with 'images' and 'annotations')")
    return data


def _entries(data: dict[str, Any], key: str, path: Path, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    entries = data.get(key)
    if not isinstance(entries, list):
        raise DataError(f"{path}: no '{key}' list; is this a COCO {path.name.split('_')[0]} file?")
    for number, entry in enumerate(entries):
        missing = [field for field in fields if not isinstance(entry, dict) or field not in entry]
        if missing:
            raise DataError(f"{path}: {key}[{number}] has no {', '.join(repr(m) for m in missing)}")
    return entries


@SOURCES.register("coco")
class CocoSource(AnnotationSource):
    def __init__(self, captions: str, instances: str | None = None, images: str | None = None) -> None:
        self.captions_path = Path(captions)
        self.instances_path = Path(instances) if instances else None
        self._image_root = Path(images) if images else self._default_image_root()
        captions_data = _read_json(self.captions_path, "captions")
        listed = _entries(captions_data, "images", self.captions_path, ("id", "file_name", "width", "height"))
        self._by_id = {int(entry["id"]): entry for entry in listed}
        self._captions: dict[int, list[str]] = defaultdict(list)
        for note in _entries(captions_data, "annotations", self.captions_path, ("image_id", "caption")):
            self._captions[int(note["image_id"])].append(str(note["caption"]).strip())
        self._boxes: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self._categories: dict[int, str] = {}
        if self.instances_path is not None:
            self._read_instances(_read_json(self.instances_path, "instances"))

    def _default_image_root(self) -> Path:
        match = _SPLIT_IN_NAME.match(self.captions_path.name)
        return self.captions_path.parent.parent / match[1] if match else self.captions_path.parent

    def _read_instances(self, data: dict[str, Any]) -> None:
        path = self.instances_path
        self._categories = {
            int(entry["id"]): str(entry["name"]) for entry in _entries(data, "categories", path, ("id", "name"))
        }
        for entry in _entries(data, "images", path, ("id", "width", "height")):
            self._by_id.setdefault(int(entry["id"]), entry)
        for number, box in enumerate(_entries(data, "annotations", path, ("image_id", "category_id", "bbox"))):
            image_id = int(box["image_id"])
            if box["category_id"] not in self._categories or image_id not in self._by_id:
                raise DataError(f"{path}: annotations[{number}] names an unknown category or image")
            image = self._by_id[image_id]
            x, y, width, height = (float(c) for c in box["bbox"])
            self._boxes[image_id].append({
                "category": self._categories[box["category_id"]],
                "bbox": normalised_box([x, y, x + width, y + height], float(image["width"]), float(image["height"]),
                                       f"{path}: annotations[{number}]"),
            })

    @property
    def image_root(self) -> Path:
        return self._image_root

    def images(self) -> list[AnnotatedImage]:
        return [
            AnnotatedImage(id=Path(entry["file_name"]).stem, image=str(entry["file_name"]), annotation=image_id)
            for image_id, entry in sorted(self._by_id.items()) if image_id in self._captions
        ]

    def view(self, image: AnnotatedImage, rng: random.Random) -> View:
        return {"captions": list(self._captions[image.annotation]), "objects": list(self._boxes[image.annotation])}

    def vocabulary(self) -> list[str]:
        return sorted(set(self._categories.values()))

    def describe(self) -> str:
        files = [self.captions_path.name] + ([self.instances_path.name] if self.instances_path else [])
        return f"coco ({', '.join(files)})"
