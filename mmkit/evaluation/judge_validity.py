"""Qualify a judge before trusting it: on the synthetic world every question has an exact answer.

    python -m mmkit.evaluate task=judge_validity task.judge='{name: openai, base_url: ..., model: ...}'
    python -m mmkit.evaluate task=judge_validity model=RUN task.judge=...    # the model's answers join in

Candidates are the reference answers (right), the references with their facts changed (colours,
shapes, sizes, numbers, places, yes/no: wrong), and, with ``model=`` or ``predictions=``, a
model's answers. The ``rules`` judge is ground truth: a candidate is right when it states exactly
the reference's facts. The judge under test scores every candidate against its reference in both
orders; how well its scores (candidate minus reference) separate right from wrong is the AUROC,
reported with its order effect. A judge that cannot tell right from wrong scores 0.5.
"""
from __future__ import annotations

import random
import re
from typing import Any, Mapping, Sequence

import torch

from mmkit.core.errors import DataError
from mmkit.core.registry import EVALUATORS
from mmkit.data.datasets.dataset_source import given_or_built
from mmkit.evaluation.evaluator import EvalItem, EvaluationResult
from mmkit.evaluation.judge_agreement import judge_items, summarise
from mmkit.evaluation.judges import NUMBER_WORDS, Review, fact_f1, facts
from mmkit.evaluation.llava_bench import LlavaBenchEvaluator
from mmkit.synth.llava_bench_questions import synthetic_llava_bench_dir
from mmkit.synth.world import COLOURS, SHAPES, SIZES

_OPPOSITES = {"yes": "no", "no": "yes", "left": "right", "right": "left", "top": "bottom", "bottom": "top",
              "above": "below", "below": "above"}
_KINDS = [tuple(COLOURS), SHAPES, SIZES, NUMBER_WORDS]


def corrupt(text: str, rng: random.Random) -> str:
    """The text with every fact word replaced by another of its kind (plural shapes stay plural)."""

    def replace(match: re.Match) -> str:
        word = match.group(0)
        lower, plural = word.lower(), ""
        if lower.endswith("s") and lower[:-1] in SHAPES:
            lower, plural = lower[:-1], "s"
        if lower in _OPPOSITES:
            new = _OPPOSITES[lower]
        else:
            kind = next((kind for kind in _KINDS if lower in kind), None)
            if kind is None:
                return word
            new = rng.choice([other for other in kind if other != lower])
        new += plural
        return new.capitalize() if word[0].isupper() else new

    return re.sub(r"[A-Za-z]+", replace, text)


@EVALUATORS.register("judge_validity")
class JudgeValidityEvaluator(LlavaBenchEvaluator):
    needs_answers = False  # the candidates are built here; a model's answers are optional

    def __init__(self, scenes: int = 100, seed: int = 0, **options: Any) -> None:
        """``scenes``: synthetic scenes (3 questions each) when ``data_dir`` is null."""
        super().__init__(**options)
        self.scenes = scenes
        self.seed = seed

    def items(self) -> list[EvalItem]:
        self.data_dir = str(given_or_built(self.data_dir, lambda: synthetic_llava_bench_dir(self.seed, self.scenes)))
        return super().items()

    def score(self, items: Sequence[EvalItem], answers: Mapping[str, str]) -> EvaluationResult:
        rng = random.Random(self.seed)
        candidates: list[tuple[str, str, Review]] = []  # (question_id, source, review)
        for item in items:
            review = item.reference
            if not facts(review.reference):
                continue  # nothing to corrupt, and nothing for the rules judge to check
            sources = {"reference": review.reference, "corrupted": corrupt(review.reference, rng)}
            if item.question_id in answers:
                sources["model"] = answers[item.question_id]
            for source, text in sources.items():
                candidates.append((item.question_id, source, Review(review.category, review.context, review.question,
                                                                    review.reference, text)))
        if not candidates:
            raise DataError("judge_validity: no question with facts to check")
        right = [fact_f1(review.candidate, review.reference) == 1.0 for _, _, review in candidates]
        metrics: dict[str, Any] = {
            "candidates": len(candidates), "right": sum(right), "wrong": len(right) - sum(right),
            "questions": len({qid for qid, _, _ in candidates}), "judge_runs": self.runs, "swap_order": self.swap_order,
        }
        predictions = [{"question_id": qid, "source": source, "candidate": review.candidate, "right": is_right}
                       for (qid, source, review), is_right in zip(candidates, right)]
        reviews = [review for _, _, review in candidates]
        for index, judge in enumerate(self.judges):
            scored = judge_items(judge, reviews, self.runs, self.swap_order)
            margins = [None if (mean := item.mean()) is None else mean[1] - mean[0] for item in scored]
            kept = [(margin, is_right) for margin, is_right in zip(margins, right) if margin is not None]
            prefix = "" if len(self.judges) == 1 else f"judge_{index}_"
            metrics[f"{prefix}judge"] = judge.name
            metrics[f"{prefix}auroc"] = _auroc([m for m, _ in kept], [r for _, r in kept])
            metrics[f"{prefix}order_effect"] = summarise(scored, self.runs)["order_effect"]
            metrics[f"{prefix}unscored"] = len(margins) - len(kept)
            for prediction, margin in zip(predictions, margins):
                prediction[f"{prefix}margin"] = margin
        return EvaluationResult(metrics, predictions, self._validity_table(metrics))

    def _validity_table(self, metrics: dict[str, Any]) -> str:
        lines = [
            f"Judge validity: {metrics['candidates']} candidates ({metrics['right']} right, {metrics['wrong']} wrong by "
            f"the rules judge) to {metrics['questions']} questions; score = candidate - reference, "
            f"{'both orders' if self.swap_order else 'reference first only'}, {self.runs} run(s)",
            "| judge | AUROC (right vs wrong) | order effect (points) | unscored |",
            "|---|---:|---:|---:|",
        ]
        prefixes = [""] if len(self.judges) == 1 else [f"judge_{i}_" for i in range(len(self.judges))]
        for prefix in prefixes:
            auroc, effect = metrics[f"{prefix}auroc"], metrics[f"{prefix}order_effect"]
            lines.append(f"| {metrics[prefix + 'judge']} | {'-' if auroc is None else f'{auroc:.3f}'} | "
                         f"{'-' if effect is None else f'{effect:+.2f}'} | {metrics[prefix + 'unscored']} |")
        return "\n".join(lines)


def _auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    from torchmetrics.functional.classification import binary_auroc

    if not scores or all(labels) or not any(labels):
        return None  # undefined without both right and wrong candidates
    return round(binary_auroc(torch.tensor(scores, dtype=torch.float64), torch.tensor(labels, dtype=torch.long)).item(), 4)
