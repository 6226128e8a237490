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
import logging
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmkit.core.errors import ConfigError, DataError
from mmkit.core.registry import EVALUATORS
from mmkit.data.datasets.dataset_source import given_or_built
from mmkit.evaluation.evaluator import EvalItem, EvaluationResult, Evaluator
from mmkit.evaluation.judge_agreement import agreement, build_judges, judge_items, summarise
from mmkit.evaluation.judges import Judge, Review
from mmkit.inference.generation import Prompt
from mmkit.synth.llava_bench_questions import synthetic_llava_bench_dir

CATEGORIES = ("conv", "detail", "complex")
logger = logging.getLogger(__name__)


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
    scored_offline = False  # a judge scores the answers

    def __init__(
        self,
        data_dir: str | None = None,
        judge: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        runs: int = 3,
        swap_order: bool = True,
        questions: str = "questions.jsonl",
        context: str = "context.jsonl",
        references: str = "answers_gpt4.jsonl",
        images: str = "images",
        limit: int | None = None,
        same_family: Sequence[str] = (),
    ) -> None:
        """``data_dir=None`` uses mmkit's synthetic LLaVA-Bench-format set (rules-teacher references).
        ``judge``: one judge or a list (a panel); ``swap_order``: judge every pair in both orders."""
        if runs < 1:
            raise ConfigError(f"task.runs={runs}: at least one judge run")
        self.judges: list[Judge] = build_judges(judge)
        self.data_dir = data_dir
        self.runs = runs
        self.swap_order = swap_order
        self.files = {"questions": questions, "context": context, "references": references}
        self.images = images
        self.limit = limit
        self.same_family = list(same_family)
        self.teachers: list[Mapping[str, Any]] = []  # who wrote the evaluated model's data, when known

    def record_teachers(self, teachers: Sequence[Mapping[str, Any]]) -> None:
        self.teachers = list(teachers)

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

    def reference_text(self, item: EvalItem) -> str:
        return item.reference.reference

    def score(self, items: Sequence[EvalItem], answers: Mapping[str, str]) -> EvaluationResult:
        answered = [item for item in items if item.question_id in answers]
        reviews = [_with_candidate(item.reference, answers[item.question_id]) for item in answered]
        per_judge = [judge_items(judge, reviews, self.runs, self.swap_order) for judge in self.judges]
        summaries = [
            {category: summarise([s for item, s in zip(answered, scored) if category in ("all", item.reference.category)],
                                 self.runs) for category in ("all", *CATEGORIES)}
            for scored in per_judge
        ]
        metrics: dict[str, Any] = {}
        for category in ("all", *CATEGORIES):
            suffix = "" if category == "all" else f"_{category}"
            for key, name in (("relative", f"relative{suffix}"), ("relative_std", f"relative{suffix}_std"),
                              ("relative_reference_first", f"relative{suffix}_reference_first"),
                              ("relative_candidate_first", f"relative{suffix}_candidate_first"),
                              ("order_effect", f"order_effect{suffix}")):
                values = [summary[category][key] for summary in summaries if summary[category][key] is not None]
                if values:  # the panel's mean; a category no judge could score is left out, never 0
                    metrics[name] = round(statistics.fmean(values), 4)
        metrics.setdefault("order_effect", None)
        if len(self.judges) > 1:
            for index, (judge, summary) in enumerate(zip(self.judges, summaries)):
                metrics[f"judge_{index}"] = judge.name
                metrics[f"judge_{index}_relative"] = summary["all"]["relative"]
                metrics[f"judge_{index}_order_effect"] = summary["all"]["order_effect"]
            relatives = [summary["all"]["relative"] for summary in summaries if summary["all"]["relative"] is not None]
            metrics["judges_relative_spread"] = statistics.stdev(relatives) if len(relatives) > 1 else None
            metrics.update(agreement(per_judge))
        failures = sum(pair is None for scored in per_judge for item in scored
                       for pair in item.reference_first + item.candidate_first)
        metrics.update(judge_failures=failures, missing=len(items) - len(answered), judge_runs=self.runs,
                       swap_order=self.swap_order, judge=" | ".join(judge.name for judge in self.judges))
        metrics.update(teacher_overlap(self.teachers, self.judges, self.same_family))
        scored_by_item = {item.question_id: [{"reference_first": s.reference_first, "candidate_first": s.candidate_first}
                                             for s in scores] for item, *scores in zip(answered, *per_judge)}
        predictions = [
            {"question_id": item.question_id, "category": item.reference.category, "text": answers.get(item.question_id),
             "scores": scored_by_item.get(item.question_id)}
            for item in items
        ]
        return EvaluationResult(metrics, predictions, self._table(metrics, items))

    def _table(self, metrics: dict[str, Any], items: Sequence[EvalItem]) -> str:
        counts = {c: sum(i.reference.category == c for i in items) for c in CATEGORIES}
        orders = "both answer orders averaged" if self.swap_order else "reference first only"
        lines = [
            f"LLaVA-Bench: {len(items)} questions; relative score = candidate / reference x 100, "
            f"mean ± sd over {self.runs} judge run(s), {orders}; judge: {metrics['judge']}",
            "| category | questions | relative score | order effect (points to the first answer) |",
            "|---|---:|---:|---:|",
        ]
        for category, label in (*((c, c) for c in CATEGORIES), ("all", "overall")):
            suffix = "" if category == "all" else f"_{category}"
            key = f"relative{suffix}"
            value = f"{metrics[key]:.1f} ± {metrics[key + '_std']:.1f}" if key in metrics else "-"
            effect = metrics.get(f"order_effect{suffix}")
            lines.append(f"| {label} | {len(items) if category == 'all' else counts[category]} | {value} | "
                         f"{'-' if effect is None else f'{effect:+.2f}'} |")
        if len(self.judges) > 1:
            lines.append("")
            lines.append("| judge | relative score | order effect |")
            lines.append("|---|---:|---:|")
            for index in range(len(self.judges)):
                relative, effect = metrics[f"judge_{index}_relative"], metrics[f"judge_{index}_order_effect"]
                lines.append(f"| {metrics[f'judge_{index}']} | {'-' if relative is None else f'{relative:.1f}'} | "
                             f"{'-' if effect is None else f'{effect:+.2f}'} |")
            kappas = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in metrics.items() if "kappa" in k)
            lines.append(f"agreement on per-item verdicts over {metrics['agreement_items']} items: {kappas}")
        if metrics.get("judge_is_teacher"):
            lines.append(f"WARNING: a judge is the model (or family) that wrote the training data: {metrics['teachers']}")
        lines.append(f"judge failures (not scored): {metrics['judge_failures']}; unanswered: {metrics['missing']}")
        return "\n".join(lines)


def teacher_overlap(teachers: Sequence[Mapping[str, Any]], judges: Sequence[Judge], same_family: Sequence[str]) -> dict[str, Any]:
    """``judge_is_teacher``: a judge is the model that wrote the training data (same model at the
    same endpoint), or both names start with one of ``same_family``'s prefixes."""
    if not teachers:
        return {}
    def family(model: str) -> str | None:
        return next((prefix for prefix in same_family if model.startswith(prefix)), None)
    overlap = False
    for teacher in teachers:
        for judge in judges:
            served = judge.model_endpoint()
            if served is None or teacher.get("model") is None:
                continue
            model, endpoint = served
            same = model == teacher["model"] and endpoint.rstrip("/") == str(teacher.get("base_url") or "").rstrip("/")
            overlap |= same or (family(model) is not None and family(model) == family(str(teacher["model"])))
    if overlap:
        logger.warning("the judge is the teacher that wrote the training data (or of its family): %s", list(teachers))
    return {"judge_is_teacher": overlap, "teachers": [dict(t) for t in teachers]}


def _with_candidate(review: Review, candidate: str) -> Review:
    return Review(review.category, review.context, review.question, review.reference, candidate)
