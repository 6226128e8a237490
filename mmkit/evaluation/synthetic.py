"""Exact-answer questions about held-out scenes of the synthetic world, against a blind baseline.

Every question has one correct short answer known from the scene itself. The blind baseline
answers each question type with that type's most common answer on *training* scenes, which is
the best any model can do without looking; the gap to it is what seeing the image is worth.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

from torchmetrics.aggregation import MeanMetric

from mmkit.core.registry import EVALUATORS
from mmkit.datagen.rules import QUESTION_KINDS, ask
from mmkit.evaluation.evaluator import EvalItem, EvaluationResult, Evaluator
from mmkit.inference.generation import Prompt
from mmkit.synth.world import Scene, generate_scenes, render


@dataclass(frozen=True)
class Question:
    scene: Scene
    kind: str
    question: str
    answer: str


def normalise(text: str) -> str:
    """Case, surrounding punctuation and spacing do not make an answer wrong."""
    return re.sub(r"\s+", " ", text.lower()).strip(" .!?,;:\n\t")


def ask_about(scenes: Sequence[Scene], kinds: Sequence[str], seed: int) -> list[Question]:
    rng = random.Random(seed)
    questions = []
    for scene in scenes:
        for kind in kinds:
            qa = ask(kind, scene.objects, rng)
            if qa is not None:
                questions.append(Question(scene, kind, qa.question, qa.answer))
    return questions


@EVALUATORS.register("synthetic")
class SyntheticEvaluator(Evaluator):
    def __init__(
        self,
        split: str = "test",
        count: int = 200,
        seed: int = 0,
        resolution: int = 64,
        kinds: Sequence[str] = QUESTION_KINDS,
        baseline_scenes: int = 2000,
    ) -> None:
        self.split = split
        self.count = count
        self.seed = seed
        self.resolution = resolution
        self.kinds = tuple(kinds)
        self.baseline_scenes = baseline_scenes

    def questions(self) -> list[Question]:
        return ask_about(generate_scenes(self.split, self.count, self.seed), self.kinds, self.seed)

    def blind_answers(self) -> dict[str, str]:
        """The most common answer of each question type on training scenes."""
        training = ask_about(generate_scenes("train", self.baseline_scenes, self.seed + 1), self.kinds, self.seed + 1)
        by_kind: dict[str, Counter] = {kind: Counter() for kind in self.kinds}
        for question in training:
            by_kind[question.kind][normalise(question.answer)] += 1
        return {kind: counts.most_common(1)[0][0] for kind, counts in by_kind.items() if counts}

    def items(self) -> list[EvalItem]:
        return [
            EvalItem(
                f"{q.scene.scene_id}/{q.kind}",
                Prompt([{"from": "human", "value": f"<image>\n{q.question}"}], render(q.scene, self.resolution)),
                q,
            )
            for q in self.questions()
        ]

    def reference_text(self, item: EvalItem) -> str:
        return str(item.reference.answer)

    def score(self, items: Sequence[EvalItem], answers: Mapping[str, str]) -> EvaluationResult:
        blind = self.blind_answers()
        # One process scores every answer: no cross-rank sync, even inside a DDP run.
        model_acc = {kind: MeanMetric(sync_on_compute=False) for kind in ("all", *self.kinds)}
        blind_acc = {kind: MeanMetric(sync_on_compute=False) for kind in ("all", *self.kinds)}
        predictions = []
        for item in items:
            question: Question = item.reference
            answer = answers.get(item.question_id)
            correct = float(answer is not None and normalise(answer) == normalise(question.answer))
            blind_correct = float(blind.get(question.kind) == normalise(question.answer))
            for kind in ("all", question.kind):
                model_acc[kind].update(correct)
                blind_acc[kind].update(blind_correct)
            predictions.append({
                "question_id": item.question_id, "kind": question.kind, "question": question.question,
                "answer": question.answer, "prediction": answer, "correct": bool(correct),
            })
        counts = Counter(item.reference.kind for item in items)
        metrics: dict[str, float] = {}
        for kind in ("all", *self.kinds):
            if kind != "all" and not counts[kind]:
                continue
            suffix = "" if kind == "all" else f"_{kind}"
            metrics[f"acc{suffix}"] = round(100 * float(model_acc[kind].compute()), 2)
            metrics[f"blind_acc{suffix}"] = round(100 * float(blind_acc[kind].compute()), 2)
        return EvaluationResult(metrics, predictions, self._table(metrics, counts, len(items)))

    def _table(self, metrics: dict[str, float], counts: Counter, total: int) -> str:
        lines = [
            f"synthetic world, {self.split} split: {self.count} held-out scenes, {total} questions (exact match, %)",
            "| type | questions | model | blind | gain |",
            "|---|---:|---:|---:|---:|",
        ]
        for kind in (*self.kinds, "all"):
            suffix = "" if kind == "all" else f"_{kind}"
            if f"acc{suffix}" not in metrics:
                continue
            model, blind = metrics[f"acc{suffix}"], metrics[f"blind_acc{suffix}"]
            n = total if kind == "all" else counts[kind]
            lines.append(f"| {'overall' if kind == 'all' else kind} | {n} | {model:.1f} | {blind:.1f} | {model - blind:+.1f} |")
        return "\n".join(lines)
