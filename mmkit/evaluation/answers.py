"""Answers to evaluation items, in LLaVA's answer-file format, resumable after a crash.

Each line of ``answers.jsonl`` is ``{"question_id", "prompt", "text"}``, the format LLaVA's
``model_vqa*`` scripts write, so files from other systems are scored by the same evaluators.
Answers are appended batch by batch and flushed to disk, so an interrupted evaluation resumes
where it stopped: items already answered are not asked again. Under torchrun each rank answers
its share into ``answers.rankN.jsonl``, and rank 0 merges them into ``answers.jsonl``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence, TextIO

from mmkit.core.distributed import barrier, gather_objects, rank_and_world
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
    items: Sequence[EvalItem],
    generator: AnswerGenerator,
    path: Path,
    desc: str = "answering",
    across_ranks: bool = False,
) -> dict[str, str]:
    """Answers to every item: those already saved are kept, the rest generated and saved batch by batch.

    With ``across_ranks``, every rank of the process group calls this together. Each answers every
    world-th item into its own file beside ``path`` (so each resumes on its own), then rank 0
    appends them to ``path`` in item order, as one process would have written them. Every rank
    returns every item's answer.
    """
    rank, world = rank_and_world() if across_ranks else (0, 1)
    if rank == 0:
        for saved in _saved_files(path):
            _drop_torn_tail(saved)
    # Also the barrier after rank 0's mending: no rank reads a file before it is whole.
    if world > 1 and len(set(gather_objects(tuple(item.question_id for item in items)))) > 1:
        raise DataError(f"{desc}: the ranks built different evaluation items; each rank must build the same")
    answers: dict[str, str] = {}
    for saved in _saved_files(path):
        answers.update(read_answers(saved, missing_ok=True))
    if world > 1:
        barrier()  # every rank has read the files before any rank appends to its own
    answered = sum(item.question_id in answers for item in items)
    if answered and rank == 0:
        print(f"{desc}: {answered} of {len(items)} items answered already ({path})")
    missing = [item for item in items[rank::world] if item.question_id not in answers]
    own_file = path if world == 1 else _rank_file(path, rank)
    new = _append_answers(missing, generator, own_file, desc, progress=rank == 0)
    for share in gather_objects(new) if world > 1 else [new]:
        answers.update(share)
    if rank == 0:
        _merge_rank_files(items, answers, path)
    return answers


def _append_answers(
    items: Sequence[EvalItem], generator: AnswerGenerator, path: Path, desc: str, progress: bool
) -> dict[str, str]:
    """Answer ``items``, appending each batch to ``path`` and flushing it to disk before the next."""
    answers: dict[str, str] = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        for batch, texts in generator.answer_batches([item.prompt for item in items], progress, desc):
            for item, text in zip(items[batch], texts):
                answers[item.question_id] = text
            _write_records(handle, items[batch], answers)
    return answers


def _merge_rank_files(items: Sequence[EvalItem], answers: Mapping[str, str], path: Path) -> None:
    """Append to ``path`` the answers it lacks, in item order, then delete the ranks' files (with
    any answers of theirs to items this run does not ask)."""
    rank_files = _saved_files(path)[1:]
    if not rank_files:
        return
    lacking = answers.keys() - read_answers(path, missing_ok=True).keys()
    with open(path, "a") as handle:
        _write_records(handle, [item for item in items if item.question_id in lacking], answers)
    for rank_file in rank_files:
        rank_file.unlink()


def _write_records(handle: TextIO, items: Sequence[EvalItem], answers: Mapping[str, str]) -> None:
    for item in items:
        record = {"question_id": item.question_id, "prompt": item.prompt.text, "text": answers[item.question_id]}
        handle.write(json.dumps(record) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _rank_file(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def _saved_files(path: Path) -> list[Path]:
    """``path``, then the files ranks answer into beside it (left by an interrupted multi-process run)."""
    return [path, *sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))]


def _drop_torn_tail(path: Path) -> None:
    """Cut a torn last line (a crash mid-write) off ``path``, so appends never follow it."""
    text = path.read_text() if path.is_file() else ""
    if text and not text.endswith("\n"):
        path.write_text(text[: text.rfind("\n") + 1])
