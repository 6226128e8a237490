"""The interface of evaluators: items to ask, then answers scored into flat metrics + a table.

An evaluator never calls a model itself. ``items()`` says what to ask; the shared runner
(:mod:`mmkit.evaluation.answers`) gets the answers, from a model or from an existing answer
file, and ``score()`` turns them into metrics. So any system's outputs are scored by the same code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmkit.core.registry import EVALUATORS
from mmkit.inference.generation import Prompt


@dataclass(frozen=True)
class EvalItem:
    question_id: str
    prompt: Prompt
    reference: Any  # whatever the evaluator needs to score this item's answer


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    predictions: list[dict[str, Any]]
    table: str

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(self.metrics, indent=2))
        with open(folder / "predictions.jsonl", "w") as handle:
            handle.writelines(json.dumps(p) + "\n" for p in self.predictions)
        (folder / "table.md").write_text(self.table + "\n")


class Evaluator:
    #: False for an evaluator that makes its own candidates (``judge_validity``): it runs without a
    #: model or an answer file, and takes their answers as extra candidates when given.
    needs_answers: bool = True
    #: False where scoring asks a judge model (an API call): sample answers during training then
    #: show the answers and references without a score.
    scored_offline: bool = True

    def record_teachers(self, teachers: Sequence[Mapping[str, Any]]) -> None:
        """Who wrote the evaluated model's training data; judged evaluators flag a judge among them."""

    def items(self) -> list[EvalItem]:
        raise NotImplementedError

    def score(self, items: Sequence[EvalItem], answers: Mapping[str, str]) -> EvaluationResult:
        """Metrics from ``answers`` (question_id -> text); an item with no answer counts as wrong."""
        raise NotImplementedError

    def reference_text(self, item: EvalItem) -> str:
        """The item's reference answer as a reader would want to see it beside a model's answer."""
        return str(item.reference)

    def answer_key(self, item: EvalItem, text: str) -> str | None:
        """What an answer says, for comparing two sources (ensembles); None if it says nothing valid."""
        key = " ".join(text.lower().split()).strip(" .!?")
        return key or None

    def plot(self, result: EvaluationResult, path: Path) -> Path | None:
        """Evaluators whose results read better as a figure write one to ``path``."""
        return None


EVALUATORS.set_base(Evaluator)
