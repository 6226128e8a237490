"""The synthetic evaluator: questions with exact answers, scoring, and the blind baseline."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from mmkit.core.errors import DataError
from mmkit.evaluation.answers import ANSWER_FILE, read_answers
from mmkit.evaluation.run import run_task
from mmkit.evaluation.synthetic import SyntheticEvaluator, normalise
from mmkit.synth.world import render


class ScriptedGenerator:
    """Stands in for a model: answers each prompt with a function of the question it was asked."""

    def __init__(self, evaluator: SyntheticEvaluator, answer_for, batch_size: int = 16):
        # Prompts are identified by their text and image pixels: what a model sees.
        self.by_prompt = {
            (f"<image>\n{q.question}", render(q.scene, evaluator.resolution).tobytes()): q for q in evaluator.questions()
        }
        self.answer_for = answer_for
        self.batch_size = batch_size
        self.asked = 0

    def answer_batches(self, prompts, progress=True, desc=""):
        for start in range(0, len(prompts), self.batch_size):
            batch = slice(start, min(start + self.batch_size, len(prompts)))
            self.asked += batch.stop - batch.start
            yield batch, [self.answer_for(self.by_prompt[(p.text, p.image.tobytes())]) for p in prompts[batch]]


def evaluate(evaluator, generator, out_dir):
    return run_task("synthetic", evaluator, out_dir, generator=generator)


@pytest.fixture(scope="module")
def evaluator():
    return SyntheticEvaluator(count=30, baseline_scenes=300)


def test_normalise_ignores_case_punctuation_and_spacing():
    assert normalise("  Top  Left.\n") == normalise("top left") == "top left"
    assert normalise("Two.") != normalise("Three.")


def test_questions_come_from_held_out_scenes_with_every_type(evaluator):
    questions = evaluator.questions()
    assert {q.scene.scene_id.split("-")[0] for q in questions} == {"test"}
    assert set(Counter(q.kind for q in questions)) == set(evaluator.kinds)


def test_an_oracle_scores_100(evaluator, tmp_path):
    oracle = ScriptedGenerator(evaluator, lambda question: question.answer)
    result = evaluate(evaluator, oracle, tmp_path)
    assert result.metrics["acc"] == 100.0 and all(p["correct"] for p in result.predictions)
    assert oracle.asked == len(evaluator.questions()) == len(result.predictions)
    assert json.loads((tmp_path / "results.json").read_text()) == result.metrics
    assert (tmp_path / "table.md").read_text().strip() == result.table


def test_wrong_answers_score_zero(evaluator, tmp_path):
    result = evaluate(evaluator, ScriptedGenerator(evaluator, lambda question: "I do not know."), tmp_path)
    assert result.metrics["acc"] == 0.0


class Crash(Exception):
    pass


def test_an_interrupted_evaluation_resumes_without_asking_again(evaluator, tmp_path):
    calls = {"n": 0}

    def crash_on_third_batch(question):
        calls["n"] += 1
        if calls["n"] > 2 * 16:
            raise Crash
        return question.answer

    with pytest.raises(Crash):
        evaluate(evaluator, ScriptedGenerator(evaluator, crash_on_third_batch), tmp_path)
    lines = (tmp_path / ANSWER_FILE).read_text().splitlines()
    assert len(lines) == 32 and set(json.loads(lines[0])) == {"question_id", "prompt", "text"}
    # A crash in the middle of a write leaves a torn last line; resuming drops it and re-asks that item.
    with open(tmp_path / ANSWER_FILE, "a") as handle:
        handle.write('{"question_id": "torn')
    resumed = ScriptedGenerator(evaluator, lambda question: question.answer)
    result = evaluate(evaluator, resumed, tmp_path)
    assert resumed.asked == len(evaluator.questions()) - 32
    assert result.metrics["acc"] == 100.0
    assert len(read_answers(tmp_path / ANSWER_FILE)) == len(evaluator.questions())


def test_an_existing_answer_file_is_scored_without_a_model(evaluator, tmp_path):
    items = evaluator.items()
    answers = tmp_path / "other_system.jsonl"
    # Every other item answered correctly, the rest missing: missing answers count as wrong.
    answers.write_text("".join(
        json.dumps({"question_id": item.question_id, "prompt": item.prompt.text, "text": item.reference.answer}) + "\n"
        for item in items[::2]
    ))
    result = run_task("synthetic", evaluator, tmp_path / "out", predictions=answers)
    assert result.metrics["acc"] == round(100 * len(items[::2]) / len(items), 2)
    answers.write_text("not json\n")
    with pytest.raises(DataError, match="other_system.jsonl:1"):
        run_task("synthetic", evaluator, tmp_path / "out", predictions=answers)


def test_answering_the_training_majority_scores_exactly_the_blind_baseline(evaluator, tmp_path):
    blind = evaluator.blind_answers()
    assert set(blind) == set(evaluator.kinds)
    assert blind["existence"] in ("yes", "no") and blind["relation"] in ("yes", "no")
    result = evaluate(evaluator, ScriptedGenerator(evaluator, lambda question: blind[question.kind]), tmp_path)
    for kind in evaluator.kinds:
        assert result.metrics[f"acc_{kind}"] == result.metrics[f"blind_acc_{kind}"]
    assert "| overall |" in result.table and "| colour |" in result.table
