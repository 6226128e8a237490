"""Few-shot prompts for a text-only chat model that writes LLaVA's three response types, kept as
folders in LLaVA's layout, and parsers that turn its replies back into conversations.

A prompt folder (LLaVA's ``playground/data/prompts/<type>/``) holds ``system_message.txt`` and
example pairs ``000_caps.txt`` / ``000_conv.txt``, ``001_caps.txt`` / ``001_conv.txt``, ...: an
image's context as the teacher reads it, and the reply wanted for it. A request is the system
message, each example as a user message (its caps) and an assistant message (its conv), in the
order of their numbers, then the image's own context (:func:`format_context`, the caps files'
layout: the captions one a line, a blank line, then ``label: [x1, y1, x2, y2]`` lines; without
the boxes when the examples have none, as in LLaVA's conversation prompt).

LLaVA names the folders ``conversation``, ``detail_description`` and ``complex_reasoning``
(:data:`LLAVA_FOLDERS`); ``--prompts DIR`` takes a folder holding those three (LLaVA's
``playground/data/prompts``), or ``--prompts TYPE=DIR`` one type's folder. mmkit's own prompts
(``mmkit/datagen/prompt_folders/``, our wording and examples, written for the synthetic world)
serve where none is given. Replies with questions use ``Question:`` / ``Answer:`` blocks, with or
without LLaVA's ``===`` lines between them, which :func:`parse_reply` reads back.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mmkit.core.errors import ConfigError
from mmkit.datagen.teacher import IMAGE_PLACEHOLDER, RESPONSE_TYPES, UnusableOutput

# mmkit's response types and the folder names LLaVA gives them.
LLAVA_FOLDERS: dict[str, str] = {
    "conversation": "conversation", "detailed": "detail_description", "reasoning": "complex_reasoning",
}
SHIPPED_PROMPTS = Path(__file__).parent / "prompt_folders"
SYSTEM_MESSAGE = "system_message.txt"
_EXAMPLE_FILE = re.compile(r"^(\d+)_(caps|conv)\.txt$")
_BOX_LINE = re.compile(r"^.+: \[[^\]]*\]$", re.MULTILINE)


@dataclass(frozen=True)
class FewShotPrompt:
    """One response type's prompt: a system message and (context, reply) examples, in order."""

    folder: Path
    system: str
    examples: tuple[tuple[str, str], ...]

    @property
    def with_boxes(self) -> bool:
        """Whether an image's context lists its boxes: as the examples' do. LLaVA's conversation
        prompt shows the captions only; its description and reasoning prompts add the boxes."""
        return not self.examples or any(_BOX_LINE.search(caps) for caps, _ in self.examples)

    def messages(self, view: dict[str, Any]) -> list[dict[str, str]]:
        """The chat messages that ask for this type about the image ``view``."""
        context = format_context(view if self.with_boxes else {**view, "objects": []})
        messages = [{"role": "system", "content": self.system}]
        for caps, conv in self.examples:
            messages.append({"role": "user", "content": caps})
            messages.append({"role": "assistant", "content": conv})
        messages.append({"role": "user", "content": context})
        return messages


def load_prompt_folder(folder: Path, key: str = "--prompts") -> FewShotPrompt:
    """The prompt in ``folder``, its files read verbatim (less a trailing newline). A folder
    without a system message is refused; a caps file whose conv file is missing (or the reverse)
    is left out with a warning naming it."""
    folder = Path(folder)
    if not (folder / SYSTEM_MESSAGE).is_file():
        raise ConfigError(f"{key}: {folder} has no {SYSTEM_MESSAGE} (a prompt folder in LLaVA's layout has "
                          f"{SYSTEM_MESSAGE} and pairs 000_caps.txt / 000_conv.txt)")
    pairs: dict[str, dict[str, str]] = {}
    for path in sorted(folder.iterdir()):
        match = _EXAMPLE_FILE.match(path.name)
        if match:
            pairs.setdefault(match[1], {})[match[2]] = _read(path)
    for number, pair in sorted(pairs.items()):
        if len(pair) != 2:
            have, lacks = ("caps", "conv") if "caps" in pair else ("conv", "caps")
            warnings.warn(f"{key}: {folder / f'{number}_{have}.txt'} has no {number}_{lacks}.txt beside it; "
                          "that example is left out", UserWarning, stacklevel=2)
    examples = tuple((pair["caps"], pair["conv"]) for _, pair in sorted(pairs.items(), key=lambda item: int(item[0]))
                     if len(pair) == 2)
    return FewShotPrompt(folder=folder, system=_read(folder / SYSTEM_MESSAGE), examples=examples)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8").rstrip("\n")


def prompt_folders(prompts: str | Path | Mapping[str, str | Path] | None, types: tuple[str, ...]) -> dict[str, Path]:
    """The folder of each response type: from a folder holding LLaVA's three (``str``), from one
    folder per type (a mapping), the shipped ones for the rest."""
    chosen = {t: SHIPPED_PROMPTS / LLAVA_FOLDERS[t] for t in types}
    if prompts is None:
        return chosen
    if isinstance(prompts, Mapping):
        unknown = sorted(set(prompts) - set(RESPONSE_TYPES))
        if unknown:
            raise ConfigError(f"--prompts {unknown[0]}=...: choose a response type of {', '.join(RESPONSE_TYPES)}")
        return {**chosen, **{t: Path(folder) for t, folder in prompts.items() if t in types}}
    root = Path(prompts)
    if not root.is_dir():
        raise ConfigError(f"--prompts {prompts}: no such folder")
    missing = [LLAVA_FOLDERS[t] for t in types if not (root / LLAVA_FOLDERS[t]).is_dir()]
    if missing:
        raise ConfigError(f"--prompts {prompts}: no {', '.join(missing)} folder in it (LLaVA's playground/data/prompts "
                          "layout), or give one type's folder with --prompts TYPE=DIR")
    return {t: root / LLAVA_FOLDERS[t] for t in types}


def load_prompts(prompts: str | Path | Mapping[str, str | Path] | None, types: tuple[str, ...]) -> dict[str, FewShotPrompt]:
    """Each response type's prompt, read from :func:`prompt_folders`."""
    return {t: load_prompt_folder(folder, f"--prompts {t}") for t, folder in prompt_folders(prompts, types).items()}


SHIPPED: dict[str, FewShotPrompt] = load_prompts(None, RESPONSE_TYPES)
SYSTEM_PROMPTS: dict[str, str] = {t: prompt.system for t, prompt in SHIPPED.items()}


def format_context(view: dict[str, Any]) -> str:
    """An image's view as the teacher reads it, in LLaVA's caps layout: the captions one a line,
    a blank line, then ``label: [x1, y1, x2, y2]`` (fractions, 3 decimals) a line."""
    lines = [str(caption) for caption in view["captions"]]
    if view["objects"]:
        lines.append("")
    for annotation in view["objects"]:
        box = ", ".join(repr(round(float(c), 3)) for c in annotation["bbox"])
        lines.append(f"{annotation['category']}: [{box}]")
    return "\n".join(lines)


def build_messages(response_type: str, view: dict[str, Any], prompts: Mapping[str, FewShotPrompt] = SHIPPED
                   ) -> list[dict[str, str]]:
    """The chat messages that ask for ``response_type`` about the image ``view``."""
    if response_type not in prompts:
        raise ValueError(f"no prompt for response type {response_type!r}; known: {', '.join(prompts)}")
    return prompts[response_type].messages(view)


# ---------------------------------------------------------------------------------------------
# Reading replies back

# "Question: ...", "**Question 2:** ...", "Q: ...", "- Answer: ..." (the label and what follows).
_LABEL = re.compile(r"^[\s*_#>-]*(question|answer|q|a)\s*\d*\s*[*_]*\s*[:：][*_\s]*(.*)$", re.IGNORECASE)
# LLaVA's few-shot replies put a line of "===" between a question and its answer.
_SEPARATOR = re.compile(r"^\s*={3,}\s*$")
# What would give away that the teacher read notes rather than saw the image.
_LEAKS = re.compile(
    r"bounding box|\bcaptions?\b|\bannotat\w*|\bcoordinates?\b|\[\s*\d*\.\d+\s*,\s*\d*\.\d+", re.IGNORECASE
)


def parse_reply(response_type: str, text: str) -> list[tuple[str, str]]:
    """(question, answer) pairs from a reply of ``response_type``; a ``detailed`` reply gives one
    pair with an empty question (the caller draws the instruction). Raises UnusableOutput."""
    if not isinstance(text, str) or not text.strip():
        raise UnusableOutput(response_type, "the reply is empty")
    if IMAGE_PLACEHOLDER in text:
        raise UnusableOutput(response_type, f"the reply contains the image placeholder {IMAGE_PLACEHOLDER}")
    leak = _LEAKS.search(text)
    if leak:
        raise UnusableOutput(response_type, f"the reply mentions the notes ({leak.group(0)!r}) instead of the image")
    if response_type == "detailed":
        return [("", _parse_description(text))]
    pairs = _parse_pairs(response_type, text)
    if response_type == "reasoning" and len(pairs) != 1:
        raise UnusableOutput(response_type, f"expected one Question/Answer pair, found {len(pairs)}")
    return pairs


def _parse_description(text: str) -> str:
    lines = text.strip().splitlines()
    if any(_LABEL.match(line) for line in lines):
        raise UnusableOutput("detailed", "a description was asked for, but the reply has Question/Answer lines")
    description = re.sub(r"^\s*(?:detailed\s+)?description\s*:\s*", "", text.strip(), flags=re.IGNORECASE)
    if not description:
        raise UnusableOutput("detailed", "the reply is empty")
    return description


def _parse_pairs(response_type: str, text: str) -> list[tuple[str, str]]:
    blocks: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if _SEPARATOR.match(line):
            continue
        match = _LABEL.match(line)
        if match:
            label = "question" if match[1].lower() in ("question", "q") else "answer"
            blocks.append((label, [match[2]]))
        elif blocks:
            blocks[-1][1].append(line)
        # Lines before the first label (a preamble such as "Sure, here you go:") are dropped.
    if not blocks:
        raise UnusableOutput(response_type, "no 'Question:' / 'Answer:' lines in the reply")
    pairs: list[tuple[str, str]] = []
    question: str | None = None
    for label, lines in blocks:
        content = "\n".join(line.rstrip() for line in lines).strip()
        number = len(pairs) + 1
        if not content:
            raise UnusableOutput(response_type, f"{label} {number} is empty")
        if label == "question":
            if question is not None:
                raise UnusableOutput(response_type, f"question {number} has no answer")
            question = content
        else:
            if question is None:
                raise UnusableOutput(response_type, f"answer {number} has no question before it")
            pairs.append((question, content))
            question = None
    if question is not None:
        raise UnusableOutput(response_type, f"question {len(pairs) + 1} has no answer (was the reply cut off?)")
    return pairs
