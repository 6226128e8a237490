"""Answers to evaluation items, in LLaVA's answer-file format, resumable after a crash.

Each line of ``answers.jsonl`` is ``{"question_id", "prompt", "text"}``, the format LLaVA's
``model_vqa*`` scripts write, so files from other systems are scored by the same evaluators.
Answers are appended batch by batch and flushed to disk, so an interrupted evaluation resumes
where it stopped: items already answered are not asked again.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from mmkit.core.errors import DataError
from mmkit.evaluation.evaluator import EvalItem
from mmkit.inference.generation import AnswerGenerator

ANSWER_FILE = "answers.jsonl"


def read_answers(path: Path, missing_ok: bool = False) -> dict[str, str]:
    """question_id -> answer text; a bad line raises DataError naming the file and line."""
    answers: dict[str, str] = {}
    if not path.is_file():
        if missing_ok:
            return answers
        raise DataError(f"predictions={path}: no such file")
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            answers[str(record["question_id"])] = str(record["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(
                f"{path}:{number}: not an answer-file line (JSON with question_id and text): {exc}"
            ) from None
    return answers


def answer_items(
    items: Sequence[EvalItem], generator: AnswerGenerator, path: Path, desc: str = "answering"
) -> dict[str, str]:
    """Answers to every item: those already in ``path`` are kept, the rest generated and appended."""
    _drop_torn_tail(path)
    answers = read_answers(path, missing_ok=True)
    missing = [item for item in items if item.question_id not in answers]
    if len(missing) < len(items):
        print(f"{desc}: {len(items) - len(missing)} of {len(items)} items answered already ({path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        for batch, texts in generator.answer_batches([item.prompt for item in missing], desc=desc):
            for item, text in zip(missing[batch], texts):
                answers[item.question_id] = text
                record = {"question_id": item.question_id, "prompt": item.prompt.text, "text": text}
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    return answers


def _drop_torn_tail(path: Path) -> None:
    """Cut a torn last line (a crash mid-write) off ``path``, so appends never follow it."""
    text = path.read_text() if path.is_file() else ""
    if text and not text.endswith("\n"):
        path.write_text(text[: text.rfind("\n") + 1])
