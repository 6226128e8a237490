"""A small ScienceQA-format set about the synthetic world, so the ScienceQA path runs offline.

    python -m mmkit.synth.scienceqa_questions OUT_DIR --train 600 --val 100 --test 200

Writes ScienceQA's published layout (problems.json, pid_splits.json, images/<split>/<pid>/image.png)
with multiple-choice questions whose context is the image, a caption as text (the hint), both, or
neither, spread over the three subjects and both grade bands, so every column of the score table
has problems. The subject and grade are labels of convenience: the questions are about shapes.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Callable

from mmkit.core.cache import build_once, cache_folder
from mmkit.synth.world import (
    COLOURS,
    SHAPES,
    Scene,
    SceneObject,
    captions,
    generate_scenes,
    number_word,
    quadrant,
    referring_phrase,
    render,
)

DEFAULT_COUNTS = {"train": 600, "val": 100, "test": 200}
# Which contexts a problem gets: image only, text only, both, or none (world-knowledge questions).
CONTEXTS = ("image", "text", "both", "none")
LECTURES = {
    "colour": "Every object in a picture has one colour. To find it, look at the object itself.",
    "count": "To count objects, look at each one once and keep a tally.",
    "position": "A picture can be split into four quarters: top left, top right, bottom left and bottom right.",
    "knowledge": "Words can name a colour, a shape or a size.",
}
SUBJECT_OF = {"colour": "natural science", "position": "social science", "count": "language science",
              "knowledge": "language science"}


def write_scienceqa(out: Path, counts: dict[str, int] | None = None, seed: int = 0, resolution: int = 64) -> Path:
    counts = counts or DEFAULT_COUNTS
    out.mkdir(parents=True, exist_ok=True)
    problems: dict[str, dict[str, Any]] = {}
    splits: dict[str, list[str]] = {}
    rng = random.Random(f"mmkit-scienceqa:{seed}")
    for split, count in counts.items():
        splits[split] = []
        scenes = generate_scenes(split, count, seed=seed + 100)
        for scene in scenes:
            pid = str(len(problems) + 1)
            problem = _problem(scene, rng)
            problem["split"] = split
            problems[pid] = problem
            splits[split].append(pid)
            if problem["image"]:
                folder = out / "images" / split / pid
                folder.mkdir(parents=True, exist_ok=True)
                render(scene, resolution).save(folder / "image.png")
    (out / "problems.json").write_text(json.dumps(problems, indent=1))
    (out / "pid_splits.json").write_text(json.dumps(splits))
    return out


def synthetic_scienceqa_dir(seed: int = 0) -> Path:
    """The default set, built once under $MMKIT_HOME/data."""
    folder = cache_folder("scienceqa-synthetic", {"seed": seed, "counts": DEFAULT_COUNTS, "version": 1})
    return build_once(folder, lambda out: write_scienceqa(out, seed=seed))


def _problem(scene: Scene, rng: random.Random) -> dict[str, Any]:
    context = rng.choice(CONTEXTS)
    kind = "knowledge" if context == "none" else rng.choice(("colour", "count", "position"))
    asked = _ASK[kind](scene, rng)
    if asked is None:  # no object can be named that way; a count can always be asked
        kind, asked = "count", _ask_count(scene, rng)
    question, answer, options, solution = asked
    choices = rng.sample(options, len(options))
    hint = next(c for c in captions(scene, rng) if " in the " in c) if context in ("text", "both") else ""
    return {
        "question": question, "choices": choices, "answer": choices.index(answer), "hint": hint,
        "image": "image.png" if context in ("image", "both") else None,
        "task": "closed choice", "subject": SUBJECT_OF[kind], "topic": kind, "category": kind, "skill": kind,
        "grade": f"grade{rng.randint(1, 12)}", "lecture": LECTURES[kind], "solution": solution,
    }


def _distractors(correct: str, pool: list[str], rng: random.Random, n: int = 3) -> list[str]:
    return [correct, *rng.sample([p for p in pool if p != correct], n)]


def _named(scene: Scene, attribute_sets: list[tuple[str, ...]]) -> list[tuple[SceneObject, str]]:
    named = [(o, referring_phrase(o, scene.objects, attribute_sets)) for o in scene.objects]
    return [(o, phrase) for o, phrase in named if phrase is not None]


def _ask_colour(scene: Scene, rng: random.Random) -> tuple[str, str, list[str], str] | None:
    named = _named(scene, [("shape",), ("size", "shape")])  # never name the colour asked for
    if not named:
        return None
    obj, phrase = rng.choice(named)
    return f"What colour is the {phrase}?", obj.colour, _distractors(obj.colour, list(COLOURS), rng), f"The {phrase} is {obj.colour}."


def _ask_count(scene: Scene, rng: random.Random) -> tuple[str, str, list[str], str]:
    n = len(scene.objects)
    options = [number_word(k) for k in range(1, 5)]
    return "How many shapes are in the picture?", number_word(n), options, f"There are {number_word(n)} shapes."


def _ask_position(scene: Scene, rng: random.Random) -> tuple[str, str, list[str], str] | None:
    named = _named(scene, [("shape",), ("colour", "shape"), ("size", "colour", "shape")])
    if not named:
        return None
    obj, phrase = rng.choice(named)
    where = quadrant(obj.box)
    options = ["top left", "top right", "bottom left", "bottom right"]
    return f"Where is the {phrase}?", where, options, f"The {phrase} is in the {where}."


def _ask_knowledge(scene: Scene, rng: random.Random) -> tuple[str, str, list[str], str]:
    shape = rng.choice(SHAPES)
    options = [shape, rng.choice(list(COLOURS)), rng.choice(("small", "large"))]
    return "Which word names a shape?", shape, options, f"{shape.capitalize()} is the name of a shape."


_ASK: dict[str, Callable[[Scene, random.Random], tuple[str, str, list[str], str] | None]] = {
    "colour": _ask_colour, "count": _ask_count, "position": _ask_position, "knowledge": _ask_knowledge,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    for split, count in DEFAULT_COUNTS.items():
        parser.add_argument(f"--{split}", type=int, default=count, help=f"problems in {split} (default {count})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = {split: getattr(args, split) for split in DEFAULT_COUNTS}
    write_scienceqa(args.out, counts, seed=args.seed)
    print(f"wrote {sum(counts.values())} problems to {args.out}")


if __name__ == "__main__":
    main()
