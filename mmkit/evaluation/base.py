"""The interface of evaluators: a model in, flat metrics + per-item predictions + a table out."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmkit.evaluation.generation import AnswerGenerator
from mmkit.registry import EVALUATORS


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
    def evaluate(self, generator: AnswerGenerator) -> EvaluationResult:
        raise NotImplementedError


EVALUATORS.set_base(Evaluator)
