"""A ``llava_v1_5_mix665k.json``-shaped data set over the synthetic world, to exercise the
converter and the data pipeline at LLaVA-1.5's size offline.

    python -m mmkit.synth.mix665k --out DIR --records 665000 --images 10000 --seed 0

Writes ``DIR/llava_v1_5_mix665k.json`` and a pool of small JPEG scenes under ``DIR`` at the real
file's relative paths (``coco/train2017/000000xxxxxx.jpg``, ``gqa/images/...``,
``ocr_vqa/images/...``, ``textvqa/train_images/...``, ``vg/VG_100K/...``). The records keep
the real mix's sources in its proportions (LLaVA-1.5 paper, Table 7) and its shapes: text-only
ShareGPT conversations with no ``image`` key, some far over 2048 tokens; VQA records of many
short turns with the response-format prompts; multiple-choice A-OKVQA; OCR-VQA book questions;
region records with ``[x1, y1, x2, y2]`` boxes; LLaVA-Instruct conversation, detail and complex
reasoning written by the ``rules`` teacher. Images are reused across records, as COCO's are in
the real file. Answers about objects are true of the rendered scene; book titles, authors and
ShareGPT text are filler words.
"""
from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mmkit.core.atomic_io import atomic_path
from mmkit.core.errors import ConfigError
from mmkit.datagen.teacher import build_teacher
from mmkit.synth.llava_data import scene_rng
from mmkit.synth.world import (
    COLOURS,
    SHAPES,
    Scene,
    SceneObject,
    category,
    generate_scenes,
    quadrant,
    render,
    symbolic_view,
)

JSON_NAME = "llava_v1_5_mix665k.json"
DEFAULT_IMAGES = 10_000
SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
REGION_BOX = "Please provide the bounding box coordinate of the region this sentence describes: "
REGION_DESCRIPTION = "Please provide a short description for this region: "
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."

# Records per source in thousands (paper Table 7), and the image folder each source's images are in.
SOURCES: dict[str, tuple[int, str | None]] = {
    "llava": (158, "coco"), "sharegpt": (40, None), "vqav2": (83, "coco"), "gqa": (72, "gqa"),
    "okvqa": (9, "coco"), "ocrvqa": (80, "ocr_vqa"), "aokvqa": (66, "coco"), "textcaps": (22, "textvqa"),
    "refcoco": (48, "coco"), "vg": (86, "vg"),
}
# Unique images of each folder in the real file, in thousands (COCO train2017 ~118K; the others
# as many as their sources use, roughly): the image pool is split in these proportions.
FOLDERS: dict[str, tuple[int, str, Callable[[int], str]]] = {
    "coco": (118, "coco/train2017", lambda n: f"{n:012d}.jpg"),
    "gqa": (46, "gqa/images", lambda n: f"{2_300_000 + n}.jpg"),
    "ocr_vqa": (80, "ocr_vqa/images", lambda n: f"{60_000_000 + 7919 * n:010d}.jpg"),
    "textvqa": (22, "textvqa/train_images", lambda n: f"{(n * 0x9E3779B97F4A7C15) % (1 << 64):016x}.jpg"),
    "vg": (86, "vg/VG_100K", lambda n: f"{n + 1}.jpg"),
}
# A cheap token estimate (LLaMA's tokenizer gives about 1.3 tokens per English word).
TOKENS_PER_WORD = 1.3
_FILLER = ("the", "a", "of", "and", "to", "in", "is", "that", "it", "for", "on", "with", "as", "was", "by", "this",
           "be", "are", "from", "at", "or", "an", "have", "not", "which", "model", "data", "image", "train",
           "answer", "question", "system", "value", "function", "return", "user", "list", "file", "code", "time",
           "people", "world", "water", "history", "science", "music", "language", "number", "example", "result")
_GENRES = ("Travel", "Cookbooks", "Romance", "History", "Science & Math", "Comics", "Law", "Arts & Photography")


def source_counts(records: int) -> dict[str, int]:
    """Records per source for a mix of ``records`` in the real proportions (largest remainders)."""
    whole = sum(thousands for thousands, _ in SOURCES.values())
    shares = {name: records * thousands / whole for name, (thousands, _) in SOURCES.items()}
    counts = {name: int(share) for name, share in shares.items()}
    by_remainder = sorted(shares, key=lambda name: shares[name] - counts[name], reverse=True)
    for name in by_remainder[: records - sum(counts.values())]:
        counts[name] += 1
    return counts


def folder_sizes(images: int) -> dict[str, int]:
    """Images per folder for a pool of ``images``, at least one each."""
    whole = sum(thousands for thousands, _, _ in FOLDERS.values())
    return {name: max(1, images * thousands // whole) for name, (thousands, _, _) in FOLDERS.items()}


def estimated_tokens(record: dict[str, Any]) -> int:
    return int(sum(len(turn["value"].split()) for turn in record["conversations"]) * TOKENS_PER_WORD)


def _turns(pairs: list[tuple[str, str]], suffix: str = "") -> list[dict[str, str]]:
    """Human/gpt turns, ``<image>`` before the first question, ``suffix`` after each question."""
    turns = []
    for number, (question, answer) in enumerate(pairs):
        prefix = "<image>\n" if number == 0 else ""
        turns += [{"from": "human", "value": f"{prefix}{question}{suffix}"}, {"from": "gpt", "value": answer}]
    return turns


def _box_text(obj: SceneObject) -> str:
    return "[" + ", ".join(f"{c:.2f}" for c in obj.box) + "]"


def _short_question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A question with a one-word answer that is true of the scene."""
    obj = rng.choice(scene.objects)
    kind = rng.randrange(5)
    if kind == 0:
        return f"What colour is the {obj.shape} in the {quadrant(obj.box)}?", obj.colour
    if kind == 1:
        return f"What shape is in the {quadrant(obj.box)}?", obj.shape
    if kind == 2:
        return "How many objects are there?", str(len(scene.objects))
    if kind == 3:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        present = any(o.colour == colour and o.shape == shape for o in scene.objects)
        return f"Is there a {colour} {shape}?", "Yes" if present else "No"
    return f"Is the {category(obj)} small or large?", obj.size


def _vqa(scene: Scene, rng: random.Random, most_turns: int) -> list[dict[str, str]]:
    pairs = [_short_question(scene, rng) for _ in range(rng.randint(1, most_turns))]
    return _turns(pairs, suffix="\n" + SHORT_ANSWER)


def _multiple_choice(scene: Scene, rng: random.Random) -> list[dict[str, str]]:
    obj = rng.choice(scene.objects)
    options = rng.sample([c for c in COLOURS if c != obj.colour], 3) + [obj.colour]
    rng.shuffle(options)
    letters = "ABCD"
    listed = "\n".join(f"{letter}. {option}" for letter, option in zip(letters, options))
    question = f"What colour is the {obj.shape} in the {quadrant(obj.box)}?\n{listed}\n{OPTION_LETTER}"
    return _turns([(question, letters[options.index(obj.colour)])])


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choices(_FILLER, k=count))


def _book(rng: random.Random) -> list[dict[str, str]]:
    title, author, genre = _words(rng, rng.randint(2, 6)).title(), _words(rng, 2).title(), rng.choice(_GENRES)
    asked = rng.choice(_GENRES)
    pairs = [("Who wrote this book?", author), ("What is the title of this book?", title),
             ("What type of book is this?", genre), (f"Is this a {asked.lower()} book?", "Yes" if asked == genre else "No")]
    return _turns(pairs[: rng.randint(2, 4)], suffix="\n" + SHORT_ANSWER)


def _regions(scene: Scene, rng: random.Random) -> list[dict[str, str]]:
    pairs = []
    for obj in rng.sample(scene.objects, len(scene.objects)):
        phrase = f"the {category(obj)} in the {quadrant(obj.box)}"
        pairs.append((REGION_BOX + phrase + ".", _box_text(obj)) if rng.random() < 0.5
                     else (REGION_DESCRIPTION + _box_text(obj) + ".", phrase.capitalize() + "."))
    return _turns(pairs)


def _caption(scene: Scene, rng: random.Random) -> list[dict[str, str]]:
    view = symbolic_view(scene, rng)
    return _turns([(CAPTION_PROMPT, rng.choice(view["captions"]))])


def _sharegpt(rng: random.Random) -> list[dict[str, str]]:
    """A text-only chat whose length is long-tailed: a median of ~300 words per turn pair, and
    about one in twenty chats over 2048 tokens, some several times that."""
    words = min(int(rng.lognormvariate(5.7, 1.0)), 12_000)
    pairs = rng.randint(1, 6)
    turns = []
    for _ in range(pairs):
        turns += [{"from": "human", "value": _words(rng, max(3, words // pairs // 5)).capitalize() + "?"},
                  {"from": "gpt", "value": _words(rng, max(5, words // pairs)).capitalize() + "."}]
    return turns


class _ImagePool:
    """The pool's scenes by folder, each with its relative path, and the LLaVA-Instruct
    conversations the ``rules`` teacher writes about each COCO scene (computed when first used)."""

    def __init__(self, images: int, seed: int) -> None:
        sizes = folder_sizes(images)
        scenes = iter(generate_scenes("train", sum(sizes.values()), seed))
        self.seed = seed
        self.entries: dict[str, list[tuple[str, Scene]]] = {
            name: [(f"{FOLDERS[name][1]}/{FOLDERS[name][2](n)}", next(scenes)) for n in range(size)]
            for name, size in sizes.items()
        }
        self._teacher = build_teacher("rules", {})
        self._instruct: dict[str, list[list[dict[str, str]]]] = {}

    def pick(self, folder: str, rng: random.Random) -> tuple[str, Scene]:
        return rng.choice(self.entries[folder])

    def instruct(self, path: str, scene: Scene) -> list[list[dict[str, str]]]:
        if path not in self._instruct:
            rng = scene_rng(self.seed, scene)
            written = self._teacher.write(symbolic_view(scene, rng), rng)
            self._instruct[path] = [w.conversation for w in written]
        return self._instruct[path]


def _record(source: str, pool: _ImagePool, rng: random.Random, number: int) -> dict[str, Any]:
    if source == "sharegpt":
        chat_id = "".join(rng.choices("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", k=7))
        return {"id": f"{chat_id}_{rng.randrange(4)}", "model": "", "conversations": _sharegpt(rng)}
    path, scene = pool.pick(SOURCES[source][1], rng)
    if source == "llava":
        written = pool.instruct(path, scene)
        conversations = written[number % len(written)]
    elif source in ("vqav2", "gqa", "okvqa"):
        conversations = _vqa(scene, rng, most_turns={"vqav2": 8, "gqa": 12, "okvqa": 1}[source])
    elif source == "aokvqa":
        conversations = _multiple_choice(scene, rng)
    elif source == "ocrvqa":
        conversations = _book(rng)
    elif source == "textcaps":
        conversations = _caption(scene, rng)
    else:  # refcoco, vg
        conversations = _regions(scene, rng)
    # Ids are the image's name, repeated across its records as in the real file.
    return {"id": Path(path).stem, "image": path, "conversations": conversations}


def mix_records(records: int, pool: _ImagePool, seed: int, progress: bool = True) -> list[dict[str, Any]]:
    """``records`` records in the real mix's proportions, shuffled; the same arguments give the
    same list."""
    rng = random.Random(f"mmkit-mix665k:{seed}")
    counts = source_counts(records)
    out = []
    with tqdm(total=records, desc="records", unit="record", disable=not progress) as bar:
        for source, count in counts.items():
            out += [_record(source, pool, rng, number) for number in range(count)]
            bar.update(count)
    rng.shuffle(out)
    return out


def write_mix665k(
    out: Path, records: int = 665_000, images: int = DEFAULT_IMAGES, seed: int = 0, resolution: int = 64,
    progress: bool = True,
) -> Path:
    """Write the image pool and ``out/llava_v1_5_mix665k.json``; returns the JSON's path."""
    if records < 1 or images < len(FOLDERS):
        raise ConfigError(f"records={records}, images={images}: need a record and an image per folder "
                          f"({len(FOLDERS)})")
    pool = _ImagePool(images, seed)
    entries = [entry for folder in pool.entries.values() for entry in folder]
    for path, scene in tqdm(entries, desc="images", unit="image", disable=not progress):
        with atomic_path(out / path) as temporary:
            render(scene, resolution).save(temporary, format="JPEG", quality=90)
    json_path = out / JSON_NAME
    with atomic_path(json_path) as temporary:
        temporary.write_text(json.dumps(mix_records(records, pool, seed, progress)), encoding="utf-8")
    return json_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--records", type=int, default=665_000)
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES,
                        help="unique images in the pool, reused across records (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=64, help="side of the square JPEGs in pixels")
    args = parser.parse_args(argv)
    path = write_mix665k(args.out, args.records, args.images, args.seed, args.resolution)
    print(f"wrote {args.records} records about {args.images} images to {path}")


if __name__ == "__main__":
    main()
