"""Quality figures of a teacher's instruction data, and the report written beside it.

A teacher LLM writes conversations about an image it never saw, from its captions and object
boxes; what it adds beyond them is invented. :func:`assess` measures three things a reader of
``python -m mmkit.datagen``'s output should know before training on it: how long the assistant's
answers are per response type, how often an answer names an object the teacher was not shown (a
hallucination *proxy*), and how much of the data repeats itself. :func:`write_quality_report`
writes those figures as ``quality.json``, ``quality.md`` and ``quality.png``;
:func:`summary_lines` gives the few lines a terminal shows.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmkit.core.atomic_io import atomic_path, write_text_atomically

JSON_FILE = "quality.json"
MARKDOWN_FILE = "quality.md"
PLOT_FILE = "quality.png"

# Plurals that adding "s"/"es" misses; read both ways, so a vocabulary may name either form.
IRREGULAR_PLURALS: dict[str, str] = {
    "person": "people", "man": "men", "woman": "women", "child": "children",
    "mouse": "mice", "knife": "knives", "sheep": "sheep",
}
_EXAMPLES = 20
_HISTOGRAM_BINS = 20
_WORD = re.compile(r"[^\W_]+")
# A negated sentence is how LLaVA's prompts want absent objects answered ("No, there is no
# giraffe."), so a mention inside one is no claim that the object is there.
_NEGATION = re.compile(r"\b(?:no|not|none|nothing|neither|nor|without)\b|n['\u2019]t\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass(frozen=True)
class Reviewed:
    """One written conversation with what the teacher was shown about its image."""

    id: str
    type: str
    turns: list[dict[str, str]]
    captions: list[str]
    labels: list[str]  # the object labels of the image's boxes (e.g. "dog", "fire hydrant")


class _ObjectNames:
    """The vocabulary's names in every form a text may use, found in texts longest name first."""

    def __init__(self, vocabulary: Iterable[str]) -> None:
        self.names = sorted({" ".join(_words(name)) for name in vocabulary} - {""})
        self._by_form: dict[tuple[str, ...], str] = {}
        for name in self.names:
            for form in _forms(tuple(name.split())):
                self._by_form.setdefault(form, name)
        self._lengths = sorted({len(form) for form in self._by_form}, reverse=True)

    def name_of(self, label: str) -> str | None:
        """The vocabulary name a box label is a form of, if any."""
        return self._by_form.get(tuple(_words(label)))

    def mentioned(self, text: str) -> list[str]:
        """The names ``text`` mentions, in order of appearance, each once.

        Longer names claim their words first, so the "dog" inside "hot dog" is no mention of a dog."""
        words = _words(text)
        claimed = [False] * len(words)
        found: list[tuple[int, str]] = []
        for length in self._lengths:
            for start in range(len(words) - length + 1):
                span = range(start, start + length)
                name = self._by_form.get(tuple(words[start:start + length]))
                if name is not None and not any(claimed[k] for k in span):
                    for k in span:
                        claimed[k] = True
                    found.append((start, name))
        return list(dict.fromkeys(name for _, name in sorted(found)))


def assess(conversations: Sequence[Reviewed], vocabulary: Iterable[str]) -> dict[str, Any]:
    """The quality figures of a dataset, as a JSON-able dict.

    ``conversations``: the conversation count. ``by_type``: per response type, ``count``, the
    assistant words per conversation (``words_min``, ``words_median``, ``words_p90``, ``words_max``,
    ``words_mean``, and their ``words_histogram``) and ``pairs_mean``, the human/assistant exchanges
    per conversation.
    ``hallucination``: ``flagged`` conversations (an assistant sentence without a negation names a
    ``vocabulary`` object that is neither among the image's labels nor in its captions), their
    ``share``, the share ``by_type``, ``names_checked`` and up to 20 ``examples``.
    ``duplicates``: ``conversations`` repeating an earlier one whole, assistant ``answers``
    repeating an earlier answer anywhere, and up to 20 ``examples`` of repeated conversations.
    """
    names = _ObjectNames(vocabulary)
    flags = [_absent_mention(conversation, names) for conversation in conversations]
    counts = Counter(conversation.type for conversation in conversations)
    flagged_by_type = Counter(c.type for c, flag in zip(conversations, flags) if flag is not None)
    examples = [{"id": c.id, "type": c.type, "absent": flag[0], "sentence": flag[1]}
                for c, flag in zip(conversations, flags) if flag is not None]
    flagged = len(examples)
    return {
        "conversations": len(conversations),
        "by_type": {kind: _lengths([c for c in conversations if c.type == kind]) for kind in sorted(counts)},
        "hallucination": {
            "flagged": flagged,
            "share": _share(flagged, len(conversations)),
            "by_type": {kind: _share(flagged_by_type[kind], counts[kind]) for kind in sorted(counts)},
            "names_checked": len(names.names),
            "examples": examples[:_EXAMPLES],
        },
        "duplicates": _duplicates(conversations),
    }


def write_quality_report(out_dir: Path, report: dict[str, Any]) -> list[Path]:
    """Writes ``quality.json``, ``quality.md`` and ``quality.png`` (the assistant-words histogram
    of each response type) into ``out_dir``, each whole or not at all. Returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path, plot_path = out_dir / JSON_FILE, out_dir / MARKDOWN_FILE, out_dir / PLOT_FILE
    write_text_atomically(json_path, json.dumps(report, indent=2) + "\n")
    write_text_atomically(markdown_path, _markdown(report))
    _write_plot(report, plot_path)
    return [json_path, markdown_path, plot_path]


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few lines for the terminal: conversations, hallucination share and flagged count,
    duplicates, per-type median assistant words."""
    hallucination, duplicates = report["hallucination"], report["duplicates"]
    medians = ", ".join(f"{kind} {figures['words_median']:g}" for kind, figures in report["by_type"].items())
    return [
        f"quality: {report['conversations']} conversations",
        f"  hallucination proxy: {hallucination['share']:.2%} flagged ({hallucination['flagged']})",
        f"  duplicates: conversations {duplicates['conversations']}, assistant answers {duplicates['answers']}",
        f"  median assistant words: {medians or '-'}",
    ]


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _forms(name: tuple[str, ...]) -> set[tuple[str, ...]]:
    """A name and its plurals; a multi-word name inflects its last word ("fire hydrants")."""
    head, last = name[:-1], name[-1]
    endings = {last, last + "s", last + "es"}
    endings |= {plural for singular, plural in IRREGULAR_PLURALS.items() if singular == last}
    endings |= {singular for singular, plural in IRREGULAR_PLURALS.items() if plural == last}
    return {head + (ending,) for ending in endings}


def _sentences(text: str) -> list[str]:
    return [sentence.strip() for sentence in _SENTENCE_END.split(text) if sentence.strip()]


def _absent_mention(conversation: Reviewed, names: _ObjectNames) -> tuple[list[str], str] | None:
    """The absent names the assistant claims and the first sentence claiming one, or None."""
    present = {name for name in map(names.name_of, conversation.labels) if name is not None}
    for caption in conversation.captions:
        present.update(names.mentioned(caption))
    absent: list[str] = []
    first_sentence = ""
    for turn in conversation.turns:
        if turn.get("from") != "gpt":
            continue
        for sentence in _sentences(turn.get("value", "")):
            if _NEGATION.search(sentence):
                continue
            new = [name for name in names.mentioned(sentence) if name not in present and name not in absent]
            if new and not absent:
                first_sentence = sentence
            absent += new
    return (absent, first_sentence) if absent else None


def _lengths(conversations: list[Reviewed]) -> dict[str, Any]:
    words = np.array([sum(len(turn.get("value", "").split()) for turn in c.turns if turn.get("from") == "gpt")
                      for c in conversations], dtype=float)
    pairs = [sum(1 for before, after in zip(c.turns, c.turns[1:])
                 if before.get("from") == "human" and after.get("from") == "gpt") for c in conversations]
    return {
        "count": len(conversations),
        "words_min": round(float(words.min()), 1),
        "words_median": round(float(np.median(words)), 1),
        "words_p90": round(float(np.percentile(words, 90)), 1),
        "words_max": round(float(words.max()), 1),
        "words_mean": round(float(words.mean()), 1),
        "pairs_mean": round(float(np.mean(pairs)), 2),
        "words_histogram": _histogram(words),
    }


def _histogram(words: np.ndarray) -> dict[str, list[float]]:
    # Kept in the report, so that the plot is drawn from the report alone and a report read back can redraw it.
    counts, edges = np.histogram(words, bins=min(_HISTOGRAM_BINS, len(np.unique(words))))
    return {"edges": [round(float(edge), 1) for edge in edges], "counts": [int(count) for count in counts]}


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def _normalised(text: str) -> str:
    return " ".join(text.replace("<image>", "").lower().split())


def _duplicates(conversations: Sequence[Reviewed]) -> dict[str, Any]:
    first_with: dict[tuple[tuple[str, str], ...], str] = {}
    answers_seen: set[str] = set()
    repeated_answers = 0
    examples: list[dict[str, str]] = []
    for conversation in conversations:
        whole = tuple((turn.get("from", ""), _normalised(turn.get("value", ""))) for turn in conversation.turns)
        if whole in first_with:
            examples.append({"id": conversation.id, "same_as": first_with[whole]})
        else:
            first_with[whole] = conversation.id
        for role, answer in whole:
            if role == "gpt":
                repeated_answers += answer in answers_seen
                answers_seen.add(answer)
    return {"conversations": len(examples), "answers": repeated_answers, "examples": examples[:_EXAMPLES]}


def _markdown(report: dict[str, Any]) -> str:
    hallucination, duplicates = report["hallucination"], report["duplicates"]
    lines = [
        "# Instruction data quality",
        "",
        (f"{report['conversations']} conversations. The hallucination figure is a **proxy**: a conversation is "
         f"flagged when an assistant sentence without a negation names one of {hallucination['names_checked']} known "
         "object names (singular or plural, whole words, longer names first) that is neither among the image's box "
         "labels nor in its captions. It misses invented attributes, counts, positions and relations, objects outside "
         "the vocabulary and synonyms of the names; it wrongly counts a name used figuratively, and it trusts every "
         "negated sentence."),
        "",
        "## Assistant words per conversation, by response type",
        "",
        "| type | count | min | median | p90 | max | mean | pairs/conversation |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {kind} | {f['count']} | {f['words_min']:g} | {f['words_median']:g} | {f['words_p90']:g} "
              f"| {f['words_max']:g} | {f['words_mean']:g} | {f['pairs_mean']:g} |"
              for kind, f in report["by_type"].items()]
    lines += ["", "## Hallucination proxy, by response type", "", "| type | flagged share |", "|---|---:|"]
    lines += [f"| {kind} | {share:.2%} |" for kind, share in hallucination["by_type"].items()]
    lines += [f"| all | {hallucination['share']:.2%} ({hallucination['flagged']} flagged) |",
              "", "## Duplicates", "", "| repeated | count |", "|---|---:|",
              f"| whole conversations | {duplicates['conversations']} |",
              f"| assistant answers | {duplicates['answers']} |",
              "", "## Flagged examples", ""]
    lines += [f"- `{example['id']}` ({example['type']}): {', '.join(example['absent'])} — \"{example['sentence']}\""
              for example in hallucination["examples"]] or ["None."]
    return "\n".join(lines) + "\n"


def _write_plot(report: dict[str, Any], path: Path) -> None:
    # Deferred: matplotlib takes a second to import, and only the plot needs it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_type = report["by_type"]
    figure, axes = plt.subplots(1, max(1, len(by_type)), figsize=(4.5 * max(1, len(by_type)), 3.5), squeeze=False)
    for panel, (kind, figures) in zip(axes[0], by_type.items()):
        histogram = figures["words_histogram"]
        panel.stairs(histogram["counts"], histogram["edges"], fill=True, color="tab:blue")
        panel.axvline(figures["words_median"], color="black", linestyle="--", label=f"median {figures['words_median']:g}")
        panel.set_title(f"{kind} (n={figures['count']})")
        panel.set_xlabel("assistant words per conversation")
        panel.set_ylabel("conversations")
        panel.legend(fontsize=8)
    if not by_type:
        axes[0][0].text(0.5, 0.5, "no conversations", ha="center", va="center")
        axes[0][0].set_axis_off()
    figure.tight_layout()
    try:
        # The temporary name has no .png suffix, so the format is named.
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png", dpi=100)
    finally:
        plt.close(figure)
