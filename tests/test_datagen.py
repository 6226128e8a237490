"""Teachers and the written LLaVA data: formats, and answers checked against the scenes."""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

import mmkit.datagen.caption
import mmkit.datagen.rules
from mmkit.core.errors import ConfigError
from mmkit.core.registry import TEACHERS
from mmkit.datagen.teacher import IMAGE_PLACEHOLDER, Teacher
from mmkit.synth.llava_data import write_llava_dataset, write_text_corpus
from mmkit.synth.world import SceneObject, describe, generate_scenes, number_word, quadrant, symbolic_view

SCENES = generate_scenes("train", 300, seed=11)


def _views() -> list[tuple[tuple[SceneObject, ...], dict]]:
    return [(scene.objects, symbolic_view(scene, random.Random(i))) for i, scene in enumerate(SCENES)]


def _referent(phrase: str, objects: tuple[SceneObject, ...]) -> SceneObject:
    """The one object whose attributes include every word of ``phrase``."""
    words = set(phrase.split())
    found = [o for o in objects if words <= {o.size, o.colour, o.shape}]
    assert len(found) == 1, (phrase, objects)
    return found[0]


def _short(word: str) -> str:
    return word.capitalize() + "."


def _larger(a: SceneObject, b: SceneObject, a_phrase: str, b_phrase: str) -> str:
    if a.size == b.size:
        return "They are the same size."
    return f"The {a_phrase if a.size == 'large' else b_phrase}."


def _relation_holds(a: SceneObject, b: SceneObject, words: str) -> bool:
    return {
        "to the left of": a.box[2] <= b.box[0],
        "to the right of": b.box[2] <= a.box[0],
        "above": a.box[3] <= b.box[1],
        "below": b.box[3] <= a.box[1],
    }[words]


Oracle = Callable[[re.Match, tuple[SceneObject, ...]], str]
# Each conversation question form, and its answer worked out here from the scene itself.
ORACLES: list[tuple[str, Oracle]] = [
    (r"How many (?:objects|shapes) (?:are there|are in the image)\?", lambda m, objs: _short(number_word(len(objs)))),
    (
        r"How many (circle|square|triangle)s (?:are there|are in the image)\?",
        lambda m, objs: _short(number_word(sum(o.shape == m[1] for o in objs))),
    ),
    (r"(?:What colour is|What is the colour of) the (.+)\?", lambda m, objs: _short(_referent(m[1], objs).colour)),
    (
        r"(?:Is there a|Can you see a|Does the picture contain a) (.+?)(?: in the image)?\?",
        lambda m, objs: "Yes." if any(set(m[1].split()) <= {o.size, o.colour, o.shape} for o in objs) else "No.",
    ),
    (
        r"(?:Where is|In which part of the image is) the (.+)\?",
        lambda m, objs: _short(quadrant(_referent(m[1], objs).box)),
    ),
    (r"Is the (.+) (?:large or small|small or large)\?", lambda m, objs: _short(_referent(m[1], objs).size)),
    (
        r"Which is larger, the (.+) or the (.+)\?",
        lambda m, objs: _larger(_referent(m[1], objs), _referent(m[2], objs), m[1], m[2]),
    ),
    (
        r"Is the (.+) (to the left of|to the right of|above|below) the (.+)\?",
        lambda m, objs: "Yes." if _relation_holds(_referent(m[1], objs), _referent(m[3], objs), m[2]) else "No.",
    ),
]


def _expected_answer(question: str, objects: tuple[SceneObject, ...]) -> str:
    for pattern, oracle in ORACLES:
        match = re.fullmatch(pattern, question)
        if match:
            return oracle(match, objects)
    raise AssertionError(f"question form not recognised: {question!r}")


def _question(turn: dict) -> str:
    return turn["value"].replace(IMAGE_PLACEHOLDER, "").strip()


def test_teachers_are_registered_subclasses_of_teacher() -> None:
    assert TEACHERS.get("caption") is mmkit.datagen.caption.CaptionTeacher
    assert TEACHERS.get("rules") is mmkit.datagen.rules.RulesTeacher
    assert all(issubclass(TEACHERS.get(name), Teacher) for name in ("caption", "rules"))


@pytest.mark.parametrize("name", ["caption", "rules"])
def test_image_placeholder_once_at_start_or_end_of_first_turn(name: str) -> None:
    teacher = TEACHERS.get(name)()
    placements = Counter()
    for index, (_, view) in enumerate(_views()):
        for _, turns in teacher.write(view, random.Random(index)):
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and turns
            first = turns[0]["value"]
            assert first.count(IMAGE_PLACEHOLDER) == 1
            assert first.startswith(IMAGE_PLACEHOLDER + "\n") or first.endswith("\n" + IMAGE_PLACEHOLDER)
            placements[first.startswith(IMAGE_PLACEHOLDER)] += 1
            assert not any(IMAGE_PLACEHOLDER in t["value"] for t in turns[1:])
    assert placements[True] > 0 and placements[False] > 0


def test_caption_teacher_answers_a_brief_instruction_with_a_caption() -> None:
    teacher = mmkit.datagen.caption.CaptionTeacher()
    for index, (_, view) in enumerate(_views()[:50]):
        ((_, turns),) = teacher.write(view, random.Random(index))
        assert len(turns) == 2
        assert _question(turns[0]) in mmkit.datagen.caption.BRIEF_INSTRUCTIONS
        assert turns[1]["value"] in view["captions"]
    assert len(mmkit.datagen.caption.BRIEF_INSTRUCTIONS) >= 10


def test_every_conversation_answer_matches_the_scene() -> None:
    teacher = mmkit.datagen.rules.RulesTeacher(turns=4, types=("conversation",))
    kinds_seen = Counter()
    for index, (objects, view) in enumerate(_views()):
        ((_, turns),) = teacher.write(view, random.Random(index))
        assert len(turns) == 8
        for human, gpt in zip(turns[::2], turns[1::2]):
            question = _question(human)
            assert gpt["value"] == _expected_answer(question, objects), question
            kinds_seen[question.split()[0]] += 1
    assert set(kinds_seen) >= {"How", "What", "Is", "Where", "Which"}


@pytest.mark.parametrize("kind", ["existence", "relation"])
def test_yes_no_questions_are_balanced(kind: str) -> None:
    rng = random.Random(0)
    answers = Counter()
    for objects, _ in _views():
        qa = mmkit.datagen.rules.ask(kind, objects, rng)
        if qa is not None:
            assert qa.answer == _expected_answer(qa.question, objects)
            answers[qa.answer] += 1
    assert set(answers) == {"Yes.", "No."}
    assert 0.4 < answers["Yes."] / sum(answers.values()) < 0.6


def test_answers_come_from_the_view_alone() -> None:
    # A hand-written view, no Scene behind it: a large red circle top left, a small blue square bottom right.
    view = {
        "captions": ["A large red circle and a small blue square."] * 5,
        "objects": [
            {"category": "red circle", "bbox": [0.05, 0.05, 0.41, 0.41]},
            {"category": "blue square", "bbox": [0.6, 0.6, 0.78, 0.78]},
        ],
    }
    ((kind, detailed),) = mmkit.datagen.rules.RulesTeacher(types=("detailed",)).write(view, random.Random(0))
    assert kind == "detailed"
    assert detailed[1]["value"] == (
        "The image shows two objects. In the top left there is a large red circle. "
        "In the bottom right there is a small blue square."
    )


def test_detailed_description_names_every_object_and_position() -> None:
    teacher = mmkit.datagen.rules.RulesTeacher(types=("detailed",))
    for index, (objects, view) in enumerate(_views()):
        ((_, turns),) = teacher.write(view, random.Random(index))
        assert _question(turns[0]) in mmkit.datagen.rules.DETAILED_INSTRUCTIONS
        description = turns[1]["value"]
        assert description.startswith(f"The image shows {number_word(len(objects))} object")
        for obj in objects:
            assert f"In the {quadrant(obj.box)} there is a {describe(obj)}." in description


def _check_reasoning(question: str, answer: str, objects: tuple[SceneObject, ...]) -> None:
    if match := re.fullmatch(r"How many objects are (\w+) or (\w+)\?", question):
        count = sum(o.colour in (match[1], match[2]) for o in objects)
        assert answer.endswith(f", so the answer is {number_word(count)}.")
    elif match := re.fullmatch(r"Are there more (\w+)s than (\w+)s\?", question):
        more = sum(o.shape == match[1] for o in objects) > sum(o.shape == match[2] for o in objects)
        assert answer.endswith(f", so the answer is {'yes' if more else 'no'}.")
    elif match := re.fullmatch(r"Which objects are in the (\w+) half of the image\?", question):
        conclusion = answer.rsplit(", so ", 1)[1]
        named = {describe(o) for o in objects if describe(o) in conclusion}
        assert named == {describe(o) for o in objects if match[1] in quadrant(o.box)}
    else:
        raise AssertionError(f"reasoning question not recognised: {question!r}")


def test_reasoning_answers_state_the_facts_and_the_right_conclusion() -> None:
    teacher = mmkit.datagen.rules.RulesTeacher(types=("reasoning",))
    forms = set()
    for index, (objects, view) in enumerate(_views()):
        ((_, turns),) = teacher.write(view, random.Random(index))
        question, answer = _question(turns[0]), turns[1]["value"]
        _check_reasoning(question, answer, objects)
        forms.add(question.split()[0])
    assert forms == {"How", "Are", "Which"}


def test_rules_teacher_options() -> None:
    _, view = _views()[0]
    written = mmkit.datagen.rules.RulesTeacher().write(view, random.Random(0))
    assert [w.type for w in written] == ["conversation", "detailed", "reasoning"]
    assert len(written[0].conversation) == 6
    # Types as a comma-separated string (how a command-line option gives them), in any order.
    reordered = mmkit.datagen.rules.RulesTeacher(types="reasoning,detailed").write(view, random.Random(0))
    assert [w.type for w in reordered] == ["reasoning", "detailed"]
    with pytest.raises(ConfigError, match="turns"):
        mmkit.datagen.rules.RulesTeacher(turns=0)
    with pytest.raises(ConfigError, match="types"):
        mmkit.datagen.rules.RulesTeacher(types=("conversation", "poetry"))


def test_written_llava_folder(tmp_path: Path) -> None:
    path = write_llava_dataset(tmp_path / "a", "val", 12, seed=4, teacher="rules", resolution=48, progress=False)
    assert path == tmp_path / "a" / "val.json"
    records = json.loads(path.read_text())
    assert len(records) == 12 * 3
    assert len({r["id"] for r in records}) == len(records)
    for record in records:
        assert set(record) == {"id", "image", "conversations"}
        assert record["id"].startswith(record["image"].removesuffix(".png"))
        with Image.open(tmp_path / "a" / "images" / record["image"]) as image:
            assert image.size == (48, 48) and image.mode == "RGB"
        assert all(set(turn) == {"from", "value"} for turn in record["conversations"])
    # Same arguments, same bytes.
    again = write_llava_dataset(tmp_path / "b", "val", 12, seed=4, teacher="rules", resolution=48, progress=False)
    assert again.read_text() == path.read_text()
    first_image = Path("images") / records[0]["image"]
    assert (tmp_path / "a" / first_image).read_bytes() == (tmp_path / "b" / first_image).read_bytes()


def test_written_caption_data_and_teacher_options(tmp_path: Path) -> None:
    captions = json.loads(write_llava_dataset(tmp_path, "train", 8, 0, "caption", progress=False).read_text())
    assert len(captions) == 8 and len(captions[0]["conversations"]) == 2
    detailed = write_llava_dataset(
        tmp_path / "d", "train", 8, 0, "rules", teacher_options={"types": ["detailed"]}, progress=False
    )
    assert len(json.loads(detailed.read_text())) == 8
    with pytest.raises(ConfigError, match="teacher='gpt5'"):
        write_llava_dataset(tmp_path, "train", 1, 0, "gpt5", progress=False)


def test_text_corpus_is_plain_deterministic_text() -> None:
    lines = write_text_corpus(20, seed=1)
    assert lines == write_text_corpus(20, seed=1)
    assert lines and all(line and "\n" not in line and IMAGE_PLACEHOLDER not in line for line in lines)
    scene = generate_scenes("train", 1, seed=1)[0]
    assert all(describe(o) in " ".join(lines) for o in scene.objects)
    assert any(line.startswith("How many") for line in lines)
