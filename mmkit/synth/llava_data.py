"""The synthetic world written out as LLaVA data: an image folder plus ``<split>.json``.

Built-in teachers are registered by importing them here; a plugin's teacher must be loaded by
the caller first (``mmkit.registry.load_components``).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tqdm import tqdm

import mmkit.datagen.caption  # noqa: F401  (registers the "caption" teacher)
import mmkit.datagen.rules  # noqa: F401  (registers the "rules" teacher)
from mmkit.datagen.base import IMAGE_PLACEHOLDER, Teacher
from mmkit.registry import TEACHERS
from mmkit.synth.world import Scene, generate_scenes, render, symbolic_view


def write_llava_dataset(
    out_dir: Path,
    split: str,
    count: int,
    seed: int,
    teacher: str,
    resolution: int = 64,
    teacher_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Render ``count`` scenes of ``split`` to ``out_dir/images/<scene_id>.png`` and write the
    teacher's conversations about them to ``out_dir/<split>.json``, one record per conversation.

    The same arguments always give the same files. Returns the JSON path.
    """
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    writer: Teacher = TEACHERS.get(teacher, key="teacher")(**(teacher_options or {}))
    records: list[dict[str, Any]] = []
    scenes = generate_scenes(split, count, seed)
    for scene in tqdm(scenes, desc=f"{split} scenes ({teacher})", disable=not progress):
        image_name = f"{scene.scene_id}.png"
        render(scene, resolution).save(image_dir / image_name)
        rng = _scene_rng(seed, scene)
        for index, turns in enumerate(writer.write(symbolic_view(scene, rng), rng)):
            records.append({"id": f"{scene.scene_id}-{index}", "image": image_name, "conversations": turns})
    path = out_dir / f"{split}.json"
    # Written aside and renamed, so a reader that treats the JSON's presence as "dataset ready"
    # never sees a half-written file.
    partial = path.with_name(f"{path.name}.partial")
    partial.write_text(json.dumps(records))
    partial.replace(path)
    return path


def write_text_corpus(count: int, seed: int) -> list[str]:
    """Plain-text lines about ``count`` train scenes: their captions and both built-in teachers'
    instructions and replies (placeholder removed), to train a tokenizer or a tiny LM on."""
    teachers: list[Teacher] = [TEACHERS.get("caption")(), TEACHERS.get("rules")()]
    lines: list[str] = []
    for scene in generate_scenes("train", count, seed):
        rng = _scene_rng(seed, scene)
        view = symbolic_view(scene, rng)
        lines += view["captions"]
        for teacher in teachers:
            for turns in teacher.write(view, rng):
                lines += [turn["value"].replace(IMAGE_PLACEHOLDER, "").strip() for turn in turns]
    return lines


def _scene_rng(seed: int, scene: Scene) -> random.Random:
    # One generator per scene: a scene's text does not depend on how many scenes came before it.
    return random.Random(f"mmkit-text:{seed}:{scene.scene_id}")
