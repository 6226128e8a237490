"""The synthetic world: determinism, split disjointness, geometry, rendering, captions."""
from __future__ import annotations

import itertools
import random

import pytest

from mmkit.core.errors import ConfigError
from mmkit.synth.world import (
    BACKGROUNDS,
    COLOURS,
    QUADRANTS,
    SceneObject,
    captions,
    describe,
    generate_scenes,
    horizontal_relation,
    number_word,
    objects_from_view,
    quadrant,
    reading_order,
    referring_phrase,
    render,
    scene_signature,
    signature_split,
    size_of_box,
    symbolic_view,
    vertical_relation,
)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_scenes_are_deterministic_by_seed_and_split() -> None:
    assert generate_scenes("train", 50, seed=1) == generate_scenes("train", 50, seed=1)
    assert generate_scenes("train", 50, seed=1) != generate_scenes("train", 50, seed=2)
    # A smaller count is a prefix of a larger one.
    assert generate_scenes("val", 30, seed=1) == generate_scenes("val", 60, seed=1)[:30]


def test_scene_layouts_are_valid_and_varied() -> None:
    scenes = generate_scenes("train", 600, seed=0)
    counts = {len(s.objects) for s in scenes}
    assert counts == {1, 2, 3, 4}
    for scene in scenes:
        assert scene.background in BACKGROUNDS
        for obj in scene.objects:
            assert all(0.0 <= c <= 1.0 for c in obj.box)
            assert obj.box[0] < obj.box[2] and obj.box[1] < obj.box[3]
            assert size_of_box(obj.box) == obj.size
        for a, b in itertools.combinations(scene.objects, 2):
            assert not _overlap(a.box, b.box)
    widths = {o.size: o.box[2] - o.box[0] for s in scenes for o in s.objects}
    assert widths["large"] >= 1.8 * widths["small"]
    # Positions spread over the whole image.
    assert {quadrant(o.box) for s in scenes for o in s.objects} == set(QUADRANTS)


def test_splits_never_share_a_signature() -> None:
    signatures = {
        split: {scene_signature(s) for s in generate_scenes(split, count, seed=0)}
        for split, count in (("train", 3000), ("val", 400), ("test", 400))
    }
    assert not signatures["train"] & signatures["val"]
    assert not signatures["train"] & signatures["test"]
    assert not signatures["val"] & signatures["test"]
    # Disjoint by construction: each signature has exactly one home split.
    for split, found in signatures.items():
        assert all(signature_split(sig) == split for sig in found)


def test_scene_ids_are_unique_across_splits() -> None:
    ids = [s.scene_id for split in ("train", "val", "test") for s in generate_scenes(split, 100)]
    assert len(ids) == len(set(ids))
    assert ids[0] == "train-000000"


def test_unknown_split_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="split='dev'"):
        generate_scenes("dev", 3)


@pytest.mark.parametrize("resolution", [64, 96])
def test_render_draws_each_object_in_its_colour_at_its_box(resolution: int) -> None:
    for scene in generate_scenes("test", 40, seed=3):
        image = render(scene, resolution)
        assert image.mode == "RGB" and image.size == (resolution, resolution)
        # Objects keep a margin from the edges, so the corner shows the background.
        assert image.getpixel((0, 0)) == BACKGROUNDS[scene.background]
        for obj in scene.objects:
            x = int((obj.box[0] + obj.box[2]) / 2 * resolution)
            y = int((obj.box[1] + obj.box[3]) / 2 * resolution)
            assert image.getpixel((x, y)) == COLOURS[obj.colour], (scene, obj)


def test_five_captions_name_every_object_with_positions_and_count() -> None:
    for scene in generate_scenes("train", 100, seed=5):
        texts = captions(scene, random.Random(0))
        assert len(texts) == 5 and len(set(texts)) == 5
        for text in texts:
            for obj in scene.objects:
                assert describe(obj) in text, (text, obj)
        count = number_word(len(scene.objects))
        assert sum(count in text.lower() for text in texts) >= 2
        for obj in scene.objects:
            assert sum(quadrant(obj.box) in text for text in texts) >= 2


def test_captions_vary_their_object_order() -> None:
    scene = next(
        s for s in generate_scenes("train", 100) if len({describe(o) for o in s.objects}) == 4
    )
    orders = set()
    for i in range(10):
        plain_list = captions(scene, random.Random(i))[1]
        orders.add(tuple(sorted(scene.objects, key=lambda o: plain_list.index(describe(o)))))
    assert len(orders) > 1


def test_symbolic_view_holds_categories_and_boxes_that_give_back_the_objects() -> None:
    for scene in generate_scenes("val", 50, seed=2):
        view = symbolic_view(scene, random.Random(1))
        assert len(view["captions"]) == 5
        assert [o["category"] for o in view["objects"]] == [f"{o.colour} {o.shape}" for o in scene.objects]
        assert all(round(c, 3) == c for o in view["objects"] for c in o["bbox"])
        assert objects_from_view(view) == scene.objects


def test_position_words_and_relations() -> None:
    top_left, bottom_right = (0.1, 0.1, 0.3, 0.3), (0.6, 0.6, 0.9, 0.9)
    assert quadrant(top_left) == "top left" and quadrant(bottom_right) == "bottom right"
    assert quadrant((0.6, 0.1, 0.9, 0.3)) == "top right"
    assert horizontal_relation(top_left, bottom_right) == "left of"
    assert horizontal_relation(bottom_right, top_left) == "right of"
    assert vertical_relation(top_left, bottom_right) == "above"
    assert vertical_relation(bottom_right, top_left) == "below"
    stacked = (0.15, 0.6, 0.25, 0.8)
    assert horizontal_relation(top_left, stacked) is None
    assert [number_word(n) for n in range(5)] == ["zero", "one", "two", "three", "four"]


def test_reading_order_and_referring_phrases() -> None:
    red_circle = SceneObject("circle", "red", "small", (0.6, 0.6, 0.78, 0.78))
    blue_circle = SceneObject("circle", "blue", "large", (0.1, 0.1, 0.46, 0.46))
    red_square = SceneObject("square", "red", "small", (0.6, 0.1, 0.78, 0.28))
    objects = [red_circle, blue_circle, red_square]
    assert reading_order(objects) == [blue_circle, red_square, red_circle]
    assert referring_phrase(red_square, objects, [("shape",)]) == "square"
    assert referring_phrase(red_circle, objects, [("shape",), ("colour", "shape")]) == "red circle"
    assert referring_phrase(red_circle, objects, [("shape",), ("colour",)]) is None
