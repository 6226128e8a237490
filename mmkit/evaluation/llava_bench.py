"""LLaVA-Bench: answers judged against reference answers; relative score per category.

Layout (LLaVA-Bench In-the-Wild / COCO): ``questions.jsonl`` (question_id, image, text,
category in conv / detail / complex), ``context.jsonl`` (image, caption as a string or list,
optional instances with category and bbox), the reference answers (``answers_gpt4.jsonl``:
question_id, text) and ``images/``. For each judge run, a category's relative score is
mean(candidate score) / mean(reference score) x 100 over the questions the judge scored; the
table gives the mean and spread over ``runs`` judge runs and the judge's name, since published
scores shift with the judge. Questions the judge could not score are counted, never scored 0.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmkit.errors import ConfigError, DataError
from mmkit.data.datasets.base import given_or_built
from mmkit.evaluation.base import EvalItem, EvaluationResult, Evaluator
from mmkit.evaluation.generation import Prompt
from mmkit.evaluation.judges import Judge, Review
from mmkit.synth.llava_bench import synthetic_llava_bench_dir
from mmkit.registry import EVALUATORS, JUDGES

CATEGORIES = ("conv", "detail", "complex")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected LLaVA-Bench's layout)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not JSON ({exc})") from None
    return records


def context_text(record: dict[str, Any]) -> str:
    captions = record.get("caption", record.get("captions", ""))
    lines = [captions] if isinstance(captions, str) else list(captions)
    lines += [f"- {i['category']}: {i['bbox']}" for i in record.get("instances", [])]
    return "\n".join(str(line) for line in lines)


@EVALUATORS.register("llava_bench")
class LlavaBenchEvaluator(Evaluator):
    def __init__(
        self,
        data_dir: str | None = None,
        judge: Mapping[str, Any] | None = None,
        runs: int = 3,
        questions: str = "questions.jsonl",
        context: str = "context.jsonl",
        references: str = "answers_gpt4.jsonl",
        images: str = "images",
        limit: int | None = None,
    ) -> None:
        """``data_dir=None`` uses mmkit's synthetic LLaVA-Bench-format set (rules-teacher references)."""
        if runs < 1:
            raise ConfigError(f"task.runs={runs}: at least one judge run")
        self.judge: Judge = JUDGES.build(dict(judge or {"name": "rules"}), "task.judge")
        self.data_dir = data_dir
        self.runs = runs
        self.files = {"questions": questions, "context": context, "references": references}
        self.images = images
        self.limit = limit

    def items(self) -> list[EvalItem]:
        data_dir = given_or_built(self.data_dir, synthetic_llava_bench_dir)
        questions = read_jsonl(data_dir / self.files["questions"])[: self.limit]
        contexts = {r["image"]: context_text(r) for r in read_jsonl(data_dir / self.files["context"])}
        references = {str(r["question_id"]): r["text"] for r in read_jsonl(data_dir / self.files["references"])}
        items = []
        for question in questions:
            qid = str(question["question_id"])
            if qid not in references:
                raise DataError(f"{data_dir / self.files['references']}: no reference answer for question {qid}")
            if question.get("category") not in CATEGORIES:
                raise DataError(f"question {qid}: category {question.get('category')!r} is not one of {CATEGORIES}")
            review = Review(question["category"], contexts.get(question["image"], ""), question["text"], references[qid], "")
            prompt = Prompt([{"from": "human", "value": f"<image>\n{question['text']}"}], data_dir / self.images / question["image"])
            items.append(EvalItem(qid, prompt, review))
        return items

    def score(self, items: Sequence[EvalItem], answers: Mapping[str, str]) -> EvaluationResult:
        answered = [item for item in items if item.question_id in answers]
        reviews = [_with_candidate(item.reference, answers[item.question_id]) for item in answered]
        relative: dict[str, list[float]] = {category: [] for category in ("all", *CATEGORIES)}
        failures = 0
        per_item: dict[str, list[Any]] = {item.question_id: [] for item in answered}
        for run in range(self.runs):
            scores = self.judge.score(reviews, run)
            failures += sum(s is None for s in scores)
            for item, pair in zip(answered, scores):
                per_item[item.question_id].append(pair)
            for category in relative:
                pairs = [pair for item, pair in zip(answered, scores)
                         if pair is not None and category in ("all", item.reference.category)]
                if pairs:
                    reference_mean = statistics.fmean(p[0] for p in pairs)
                    relative[category].append(100 * statistics.fmean(p[1] for p in pairs) / reference_mean)
        metrics: dict[str, Any] = {}
        for category, values in relative.items():
            if values:
                key = "relative" if category == "all" else f"relative_{category}"
                metrics[key] = round(statistics.fmean(values), 2)
                metrics[f"{key}_std"] = round(statistics.stdev(values), 2) if len(values) > 1 else 0.0
        metrics.update(judge_failures=failures, missing=len(items) - len(answered), judge_runs=self.runs,
                       judge=self.judge.name)
        predictions = [
            {"question_id": item.question_id, "category": item.reference.category, "text": answers.get(item.question_id),
             "scores": per_item.get(item.question_id)}
            for item in items
        ]
        return EvaluationResult(metrics, predictions, self._table(metrics, items))

    def _table(self, metrics: dict[str, Any], items: Sequence[EvalItem]) -> str:
        counts = {c: sum(i.reference.category == c for i in items) for c in CATEGORIES}
        lines = [
            f"LLaVA-Bench: {len(items)} questions; relative score = candidate / reference x 100, "
            f"mean ± sd over {self.runs} judge run(s); judge: {metrics['judge']}",
            "| category | questions | relative score |",
            "|---|---:|---:|",
        ]
        for category, label in (*((c, c) for c in CATEGORIES), ("all", "overall")):
            key = "relative" if category == "all" else f"relative_{category}"
            value = f"{metrics[key]:.1f} ± {metrics[key + '_std']:.1f}" if key in metrics else "-"
            lines.append(f"| {label} | {len(items) if category == 'all' else counts[category]} | {value} |")
        lines.append(f"judge failures (not scored): {metrics['judge_failures']}; unanswered: {metrics['missing']}")
        return "\n".join(lines)


def _with_candidate(review: Review, candidate: str) -> Review:
    return Review(review.category, review.context, review.question, review.reference, candidate)
