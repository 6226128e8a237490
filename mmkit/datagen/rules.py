"""The offline default teacher: instruction data written by rules from the symbolic view.

It writes LLaVA's three response types about the synthetic world:

- ``conversation``: several questions with short, definite answers (``"Red."``, ``"Two."``,
  ``"Yes."``, ``"Top left."``), always worded the same way so a small model can learn them;
- ``detailed``: a description naming every object's size, colour, shape and position;
- ``reasoning``: a question that needs several facts, answered with the facts and then
  ``"so the answer is ..."``.

Every answer follows from the captions' objects and boxes alone (sizes and positions are read
off the boxes), so it is exactly right for the scene.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from mmkit.core.errors import ConfigError
from mmkit.core.registry import TEACHERS
from mmkit.datagen.teacher import RESPONSE_TYPES, Teacher, Written, conversation, response_types
from mmkit.synth.world import (
    COLOURS,
    SHAPES,
    SceneObject,
    all_descriptions,
    attribute_values,
    capitalise,
    describe,
    horizontal_relation,
    join_words,
    number_word,
    objects_from_view,
    plural,
    quadrant,
    reading_order,
    referring_phrase,
    vertical_relation,
)

# Ways to name one object in a question, shortest first; a question about an attribute must not
# name that attribute, or it would give its own answer away.
_ANY_ATTRIBUTE = (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"))
_WITHOUT_COLOUR = (("shape",), ("size", "shape"))
_WITHOUT_SIZE = (("shape",), ("colour", "shape"))

_RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
_OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

DETAILED_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the image in detail.",
    "Give a thorough description of everything in this picture.",
    "What can you see in the image? Describe each object.",
    "Explain in detail what the picture shows.",
    "Walk me through the contents of this image.",
    "Describe every object in the picture and where it is.",
)


@dataclass(frozen=True)
class QuestionAnswer:
    kind: str  # one of QUESTION_KINDS
    question: str
    answer: str


def _short(word: str) -> str:
    return f"{capitalise(word)}."


def _counted(noun: str, count: int) -> str:
    return f"{number_word(count)} {plural(noun, count)}"


def _yes_no(truth: bool) -> str:
    return "Yes." if truth else "No."


def _named(objects: Sequence[SceneObject], attribute_sets: Sequence[Sequence[str]]) -> list[tuple[SceneObject, str]]:
    """The objects that ``attribute_sets`` can single out, each with its referring phrase."""
    named = [(o, referring_phrase(o, objects, attribute_sets)) for o in objects]
    return [(o, phrase) for o, phrase in named if phrase is not None]


# ---------------------------------------------------------------------------------------------
# Conversation questions: each asker returns None when the scene cannot support its question.


def _ask_colour(objects: Sequence[SceneObject], rng: random.Random) -> QuestionAnswer | None:
    named = _named(objects, _WITHOUT_COLOUR)
    if not named:
        return None
    obj, phrase = rng.choice(named)
    question = rng.choice(("What colour is the {}?", "What is the colour of the {}?")).format(phrase)
    return QuestionAnswer("colour", question, _short(obj.colour))


def _ask_count(objects: Sequence[SceneObject], rng: random.Random) -> QuestionAnswer:
    if rng.random() < 0.5:
        question = rng.choice(("How many objects are there?", "How many shapes are in the image?"))
        return QuestionAnswer("count", question, _short(number_word(len(objects))))
    shape = rng.choice(SHAPES)
    question = rng.choice(("How many {}s are there?", "How many {}s are in the image?")).format(shape)
    return QuestionAnswer("count", question, _short(number_word(sum(o.shape == shape for o in objects))))


def _ask_existence(objects: Sequence[SceneObject], rng: random.Random) -> QuestionAnswer:
    """Half the time about an object in the scene (yes), half about one that is not (no);
    half of the absent ones differ from a present object in one attribute only."""
    attributes = rng.choice((("colour", "shape"), ("size", "colour", "shape")))
    present = {attribute_values(o, attributes) for o in objects}
    if rng.random() < 0.5:
        asked = attribute_values(rng.choice(objects), attributes)
    else:
        absent = [d for d in all_descriptions(attributes) if d not in present]
        near_misses = [d for d in absent if any(_differ_in_one(d, p) for p in present)]
        asked = rng.choice(near_misses if near_misses and rng.random() < 0.5 else absent)
    wording = rng.choice(("Is there a {} in the image?", "Can you see a {}?", "Does the picture contain a {}?"))
    return QuestionAnswer("existence", wording.format(" ".join(asked)), _yes_no(asked in present))


def _differ_in_one(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    return sum(x != y for x, y in zip(a, b)) == 1


def _ask_position(objects: Sequence[SceneObject], rng: random.Random) -> QuestionAnswer | None:
    named = _named(objects, _ANY_ATTRIBUTE)
    if not named:
        return None
    obj, phrase = rng.choice(named)
    question = rng.choice(("Where is the {}?", "In which part of the image is the {}?")).format(phrase)
    return QuestionAnswer("position", question, _short(quadrant(obj.box)))


def _ask_size(objects: Sequence[SceneObject], rng: random.Random) -> QuestionAnswer | None:
    named = _named(objects, _WITHOUT_SIZE)
    if not named:
        return None
    if len(named) < 2 or rng.random() < 0.5:
        obj, phrase = rng.choice(named)
        question = rng.choice(("Is the {} large or small?", "Is the {} small or large?")).format(phrase)
        return QuestionAnswer("size", question, _short(obj.size))
    (a, a_phrase), (b, b_phrase) = rng.sample(named, 2)
    question = f"Which is larger, the {a_phrase} or the {b_phrase}?"
    if a.size == b.size:
        return QuestionAnswer("size", question, "They are the same size.")
    larger_phrase = a_phrase if a.size == "large" else b_phrase
    return QuestionAnswer("size", question, f"The {larger_phrase}.")


def statements(objects: Sequence[SceneObject], rng: random.Random) -> list[str]:
    """Each object's colour, place and size as sentences that name it the way the questions do
    and end on the attribute ("The small triangle is yellow."), shuffled. Read after the caption,
    every attribute is a lookup whose answer comes right after the object's name: the form in
    which a small LM learns to match a name against the caption before it learns to carry the
    name from a question to the answer (experiments/lm_lookup.md, session 15)."""
    said = [f"The {phrase} is {obj.colour}." for obj, phrase in _named(objects, _WITHOUT_COLOUR)]
    said += [f"The {phrase} is in the {quadrant(obj.box)}." for obj, phrase in _named(objects, _ANY_ATTRIBUTE)]
    said += [f"The {phrase} is {obj.size}." for obj, phrase in _named(objects, _WITHOUT_SIZE)]
    rng.shuffle(said)
    return said


def _ask_relation(objects: Sequence[SceneObject], rng: random.Random) -> QuestionAnswer | None:
    """Is A left of / right of / above / below B, for a pair that is clearly apart on that axis;
    asked half the time about the true relation and half about its opposite."""
    named = _named(objects, _ANY_ATTRIBUTE)
    facts = [
        (a_phrase, relation, b_phrase)
        for (a, a_phrase), (b, b_phrase) in itertools.permutations(named, 2)
        for relation in (horizontal_relation(a.box, b.box), vertical_relation(a.box, b.box))
        if relation is not None
    ]
    if not facts:
        return None
    a_phrase, relation, b_phrase = rng.choice(facts)
    asked = relation if rng.random() < 0.5 else _OPPOSITE_RELATION[relation]
    question = f"Is the {a_phrase} {_RELATION_WORDS[asked]} the {b_phrase}?"
    return QuestionAnswer("relation", question, _yes_no(asked == relation))


_ASKERS: dict[str, Callable[[Sequence[SceneObject], random.Random], QuestionAnswer | None]] = {
    "colour": _ask_colour,
    "count": _ask_count,
    "existence": _ask_existence,
    "position": _ask_position,
    "size": _ask_size,
    "relation": _ask_relation,
}
QUESTION_KINDS: tuple[str, ...] = tuple(_ASKERS)


def ask(kind: str, objects: Sequence[SceneObject], rng: random.Random) -> QuestionAnswer | None:
    """A question of ``kind`` about ``objects`` with its exact short answer, or None when the
    scene cannot support one (e.g. no object is singled out by its shape)."""
    if kind not in _ASKERS:
        raise ConfigError(f"question kind {kind!r} is unknown; choose from {', '.join(QUESTION_KINDS)}")
    return _ASKERS[kind](objects, rng)


# ---------------------------------------------------------------------------------------------
# Detailed description


def detailed_description(objects: Sequence[SceneObject]) -> str:
    """Count first, then one sentence per object in reading order: always the same form."""
    sentences = [f"The image shows {_counted('object', len(objects))}."]
    sentences += [f"In the {quadrant(o.box)} there is a {describe(o)}." for o in reading_order(objects)]
    return " ".join(sentences)


# ---------------------------------------------------------------------------------------------
# Reasoning: questions that combine facts, answered step by step.


def _placed(obj: SceneObject) -> str:
    return f"the {describe(obj)} in the {quadrant(obj.box)}"


def _reason_colour_count(objects: Sequence[SceneObject], rng: random.Random) -> tuple[str, str]:
    # One colour is taken from the scene so that the count is rarely zero.
    first = rng.choice([o.colour for o in objects])
    second = rng.choice([c for c in COLOURS if c != first])
    either = f"{first} or {second}"
    matching = [o for o in reading_order(objects) if o.colour in (first, second)]
    if len(matching) == 1:
        reason = f"The only object that is {either} is {_placed(matching[0])}"
    else:
        reason = f"The objects that are {either} are {join_words([_placed(o) for o in matching])}"
    question = f"How many objects are {either}?"
    return question, f"{reason}, so the answer is {number_word(len(matching))}."


def _reason_shape_comparison(objects: Sequence[SceneObject], rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(SHAPES, 2)
    first_count = sum(o.shape == first for o in objects)
    second_count = sum(o.shape == second for o in objects)
    verb = "is" if first_count == 1 else "are"
    counts = f"{_counted(first, first_count)} and {_counted(second, second_count)}"
    more = first_count > second_count
    comparison = f"{number_word(first_count)} is {'' if more else 'not '}more than {number_word(second_count)}"
    answer = f"There {verb} {counts}. {capitalise(comparison)}, so the answer is {'yes' if more else 'no'}."
    return f"Are there more {first}s than {second}s?", answer


def _reason_half(objects: Sequence[SceneObject], rng: random.Random) -> tuple[str, str]:
    half = rng.choice(("top", "bottom", "left", "right"))
    ordered = reading_order(objects)
    inside = [o for o in ordered if half in quadrant(o.box).split()]
    facts = join_words([f"the {describe(o)} is in the {quadrant(o.box)}" for o in ordered])
    if not inside:
        conclusion = f"no object is in the {half} half"
    elif len(inside) == 1:
        conclusion = f"the only object in the {half} half is the {describe(inside[0])}"
    else:
        conclusion = f"the objects in the {half} half are {join_words([f'the {describe(o)}' for o in inside])}"
    return f"Which objects are in the {half} half of the image?", f"{capitalise(facts)}, so {conclusion}."


_REASONERS: tuple[Callable[[Sequence[SceneObject], random.Random], tuple[str, str]], ...] = (
    _reason_colour_count,
    _reason_shape_comparison,
    _reason_half,
)


# ---------------------------------------------------------------------------------------------


@TEACHERS.register("rules")
class RulesTeacher(Teacher):
    """One conversation per response type in ``types`` (a list, or a comma-separated string);
    ``turns`` questions in a conversation."""

    def __init__(self, turns: int = 3, types: Sequence[str] = RESPONSE_TYPES) -> None:
        if int(turns) < 1:
            raise ConfigError(f"turns={turns!r}: a conversation needs at least one question")
        self.turns = int(turns)
        self.types = response_types(types)

    def write(self, scene_view: dict[str, Any], rng: random.Random) -> list[Written]:
        objects = objects_from_view(scene_view)
        writers = {
            "conversation": self._conversation,
            "detailed": self._detailed,
            "reasoning": self._reasoning,
        }
        return [Written(kind, conversation(writers[kind](objects, rng), rng)) for kind in self.types]

    def _conversation(self, objects: Sequence[SceneObject], rng: random.Random) -> list[tuple[str, str]]:
        """``turns`` distinct questions (fewer only if the scene runs out of them); kinds go round
        in a shuffled order, so a conversation repeats a kind only once it has had them all."""
        pairs: list[tuple[str, str]] = []
        asked: set[str] = set()
        kinds = itertools.cycle(rng.sample(QUESTION_KINDS, len(QUESTION_KINDS)))
        for kind in itertools.islice(kinds, 10 * self.turns):
            qa = ask(kind, objects, rng)
            if qa is not None and qa.question not in asked:
                asked.add(qa.question)
                pairs.append((qa.question, qa.answer))
            if len(pairs) == self.turns:
                break
        return pairs

    def _detailed(self, objects: Sequence[SceneObject], rng: random.Random) -> list[tuple[str, str]]:
        return [(rng.choice(DETAILED_INSTRUCTIONS), detailed_description(objects))]

    def _reasoning(self, objects: Sequence[SceneObject], rng: random.Random) -> list[tuple[str, str]]:
        return [rng.choice(_REASONERS)(objects, rng)]
