"""The synthetic evaluator: questions with exact answers, scoring, and the blind baseline."""
from __future__ import annotations

from collections import Counter

import pytest

from mmkit.evaluation.synthetic import SyntheticEvaluator, normalise
from mmkit.synth.world import render


class ScriptedGenerator:
    """Stands in for a model: answers each prompt with a function of the question it was asked."""

    def __init__(self, evaluator: SyntheticEvaluator, answer_for):
        # Prompts are identified by their text and image pixels: what a model sees.
        self.by_prompt = {
            (f"<image>\n{q.question}", render(q.scene, evaluator.resolution).tobytes()): q for q in evaluator.questions()
        }
        self.answer_for = answer_for
        self.asked = 0

    def answer(self, prompts, progress=True, desc=""):
        self.asked += len(prompts)
        return [self.answer_for(self.by_prompt[(p.conversation[0]["value"], p.image.tobytes())]) for p in prompts]


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


def test_an_oracle_scores_100(evaluator):
    oracle = ScriptedGenerator(evaluator, lambda question: question.answer)
    result = evaluator.evaluate(oracle)
    assert result.metrics["acc"] == 100.0 and all(p["correct"] for p in result.predictions)
    assert oracle.asked == len(evaluator.questions()) == len(result.predictions)


def test_wrong_answers_score_zero(evaluator):
    result = evaluator.evaluate(ScriptedGenerator(evaluator, lambda question: "I do not know."))
    assert result.metrics["acc"] == 0.0


def test_answering_the_training_majority_scores_exactly_the_blind_baseline(evaluator):
    blind = evaluator.blind_answers()
    assert set(blind) == set(evaluator.kinds)
    assert blind["existence"] in ("yes", "no") and blind["relation"] in ("yes", "no")
    result = evaluator.evaluate(ScriptedGenerator(evaluator, lambda question: blind[question.kind]))
    for kind in evaluator.kinds:
        assert result.metrics[f"acc_{kind}"] == result.metrics[f"blind_acc_{kind}"]
    assert "| overall |" in result.table and "| colour |" in result.table
