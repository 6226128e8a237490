"""The quality figures of written instruction data: the hallucination proxy's rules, duplicates,
answer lengths per response type, and the report files written beside the data."""
from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
from PIL import Image

from mmkit.datagen.quality import Reviewed, assess, summary_lines, write_quality_report

VOCABULARY = ["person", "bench", "giraffe", "dog", "hot dog", "fire hydrant", "cat", "knife", "bus"]


def _reviewed(answer: str | list[str], *, labels: Sequence[str] = ("bench", "person"), captions: Sequence[str] = (),
              id: str = "a", type: str = "conversation", question: str = "<image>\nWhat is in the picture?") -> Reviewed:
    answers = [answer] if isinstance(answer, str) else answer
    turns = []
    for index, text in enumerate(answers):
        turns += [{"from": "human", "value": question if index == 0 else "And?"}, {"from": "gpt", "value": text}]
    return Reviewed(id=id, type=type, turns=turns, captions=list(captions), labels=list(labels))


def _flagged(conversation: Reviewed) -> list[dict]:
    return assess([conversation], VOCABULARY)["hallucination"]["examples"]


def test_an_object_the_teacher_was_not_shown_is_flagged():
    report = assess([_reviewed("There is a giraffe next to the bench. A person sits on it.")], VOCABULARY)
    hallucination = report["hallucination"]
    assert hallucination["flagged"] == 1 and hallucination["share"] == 1.0
    assert hallucination["examples"] == [{"id": "a", "type": "conversation", "absent": ["giraffe"],
                                          "sentence": "There is a giraffe next to the bench."}]


def test_the_first_offending_sentence_is_kept_and_every_absent_name_listed_once():
    examples = _flagged(_reviewed(["The bench is wooden.", "A Giraffe stands by a cat. The giraffe eats.",
                                   "Two dogs run."]))
    assert examples[0]["absent"] == ["giraffe", "cat", "dog"]
    assert examples[0]["sentence"] == "A Giraffe stands by a cat."


@pytest.mark.parametrize("answer", [
    "No, there is no giraffe in the image.",
    "There isn't a giraffe here.",
    "The bench stands without any giraffe nearby.",
    "Neither a giraffe nor a cat is visible.",
])
def test_a_mention_in_a_negated_sentence_is_not_counted(answer):
    assert _flagged(_reviewed(answer)) == []


def test_a_negation_only_excuses_its_own_sentence():
    examples = _flagged(_reviewed("No, there is no cat. A giraffe stands behind the bench."))
    assert [example["absent"] for example in examples] == [["giraffe"]]


@pytest.mark.parametrize("answer, labels", [
    ("Two dogs play near the bench.", ["dog", "bench"]),
    ("Three buses are parked.", ["bus"]),
    ("Some people sit on the bench.", ["person", "bench"]),
    ("A knife lies on the table.", ["knives"]),
    ("Two fire hydrants stand on the corner.", ["Fire Hydrant"]),
    ("The DOG barks.", ["dog"]),
])
def test_singular_plural_and_case_forms_count_as_present(answer, labels):
    assert _flagged(_reviewed(answer, labels=labels)) == []


def test_names_match_whole_words_only():
    assert _flagged(_reviewed("A category of catalogues sits on the bench; dogged persistence.")) == []


def test_a_hot_dog_is_no_mention_of_a_dog():
    assert _flagged(_reviewed("A person holds a hot dog on the bench.", labels=["person", "hot dog", "bench"])) == []
    # ... while a dog beside it is one, and a hot dog label does not vouch for it.
    examples = _flagged(_reviewed("A dog eyes the hot dogs.", labels=["hot dog"]))
    assert examples[0]["absent"] == ["dog"]


def test_a_name_in_the_captions_counts_as_present():
    answer = "A giraffe walks past the bench."
    assert _flagged(_reviewed(answer, captions=["Giraffes walk by a park bench."])) == []
    # A caption's "hot dog" names no dog.
    examples = _flagged(_reviewed("A dog sits on the bench.", captions=["A hot dog on a bench."]))
    assert examples[0]["absent"] == ["dog"]


def test_only_assistant_turns_are_checked():
    conversation = _reviewed("There is a bench.", question="<image>\nIs there a giraffe on the bench?")
    assert _flagged(conversation) == []


def test_shares_by_type():
    conversations = [_reviewed("A giraffe.", id="1", type="detailed"), _reviewed("A bench.", id="2", type="detailed"),
                     _reviewed("A person.", id="3", type="reasoning")]
    hallucination = assess(conversations, VOCABULARY)["hallucination"]
    assert hallucination["flagged"] == 1 and hallucination["share"] == 0.3333
    assert hallucination["by_type"] == {"detailed": 0.5, "reasoning": 0.0}


def test_flagged_examples_are_capped_at_twenty():
    conversations = [_reviewed("A giraffe.", id=str(k)) for k in range(25)]
    hallucination = assess(conversations, VOCABULARY)["hallucination"]
    assert hallucination["flagged"] == 25 and len(hallucination["examples"]) == 20


def test_duplicate_conversations_and_answers_are_counted():
    conversations = [
        _reviewed(["A bench.", "A person."], id="first"),
        # The same once normalised: case, whitespace and the image placeholder do not matter.
        _reviewed(["a  BENCH.", "A person."], id="again", question="What is in the picture?  <image>"),
        _reviewed(["A bench.", "Nothing else."], id="other"),
    ]
    duplicates = assess(conversations, VOCABULARY)["duplicates"]
    assert duplicates["conversations"] == 1
    assert duplicates["examples"] == [{"id": "again", "same_as": "first"}]
    # "A bench." twice again, "A person." once again.
    assert duplicates["answers"] == 3


def test_lengths_by_type_on_a_hand_made_set():
    conversations = [
        _reviewed(["one two", "three"], type="conversation"),                    # 3 words, 2 pairs
        _reviewed("one two three four five six seven", type="conversation"),    # 7 words, 1 pair
        _reviewed("one", type="conversation"),                                  # 1 word, 1 pair
        _reviewed("a b c d e f g h i j", type="detailed"),                      # 10 words
    ]
    report = assess(conversations, VOCABULARY)
    assert report["conversations"] == 4
    conversation = report["by_type"]["conversation"]
    assert conversation["count"] == 3
    assert (conversation["words_min"], conversation["words_median"], conversation["words_max"]) == (1.0, 3.0, 7.0)
    assert conversation["words_p90"] == 6.2     # 3 + 0.8 * (7 - 3)
    assert conversation["words_mean"] == 3.7    # 11 / 3
    assert conversation["pairs_mean"] == 1.33
    assert sum(conversation["words_histogram"]["counts"]) == 3
    detailed = report["by_type"]["detailed"]
    assert (detailed["count"], detailed["words_median"], detailed["pairs_mean"]) == (1, 10.0, 1.0)
    assert list(report["by_type"]) == ["conversation", "detailed"]


def test_empty_input_gives_zero_counts():
    report = assess([], VOCABULARY)
    assert report["conversations"] == 0 and report["by_type"] == {}
    assert report["hallucination"]["flagged"] == 0 and report["hallucination"]["share"] == 0.0
    assert report["hallucination"]["examples"] == []
    assert report["duplicates"] == {"conversations": 0, "answers": 0, "examples": []}
    assert summary_lines(report)[0] == "quality: 0 conversations"


def test_write_quality_report_writes_the_three_files(tmp_path):
    conversations = [_reviewed("A giraffe stands by the bench.", id="g", type="conversation"),
                     _reviewed("A person sits on the bench in the park.", id="p", type="detailed"),
                     _reviewed("A person sits on the bench in the park.", id="q", type="detailed"),
                     _reviewed("Because the bench is empty, nobody sits.", id="r", type="reasoning")]
    report = assess(conversations, VOCABULARY)
    paths = write_quality_report(tmp_path / "out", report)
    assert [path.name for path in paths] == ["quality.json", "quality.md", "quality.png"]
    assert json.loads(paths[0].read_text()) == report
    markdown = paths[1].read_text()
    assert markdown.startswith("# ") and "proxy" in markdown
    assert "| reasoning |" in markdown and "`g` (conversation): giraffe" in markdown
    with Image.open(paths[2]) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0
    # Nothing but the three files: no temporary left behind.
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["quality.json", "quality.md", "quality.png"]


def test_an_empty_report_is_written_too(tmp_path):
    paths = write_quality_report(tmp_path, assess([], VOCABULARY))
    assert json.loads(paths[0].read_text())["conversations"] == 0
    with Image.open(paths[2]) as image:
        assert image.width > 0 and image.height > 0


def test_summary_lines_name_the_figures():
    conversations = [_reviewed("A giraffe.", id="1", type="detailed"), _reviewed("A giraffe.", id="2", type="detailed"),
                     _reviewed("A bench.", id="3", type="reasoning"), _reviewed("A bench here.", id="4")]
    lines = summary_lines(assess(conversations, VOCABULARY))
    assert lines[0] == "quality: 4 conversations"
    assert "50.00%" in lines[1] and "(2)" in lines[1]
    assert lines[2].endswith("duplicates: conversations 1, assistant answers 1")
    assert "conversation 3" in lines[3] and "detailed 2" in lines[3] and "reasoning 2" in lines[3]
