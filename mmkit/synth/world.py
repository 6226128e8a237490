"""A deterministic world of coloured shapes with exact boxes: scenes, renderings, captions.

Each scene holds 1-4 objects, one per image quadrant, so every object's position word is
unambiguous and boxes never overlap. Its *symbolic view* (captions + categories with boxes) is
what LLaVA's text-only teacher saw of a COCO image; the teachers in ``mmkit.datagen`` write
instruction data from that view alone.

Splits are disjoint by construction: a scene's *signature* (its objects with boxes quantised,
background ignored) hashes to one split, and a split only keeps scenes whose signature is its own.
So no val/test scene could ever be drawn for train, whatever the counts.
"""
from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from PIL import Image, ImageDraw

from mmkit.core.errors import ConfigError, DataError

Box = tuple[float, float, float, float]
RGB = tuple[int, int, int]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 205, 40),
    "purple": (145, 60, 190),
    "orange": (245, 135, 30),
}
BACKGROUNDS: dict[str, RGB] = {"white": (250, 250, 250), "gray": (120, 120, 120), "black": (15, 15, 15)}
SIZES: tuple[str, ...] = ("small", "large")
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
MAX_OBJECTS = len(QUADRANTS)

# Box sides in hundredths of the image: a large object is twice as wide as a small one, so the
# two sizes stay clearly apart even at 64 px. Coordinates are whole hundredths, which makes them
# exact after the symbolic view's rounding to 3 decimals.
_SIDE_HUNDREDTHS = {"small": 18, "large": 36}
# Gap kept from the image edges and from the midlines, so objects in neighbouring quadrants never touch.
_MARGIN_HUNDREDTHS = 3
# A box wider than this is large: halfway between the two sides.
_LARGE_MIN_WIDTH = (_SIDE_HUNDREDTHS["small"] + _SIDE_HUNDREDTHS["large"]) / 200
# Boxes are compared on an 8x8 grid of centres: scenes that differ by less are the same scene.
_SIGNATURE_GRID = 8
# hash(signature) % 10 picks the split: 80% train, 10% val, 10% test.
_SPLIT_BUCKETS: dict[str, frozenset[int]] = {
    "train": frozenset(range(8)),
    "val": frozenset({8}),
    "test": frozenset({9}),
}
SPLITS: tuple[str, ...] = tuple(_SPLIT_BUCKETS)
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    box: Box  # normalised (x1, y1, x2, y2), origin at the top left


@dataclass(frozen=True)
class Scene:
    scene_id: str
    objects: tuple[SceneObject, ...]
    background: str


# ---------------------------------------------------------------------------------------------
# Words for objects, positions and numbers (shared by captions and teachers)


def category(obj: SceneObject) -> str:
    """The detector-style label the symbolic view carries, e.g. ``"red circle"``."""
    return f"{obj.colour} {obj.shape}"


def describe(obj: SceneObject) -> str:
    """Every attribute, without an article: ``"small red circle"``."""
    return f"{obj.size} {obj.colour} {obj.shape}"


def box_centre(box: Box) -> tuple[float, float]:
    x1, y1, x2, y2 = box
    return (x1 + x2) / 2, (y1 + y2) / 2


def quadrant(box: Box) -> str:
    """Which quarter of the image holds the box's centre, e.g. ``"top left"``."""
    cx, cy = box_centre(box)
    return f"{'top' if cy < 0.5 else 'bottom'} {'left' if cx < 0.5 else 'right'}"


def horizontal_relation(a: Box, b: Box) -> str | None:
    """``"left of"`` / ``"right of"`` when box ``a`` lies wholly on that side of ``b``, else None."""
    if a[2] <= b[0]:
        return "left of"
    if b[2] <= a[0]:
        return "right of"
    return None


def vertical_relation(a: Box, b: Box) -> str | None:
    """``"above"`` / ``"below"`` when box ``a`` lies wholly on that side of ``b``, else None."""
    if a[3] <= b[1]:
        return "above"
    if b[3] <= a[1]:
        return "below"
    return None


def size_of_box(box: Box) -> str:
    """The size word a box implies; how a teacher recovers sizes from boxes alone."""
    return "large" if box[2] - box[0] > _LARGE_MIN_WIDTH else "small"


def reading_order(objects: Iterable[SceneObject]) -> list[SceneObject]:
    """Top row first, left to right: the order a fixed-form description lists objects in."""
    return sorted(objects, key=lambda o: (quadrant(o.box).startswith("bottom"), box_centre(o.box)[0]))


def number_word(n: int) -> str:
    """``2 -> "two"``; counts are always spelled out, in captions and answers alike."""
    return _NUMBER_WORDS[n] if 0 <= n < len(_NUMBER_WORDS) else str(n)


def plural(noun: str, n: int) -> str:
    return noun if n == 1 else f"{noun}s"


def join_words(items: Sequence[str]) -> str:
    """``["a", "b", "c"] -> "a, b and c"``."""
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def referring_phrase(
    obj: SceneObject, objects: Sequence[SceneObject], attribute_sets: Sequence[Sequence[str]]
) -> str | None:
    """The first of ``attribute_sets`` whose values single out ``obj`` among ``objects``.

    ``attribute_sets=[("shape",), ("colour", "shape")]`` gives ``"circle"`` when the scene has one
    circle, ``"red circle"`` when it has several but one red one, and None when neither picks it out.
    """
    for attributes in attribute_sets:
        key = attribute_values(obj, attributes)
        if sum(attribute_values(o, attributes) == key for o in objects) == 1:
            return " ".join(key)
    return None


def attribute_values(obj: SceneObject, attributes: Sequence[str]) -> tuple[str, ...]:
    """``obj``'s values of ``attributes``, e.g. ``("red", "circle")`` for (colour, shape)."""
    return tuple(getattr(obj, name) for name in attributes)


def all_descriptions(attributes: Sequence[str]) -> list[tuple[str, ...]]:
    """Every combination of values of ``attributes``, e.g. all (colour, shape) pairs."""
    values = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES}
    return list(itertools.product(*(values[name] for name in attributes)))


# ---------------------------------------------------------------------------------------------
# Scene generation and split assignment


def generate_scenes(split: str, count: int, seed: int = 0) -> list[Scene]:
    """``count`` distinct scenes of ``split``; the same (seed, split) always gives the same list.

    A smaller ``count`` gives a prefix of a larger one. Raises DataError if the world cannot
    supply that many distinct scenes.
    """
    if split not in _SPLIT_BUCKETS:
        raise ConfigError(f"split={split!r}: unknown split; choose one of {', '.join(SPLITS)}")
    rng = random.Random(f"mmkit-world:{seed}:{split}")
    scenes: list[Scene] = []
    seen: set[tuple[frozenset[SceneObject], str]] = set()
    draws_left = 100 * count + 10_000
    while len(scenes) < count:
        if draws_left == 0:
            raise DataError(f"the synthetic world gave only {len(scenes)} distinct {split} scenes of {count} asked for")
        draws_left -= 1
        objects, background = _random_layout(rng)
        identity = (frozenset(objects), background)
        if signature_split(object_signature(objects)) != split or identity in seen:
            continue
        seen.add(identity)
        scenes.append(Scene(f"{split}-{len(scenes):06d}", objects, background))
    return scenes


def _random_layout(rng: random.Random) -> tuple[tuple[SceneObject, ...], str]:
    quadrants = rng.sample(QUADRANTS, rng.randint(1, MAX_OBJECTS))
    objects = tuple(_random_object(rng, q) for q in quadrants)
    return objects, rng.choice(list(BACKGROUNDS))


def _random_object(rng: random.Random, where: str) -> SceneObject:
    size = rng.choice(SIZES)
    side = _SIDE_HUNDREDTHS[size]
    row, column = where.split()
    x1 = _random_offset(rng, side, column == "right")
    y1 = _random_offset(rng, side, row == "bottom")
    box = (x1 / 100, y1 / 100, (x1 + side) / 100, (y1 + side) / 100)
    return SceneObject(shape=rng.choice(SHAPES), colour=rng.choice(list(COLOURS)), size=size, box=box)


def _random_offset(rng: random.Random, side: int, second_half: bool) -> int:
    """Start coordinate, in hundredths, of a ``side``-long box inside one half of the image."""
    start = 50 if second_half else 0
    return rng.randint(start + _MARGIN_HUNDREDTHS, start + 50 - _MARGIN_HUNDREDTHS - side)


def scene_signature(scene: Scene) -> tuple[tuple[Any, ...], ...]:
    return object_signature(scene.objects)


def object_signature(objects: Iterable[SceneObject]) -> tuple[tuple[Any, ...], ...]:
    """Objects sorted, each as (shape, colour, size, centre cell on an 8x8 grid)."""
    return tuple(
        sorted(
            (o.shape, o.colour, o.size, *(int(c * _SIGNATURE_GRID) for c in box_centre(o.box)))
            for o in objects
        )
    )


def signature_split(signature: tuple[tuple[Any, ...], ...]) -> str:
    """The one split a signature belongs to (a stable hash, unlike the salted built-in ``hash``)."""
    digest = hashlib.blake2b(repr(signature).encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 10
    return next(split for split, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


# ---------------------------------------------------------------------------------------------
# Rendering


def render(scene: Scene, resolution: int = 64) -> Image.Image:
    """The scene as an RGB image of ``resolution`` x ``resolution`` pixels."""
    image = Image.new("RGB", (resolution, resolution), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, resolution)
    return image


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, resolution: int) -> None:
    # PIL's boxes include their last pixel, hence the -1 on the far edges.
    x1, y1 = obj.box[0] * resolution, obj.box[1] * resolution
    x2, y2 = obj.box[2] * resolution - 1, obj.box[3] * resolution - 1
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x1, y1, x2, y2), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x1, y2), (x2, y2), ((x1 + x2) / 2, y1)], fill=fill)
    else:
        raise DataError(f"cannot draw shape {obj.shape!r}")


# ---------------------------------------------------------------------------------------------
# Captions and the symbolic view


def captions(scene: Scene, rng: random.Random) -> list[str]:
    """Five captions in different wordings and object orders, each naming every object's size,
    colour and shape; three also give positions and two the count."""
    return [write(scene, _shuffled(scene.objects, rng), rng) for write in _CAPTION_WRITERS]


def _shuffled(objects: Sequence[SceneObject], rng: random.Random) -> list[SceneObject]:
    return rng.sample(list(objects), len(objects))


def _counted_objects(objects: Sequence[SceneObject], noun: str) -> str:
    return f"{number_word(len(objects))} {plural(noun, len(objects))}"


def _caption_count_and_places(scene: Scene, objects: list[SceneObject], rng: random.Random) -> str:
    # "Two objects on a white background: a small red circle in the top left and ..."
    placed = [f"a {describe(o)} in the {quadrant(o.box)}" for o in objects]
    noun = rng.choice(("object", "shape"))
    return f"{capitalise(_counted_objects(objects, noun))} on a {scene.background} background: {join_words(placed)}."


def _caption_plain_list(scene: Scene, objects: list[SceneObject], rng: random.Random) -> str:
    # "A picture of a large blue square and a small red circle."
    opening = rng.choice(("A picture of", "An image of", "A drawing of"))
    return f"{opening} {join_words([f'a {describe(o)}' for o in objects])}."


def _caption_count_then_sentences(scene: Scene, objects: list[SceneObject], rng: random.Random) -> str:
    # "There are two shapes in the image. A small red circle is in the top left. ..."
    verb = "is" if len(objects) == 1 else "are"
    medium = rng.choice(("image", "picture"))
    sentences = [f"A {describe(o)} is in the {quadrant(o.box)}." for o in objects]
    return " ".join([f"There {verb} {_counted_objects(objects, 'shape')} in the {medium}.", *sentences])


def _caption_places_first(scene: Scene, objects: list[SceneObject], rng: random.Random) -> str:
    # "In the top left there is a small red circle, and in the bottom right there is a large blue square."
    clauses = [f"in the {quadrant(o.box)} there is a {describe(o)}" for o in objects]
    if len(clauses) > 1:
        clauses[-1] = f"and {clauses[-1]}"
    return capitalise(", ".join(clauses)) + "."


def _caption_on_background(scene: Scene, objects: list[SceneObject], rng: random.Random) -> str:
    # "A large blue square and a small red circle are shown on a white background."
    verb = "is" if len(objects) == 1 else "are"
    shown = rng.choice(("shown", "drawn"))
    listed = capitalise(join_words([f"a {describe(o)}" for o in objects]))
    return f"{listed} {verb} {shown} on a {scene.background} background."


_CAPTION_WRITERS = (
    _caption_count_and_places,
    _caption_plain_list,
    _caption_count_then_sentences,
    _caption_places_first,
    _caption_on_background,
)


def symbolic_view(scene: Scene, rng: random.Random) -> dict[str, Any]:
    """What a text-only teacher sees: five captions and each object's category with its box."""
    return {
        "captions": captions(scene, rng),
        "objects": [
            {"category": category(o), "bbox": [round(c, 3) for c in o.box]} for o in scene.objects
        ],
    }


def objects_from_view(view: dict[str, Any]) -> tuple[SceneObject, ...]:
    """The objects a symbolic view describes, sizes recovered from the boxes."""
    return tuple(_object_from_annotation(annotation) for annotation in view["objects"])


def _object_from_annotation(annotation: dict[str, Any]) -> SceneObject:
    colour, _, shape = str(annotation["category"]).partition(" ")
    if colour not in COLOURS or shape not in SHAPES:
        raise DataError(f"unknown object category {annotation['category']!r} in a symbolic view")
    try:
        x1, y1, x2, y2 = (float(c) for c in annotation["bbox"])
    except (TypeError, ValueError) as exc:
        raise DataError(f"bbox {annotation['bbox']!r} must be [x1, y1, x2, y2]") from exc
    box = (x1, y1, x2, y2)
    return SceneObject(shape=shape, colour=colour, size=size_of_box(box), box=box)


