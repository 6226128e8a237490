"""ScienceQA accuracy, overall and by the paper's columns, with the official and a lenient parse.

Columns (ScienceQA's own scorer): subject NAT / SOC / LAN; context TXT (has a hint), IMG (has an
image), NO (neither; a problem with both counts in TXT and IMG); grade G1-6 / G7-12. Metrics are
``acc`` and ``acc_<column>`` under the official parse, ``lenient_acc*`` under the lenient one. An
answer that does not parse, or is missing, is wrong: never a random guess.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

from mmkit.core.registry import EVALUATORS
from mmkit.data.datasets.dataset_source import given_or_built
from mmkit.data.scienceqa_layout import (
    OPTION_LETTERS,
    PARSE_MODES,
    image_path,
    load_problems,
    parse_answer,
    prompt_text,
    split_format,
)
from mmkit.evaluation.evaluator import EvalItem, EvaluationResult, Evaluator
from mmkit.inference.generation import Prompt
from mmkit.synth.scienceqa_questions import synthetic_scienceqa_dir

COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1_6", "G7_12")
# LLaVA's --single-pred-prompt suffix, for models trained to answer with the letter alone.
SINGLE_PRED_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


@EVALUATORS.register("scienceqa")
class ScienceQAEvaluator(Evaluator):
    def __init__(
        self,
        data_dir: str | None = None,
        split: str = "test",
        prompt_format: str = "QCM-LEA",
        single_pred_prompt: bool = False,
        limit: int | None = None,
    ) -> None:
        """``data_dir=None`` uses mmkit's synthetic ScienceQA-format set (built once, cached)."""
        self.input_format, _ = split_format(prompt_format, "task.prompt_format")
        self.data_dir = data_dir
        self.split = split
        self.single_pred_prompt = single_pred_prompt
        self.limit = limit

    def items(self) -> list[EvalItem]:
        data_dir = given_or_built(self.data_dir, synthetic_scienceqa_dir)
        problems = load_problems(data_dir, self.split)[: self.limit]
        items = []
        for problem in problems:
            text = prompt_text(problem, self.input_format)
            if self.single_pred_prompt:
                text += SINGLE_PRED_SUFFIX
            image = image_path(data_dir, problem)
            if image is not None:
                text = f"{text}\n<image>"
            items.append(EvalItem(problem.pid, Prompt([{"from": "human", "value": text}], image), problem))
        return items

    def answer_key(self, item: EvalItem, text: str) -> str | None:
        choice = parse_answer(text, len(item.reference.choices), "official")
        return None if choice is None else OPTION_LETTERS[choice]

    def score(self, items: Sequence[EvalItem], answers: Mapping[str, str]) -> EvaluationResult:
        hits = {mode: defaultdict(list) for mode in PARSE_MODES}
        unparsed = dict.fromkeys(PARSE_MODES, 0)
        predictions = []
        for item in items:
            problem = item.reference
            text = answers.get(item.question_id)
            record = {"question_id": item.question_id, "answer": problem.answer_letter, "text": text}
            for mode in PARSE_MODES:
                choice = None if text is None else parse_answer(text, len(problem.choices), mode)
                unparsed[mode] += choice is None
                correct = choice == problem.answer
                for column in ("all", *problem.columns()):
                    hits[mode][column].append(correct)
                record[f"{mode}_choice"] = None if choice is None else OPTION_LETTERS[choice]
                record[f"{mode}_correct"] = correct
            predictions.append(record)
        metrics: dict[str, float] = {}
        for mode in PARSE_MODES:
            prefix = "acc" if mode == "official" else "lenient_acc"
            for column in ("all", *COLUMNS):
                found = hits[mode].get(column)
                if found:
                    metrics[prefix if column == "all" else f"{prefix}_{column}"] = round(100 * sum(found) / len(found), 2)
            metrics[f"unparsed_{mode}"] = unparsed[mode]
        metrics["missing"] = sum(item.question_id not in answers for item in items)
        counts = {column: len(hits["official"].get(column, [])) for column in ("all", *COLUMNS)}
        return EvaluationResult(metrics, predictions, self._table(metrics, counts))

    def _table(self, metrics: dict[str, float], counts: dict[str, int]) -> str:
        header = ["parse", *(c.replace("_", "-") for c in COLUMNS), "Avg"]
        lines = [
            f"ScienceQA {self.split}: {counts['all']} problems, accuracy (%); unparsed answers count as wrong",
            "| " + " | ".join(header) + " |",
            "|---|" + "---:|" * (len(header) - 1),
            "| problems | " + " | ".join(str(counts[c]) for c in COLUMNS) + f" | {counts['all']} |",
        ]
        for mode, prefix in (("official", "acc"), ("lenient", "lenient_acc")):
            cells = [f"{metrics[f'{prefix}_{c}']:.2f}" if f"{prefix}_{c}" in metrics else "-" for c in COLUMNS]
            lines.append(f"| {mode} | " + " | ".join(cells) + f" | {metrics.get(prefix, 0.0):.2f} |")
        lines.append(
            f"unparsed: {metrics['unparsed_official']} official, {metrics['unparsed_lenient']} lenient; "
            f"missing answers: {metrics['missing']}"
        )
        return "\n".join(lines)
