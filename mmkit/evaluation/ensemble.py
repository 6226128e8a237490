"""Ensembles of two answer sources, as in the paper's LLaVA + GPT-4 rows on ScienceQA.

- ``complement``: A's answer, except where A gives no valid answer (per the task's own parse),
  where B's is used.
- ``judge``: where A and B give different answers, a chat model (OpenAI-compatible, the same
  client as the teacher) is shown the question and both full answers, reasoning included, and
  picks one; where it gives no usable choice, A's answer stands and the item is counted.

The result is an answer file in LLaVA's format, scored by the same evaluator as its inputs.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmkit.core.errors import ConfigError, DataError
from mmkit.core.llm_client import ChatClient
from mmkit.evaluation.evaluator import EvalItem, Evaluator

METHODS = ("complement", "judge")
CHOOSER_SYSTEM = "You compare two answers to the same question and pick the correct one. You are careful and brief."
CHOOSER_TEMPLATE = """[Question]
{question}

[Answer 1]
{first}

[Answer 2]
{second}

[Task]
The two answers disagree. Read their reasoning and decide which final answer is correct. \
Reply with 1 or 2 alone on the first line, then one sentence on why."""
_CHOICE_LINE = re.compile(r"^\s*\[?([12])\]?\s*$")


def parse_choice(content: Any) -> int | None:
    if not isinstance(content, str) or not content.strip():
        return None
    match = _CHOICE_LINE.match(content.strip().splitlines()[0])
    return int(match.group(1)) if match else None


def combine(
    method: str,
    evaluator: Evaluator,
    items: Sequence[EvalItem],
    first: Mapping[str, str],
    second: Mapping[str, str],
    judge: Mapping[str, Any] | None = None,
) -> tuple[dict[str, str], dict[str, int]]:
    """(question_id -> ensembled answer, counts of what was taken from where)."""
    if method not in METHODS:
        raise ConfigError(f"ensemble.method={method!r}: choose one of {', '.join(METHODS)}")
    counts = {"from_first": 0, "from_second": 0, "judged": 0, "judge_failures": 0}
    combined: dict[str, str] = {}
    disputes: list[EvalItem] = []
    for item in items:
        a, b = first.get(item.question_id), second.get(item.question_id)
        key_a = None if a is None else evaluator.answer_key(item, a)
        key_b = None if b is None else evaluator.answer_key(item, b)
        if key_a is None and b is not None:
            combined[item.question_id] = b
            counts["from_second"] += 1
        elif a is not None:
            combined[item.question_id] = a
            counts["from_first"] += 1
            if method == "judge" and key_b is not None and key_a != key_b:
                disputes.append(item)
    if disputes:
        _judge_disputes(disputes, first, second, combined, counts, judge)
    return combined, counts


def _judge_disputes(disputes, first, second, combined, counts, judge) -> None:
    from concurrent.futures import ThreadPoolExecutor

    options = dict(judge or {})
    if not options.get("model"):
        raise ConfigError("ensemble.judge.model: name the chat model that settles disagreements")
    client = ChatClient.from_options(options, "ensemble.judge", temperature=0.0, max_tokens=128)

    def choose(item: EvalItem) -> int | None:
        text = CHOOSER_TEMPLATE.format(question=item.prompt.text.replace("<image>", "").strip(),
                                       first=first[item.question_id], second=second[item.question_id])
        messages = [{"role": "system", "content": CHOOSER_SYSTEM}, {"role": "user", "content": text}]
        try:
            return parse_choice(client.complete(messages, accept=lambda r: parse_choice(r.get("content")) is not None)["content"])
        except DataError:
            return None

    with ThreadPoolExecutor(max_workers=client.concurrency, thread_name_prefix="mmkit-ensemble") as pool:
        choices = list(pool.map(choose, disputes))
    for item, choice in zip(disputes, choices):
        if choice is None:
            counts["judge_failures"] += 1
            continue
        counts["judged"] += 1
        if choice == 2:
            combined[item.question_id] = second[item.question_id]
            counts["from_first"] -= 1
            counts["from_second"] += 1


def write_answers(path: Path, items: Sequence[EvalItem], answers: Mapping[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(
        json.dumps({"question_id": item.question_id, "prompt": item.prompt.text, "text": answers[item.question_id]}) + "\n"
        for item in items if item.question_id in answers
    ))
    return path
