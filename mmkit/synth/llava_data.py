"""The synthetic world written out as LLaVA data: an image folder plus ``<split>.json``.

Built-in teachers are registered by importing them here; a plugin's teacher must be loaded by
the caller first (``mmkit.core.registry.load_components``).

:func:`teach` is the one loop every writer shares (this module's :func:`write_llava_dataset`
and ``python -m mmkit.datagen``): scenes in, each scene's typed conversations out, through the
teacher's batch path. Each scene has its own random generator, so what is written about a scene
does not depend on which scenes came before it, and a resumed run writes exactly what an
uninterrupted one would.
"""
from __future__ import annotations

import itertools
import json
import random
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from tqdm import tqdm

import mmkit.datagen.caption  # noqa: F401  (registers the "caption" teacher)
import mmkit.datagen.openai  # noqa: F401  (registers the "openai" teacher)
import mmkit.datagen.rules  # noqa: F401  (registers the "rules" teacher)
from mmkit.core.atomic_io import atomic_path
from mmkit.core.registry import TEACHERS
from mmkit.datagen.teacher import IMAGE_PLACEHOLDER, Failed, Teacher, Written, build_teacher, outcome_records, text_rng
from mmkit.synth.world import Scene, generate_scenes, render, symbolic_view

# The keys of a record in LLaVA's JSON format.
LLAVA_KEYS = ("id", "image", "conversations")


def scene_rng(seed: int, scene: Scene) -> random.Random:
    """The generator for everything written about ``scene`` (its captions, then its conversations)."""
    return text_rng(seed, scene.scene_id)


def teach(teacher: Teacher, scenes: Iterable[Scene], seed: int) -> Iterator[tuple[Scene, list[Written | Failed]]]:
    """``(scene, what the teacher wrote about it)`` for each scene in order, lazily, through
    ``teacher.write_many`` (concurrent for teachers that wait on a server)."""
    scenes_a, scenes_b = itertools.tee(scenes)
    scenes_with_rngs = ((scene, scene_rng(seed, scene)) for scene in scenes_a)
    outcomes = teacher.write_many((symbolic_view(scene, rng), rng) for scene, rng in scenes_with_rngs)
    return zip(scenes_b, outcomes)


def image_name(scene: Scene) -> str:
    return f"{scene.scene_id}.png"


def scene_records(scene: Scene, outcomes: Sequence[Written | Failed]) -> list[dict[str, Any]]:
    """The records of what a teacher wrote about ``scene`` (see :func:`outcome_records`)."""
    return outcome_records(scene.scene_id, image_name(scene), outcomes)


def llava_record(record: dict[str, Any]) -> dict[str, Any]:
    """The LLaVA-format part of a record (``id``, ``image``, ``conversations``)."""
    return {key: record[key] for key in LLAVA_KEYS if key in record}


def save_image(scene: Scene, image_dir: Path, resolution: int) -> Path:
    """Render ``scene`` into ``image_dir`` (atomically: a killed run never leaves half a PNG)."""
    path = image_dir / image_name(scene)
    with atomic_path(path) as temporary:
        render(scene, resolution).save(temporary, format="PNG")
    return path


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

    The same arguments always give the same files. A response the teacher could not use is left
    out with a warning (``python -m mmkit.datagen`` counts and lists them). Returns the JSON path.
    """
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    writer = build_teacher(teacher, teacher_options)
    records: list[dict[str, Any]] = []
    failures: list[str] = []
    scenes = generate_scenes(split, count, seed)
    written = teach(writer, scenes, seed)
    for scene, outcomes in tqdm(written, total=len(scenes), desc=f"{split} scenes ({teacher})", disable=not progress):
        save_image(scene, image_dir, resolution)
        for record in scene_records(scene, outcomes):
            if "error" in record:
                failures.append(f"{record['id']} ({record['type']}): {record['error']}")
            else:
                records.append(llava_record(record))
    if failures:
        warnings.warn(
            f"teacher {teacher!r}: {len(failures)} response(s) could not be used and were left out, "
            f"e.g. {failures[0]}",
            RuntimeWarning,
            stacklevel=2,
        )
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
        rng = scene_rng(seed, scene)
        view = symbolic_view(scene, rng)
        lines += view["captions"]
        for teacher in teachers:
            for written in teacher.write(view, rng):
                lines += [turn["value"].replace(IMAGE_PLACEHOLDER, "").strip() for turn in written.conversation]
    return lines
