"""ScienceQA's published layout and LLaVA's prompt formats for it, shared by training and evaluation.

Layout (lupantech/ScienceQA): ``problems.json`` (pid -> question, choices, answer index, hint,
image, subject, grade, lecture, solution, split), ``pid_splits.json`` (split -> pids) and
``images/<split>/<pid>/image.png``.

Prompt formats are LLaVA's ``<input>-<output>``: the input orders Context, Question and Options
(``CQM`` or ``QCM``); the output is the target the model learns to write: ``A`` (the answer),
``LEA`` (lecture, explanation, then answer: reasoning first) or ``ALE`` (answer first, then
``BECAUSE:`` and the reasoning), the paper's "predict answer first" ablation.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmkit.core.errors import ConfigError, DataError

OPTION_LETTERS = "ABCDE"
INPUT_FORMATS = ("CQM", "QCM")
OUTPUT_FORMATS = ("A", "LEA", "ALE")
PARSE_MODES = ("official", "lenient")
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


@dataclass(frozen=True)
class Problem:
    pid: str
    split: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    hint: str
    image: str | None  # file name inside images/<split>/<pid>/
    subject: str
    grade: str
    lecture: str
    solution: str

    @property
    def answer_letter(self) -> str:
        return OPTION_LETTERS[self.answer]

    def columns(self) -> list[str]:
        """The score-table columns this problem counts in (ScienceQA's official grouping): its
        subject; TXT if it has a text context (hint), IMG if it has an image, NO if neither; its
        grade band."""
        columns = [SUBJECTS.get(self.subject, self.subject)]
        if self.hint:
            columns.append("TXT")
        if self.image:
            columns.append("IMG")
        if not self.hint and not self.image:
            columns.append("NO")
        grade = int(self.grade.removeprefix("grade")) if self.grade.removeprefix("grade").isdigit() else 0
        columns.append("G1_6" if 1 <= grade <= 6 else "G7_12" if 7 <= grade <= 12 else "G_unknown")
        return columns


def split_format(prompt_format: str, key: str = "prompt_format") -> tuple[str, str]:
    """``"QCM-LEA"`` -> ``("QCM", "LEA")``; a ConfigError naming ``key`` otherwise."""
    input_format, _, output_format = prompt_format.partition("-")
    if input_format not in INPUT_FORMATS or output_format not in OUTPUT_FORMATS:
        raise ConfigError(
            f"{key}={prompt_format!r}: use <input>-<output> with input one of {', '.join(INPUT_FORMATS)} "
            f"and output one of {', '.join(OUTPUT_FORMATS)} (e.g. QCM-LEA, or QCM-ALE for answer first)"
        )
    return input_format, output_format


def load_problems(data_dir: Path, split: str) -> list[Problem]:
    """The problems of ``split`` in pid_splits.json order, checked field by field."""
    data_dir = Path(data_dir)
    problems_path, splits_path = data_dir / "problems.json", data_dir / "pid_splits.json"
    for path in (problems_path, splits_path):
        if not path.is_file():
            raise DataError(f"data_dir={data_dir}: no {path.name} (expected ScienceQA's layout)")
    problems = _read_json(problems_path)
    splits = _read_json(splits_path)
    if split not in splits:
        raise ConfigError(f"split={split!r}: {splits_path} has {', '.join(sorted(splits))}")
    return [_problem(str(pid), split, problems, problems_path) for pid in splits[split]]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def _problem(pid: str, split: str, problems: dict[str, Any], path: Path) -> Problem:
    if pid not in problems:
        raise DataError(f"{path}: pid {pid} is listed in pid_splits.json but missing")
    raw = problems[pid]
    try:
        choices = tuple(str(c) for c in raw["choices"])
        answer = int(raw["answer"])
        if not 0 <= answer < len(choices) or len(choices) > len(OPTION_LETTERS):
            raise ValueError(f"answer {answer} with {len(choices)} choices")
        return Problem(
            pid=pid, split=split, question=str(raw["question"]), choices=choices, answer=answer,
            hint=str(raw.get("hint") or ""), image=raw.get("image") or None, subject=str(raw["subject"]),
            grade=str(raw["grade"]), lecture=str(raw.get("lecture") or ""), solution=str(raw.get("solution") or ""),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: problem {pid} is malformed ({exc!r})") from None


def image_path(data_dir: Path, problem: Problem) -> Path | None:
    return Path(data_dir) / "images" / problem.split / problem.pid / problem.image if problem.image else None


def prompt_text(problem: Problem, input_format: str) -> str:
    """The question as LLaVA's converter writes it; an empty context reads ``N/A``."""
    options = " ".join(f"({OPTION_LETTERS[i]}) {choice}" for i, choice in enumerate(problem.choices))
    parts = {"C": f"Context: {problem.hint or 'N/A'}", "Q": f"Question: {problem.question}", "M": f"Options: {options}"}
    return _tidy("\n".join(parts[part] for part in input_format))


def target_text(problem: Problem, output_format: str) -> str:
    answer = f"The answer is {problem.answer_letter}."
    reasoning = f"{problem.lecture} {problem.solution}"
    text = {"A": answer, "LEA": f"{reasoning} {answer}", "ALE": f"{answer} BECAUSE: {reasoning}"}[output_format]
    return _tidy(text).removesuffix("BECAUSE:").strip()


def _tidy(text: str) -> str:
    return re.sub(r" {2,}", " ", text).strip()


def llava_record(problem: Problem, prompt_format: str) -> dict[str, Any]:
    """One LLaVA training record; the image placeholder follows the question, as in LLaVA's converter."""
    input_format, output_format = split_format(prompt_format)
    question = prompt_text(problem, input_format)
    record: dict[str, Any] = {"id": problem.pid}
    if problem.image:
        record["image"] = f"{problem.pid}/{problem.image}"
        question = f"{question}\n<image>"
    record["conversations"] = [
        {"from": "human", "value": question},
        {"from": "gpt", "value": target_text(problem, output_format)},
    ]
    return record


# LLaVA's scorer: r'The answer is ([A-Z]).' with an unescaped dot (any character), kept as is so
# scores stay comparable with published ones.
_OFFICIAL_PATTERN = re.compile(r"The answer is ([A-Z]).")
_LENIENT_PATTERNS = (
    re.compile(r"^\(?([A-Ea-e])\)?(?:[.:)]|\s|$)"),                      # "B", "(B)", "b.", "B) text"
    re.compile(r"answer(?: is)?:?\s*\(?([A-Ea-e])\)?(?![A-Za-z])", re.IGNORECASE),  # "the answer is (b)", "Answer: C"
)


def parse_answer(text: str, num_choices: int, mode: str = "official") -> int | None:
    """The chosen option's index, or None when the text gives no single valid option.

    ``official`` is the rule of LLaVA's ScienceQA scorer: the text is exactly an option letter, or
    starts with "X. ", or contains "The answer is X." exactly once. ``lenient`` also accepts
    "(B)", lowercase letters, and "the answer is b" with text around it; answers naming two
    different options stay unparsed in both modes.
    """
    if mode not in PARSE_MODES:
        raise ConfigError(f"parse={mode!r}: choose one of {', '.join(PARSE_MODES)}")
    letters = OPTION_LETTERS[:num_choices]
    text = text.strip()
    letter: str | None = None
    if len(text) == 1 and text in letters:
        letter = text
    elif len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _OFFICIAL_PATTERN.findall(text)
        letter = found[0] if len(found) == 1 else None
    if letter is None and mode == "lenient":
        letter = _lenient_letter(text)
    return letters.index(letter) if letter is not None and letter in letters else None


def _lenient_letter(text: str) -> str | None:
    stated = {match.upper() for pattern in _LENIENT_PATTERNS[1:] for match in pattern.findall(text)}
    if len(stated) == 1:
        return stated.pop()
    if stated:
        return None  # two different answers
    start = _LENIENT_PATTERNS[0].match(text)
    if not start:
        return None
    letter = start.group(1).upper()
    # "A or B": another option letter standing alone makes it two answers.
    others = set(re.findall(r"\b([A-E])\b", text[start.end() :])) - {letter}
    return None if others else letter
