"""A stage's training data inspected exactly as training will see it: each stored sample through
the same ``SampleEncoder``, rendered with its trained tokens highlighted, and counted when
training would learn nothing from it. ``python -m mmkit.check_data`` builds the context from a
config and runs :func:`run_check`."""
from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import webdataset as wds

from mmkit.core.errors import DataError
from mmkit.data.llava_records import IMAGE_EXTENSIONS
from mmkit.data.samples import SampleEncoder, SkippedSample
from mmkit.data.templates.llava_tokenization import IGNORE_INDEX

GREEN_BOLD, RESET = "\033[1;32m", "\033[0m"


@dataclass
class CheckContext:
    """Everything built from the config that inspecting a sample needs."""

    sample_encoder: SampleEncoder
    image_token_id: int
    urls: tuple[str, ...]
    description: str


@dataclass
class SampleCheck:
    """What one stored sample turns into, and what is wrong with it."""

    key: str
    input_ids: list[int] | None  # None when the template cannot encode the record at all
    labels: list[int] | None
    num_images: int
    skip_reason: str | None  # from the real SampleEncoder.__call__
    empty_labels: bool = False
    image_token_error: str | None = None

    @property
    def problems(self) -> list[str]:
        found = ["empty labels"] if self.empty_labels else []
        found += [self.image_token_error] if self.image_token_error else []
        return found + ([f"skipped: {self.skip_reason}"] if self.skip_reason else [])


@dataclass
class Tally:
    """Counts over every checked sample, for the summary and the exit status."""

    samples: int = 0
    encoded: int = 0
    empty_labels: int = 0
    wrong_image_tokens: int = 0
    skip_reasons: Counter = field(default_factory=Counter)
    skip_examples: dict[str, str] = field(default_factory=dict)
    problem_keys: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    trained: list[int] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return sum(self.skip_reasons.values())


def read_samples(urls: Sequence[str], limit: int | None) -> Iterator[dict[str, Any]]:
    """Samples in stored order, as raw members (the form SampleEncoder receives in training)."""
    dataset = wds.WebDataset(list(urls), shardshuffle=False, nodesplitter=None, empty_check=False)
    return itertools.islice(iter(dataset), limit)


def encode_for_inspection(sample: dict[str, Any], context: CheckContext) -> tuple[list[int], list[int]] | None:
    """Ids and labels from the stage's template, even for samples SampleEncoder would then skip
    (too long, no trained tokens), so those can be shown and counted too."""
    encoder = context.sample_encoder
    try:
        record = json.loads(sample["json"])
        encoded = encoder.template.encode(record["conversations"], encoder.tokenizer, encoder.num_image_tokens)
    except (KeyError, TypeError, ValueError, DataError):
        return None  # not encodable at all; SampleEncoder reports the reason as a skip
    return encoded.input_ids, encoded.labels


def check_sample(sample: dict[str, Any], context: CheckContext) -> SampleCheck:
    result = context.sample_encoder(sample)  # the real thing: its skip reasons are what training records
    encoded = encode_for_inspection(sample, context)
    check = SampleCheck(
        key=str(sample.get("__key__", "?")),
        input_ids=encoded[0] if encoded else None,
        labels=encoded[1] if encoded else None,
        # SampleEncoder uses the first image member only, so a sample has at most one image.
        num_images=int(any(ext in sample for ext in IMAGE_EXTENSIONS)),
        skip_reason=result.reason if isinstance(result, SkippedSample) else None,
    )
    if check.labels is not None:
        check.empty_labels = all(label == IGNORE_INDEX for label in check.labels)
    if check.input_ids is not None:
        found = check.input_ids.count(context.image_token_id)
        expected = check.num_images * context.sample_encoder.num_image_tokens
        if found != expected:
            check.image_token_error = f"wrong image-token count ({found}, expected {expected})"
    return check


def add_to_tally(tally: Tally, check: SampleCheck) -> None:
    tally.samples += 1
    if check.skip_reason is None:
        tally.encoded += 1
    else:
        # Numbers vary per sample ("612 tokens exceed..."); grouping needs the reason's shape.
        reason = re.sub(r"\d+", "N", check.skip_reason)
        tally.skip_reasons[reason] += 1
        example = check.key if reason == check.skip_reason else f"{check.key}: {check.skip_reason}"
        tally.skip_examples.setdefault(reason, example)
    tally.empty_labels += check.empty_labels
    tally.wrong_image_tokens += check.image_token_error is not None
    if check.problems:
        tally.problem_keys.append(check.key)
    if check.input_ids is not None and check.labels is not None:
        tally.lengths.append(len(check.input_ids))
        tally.trained.append(sum(label != IGNORE_INDEX for label in check.labels))


# --- output -------------------------------------------------------------------------------


def render_sample(check: SampleCheck, context: CheckContext, color: bool) -> str:
    """The text the model reads, trained spans marked, each image's tokens shown as one tag."""
    header = f"--- sample {check.key}"
    if check.input_ids is None or check.labels is None:
        return f"{header}: cannot be encoded ({check.skip_reason})"
    trained = sum(label != IGNORE_INDEX for label in check.labels)
    header += f" ({len(check.input_ids)} tokens, {trained} trained)"
    if check.problems:
        header += " PROBLEM: " + "; ".join(check.problems)
    return f"{header}\n{render_tokens(check.input_ids, check.labels, context, color)}"


def render_tokens(input_ids: list[int], labels: list[int], context: CheckContext, color: bool) -> str:
    tokenizer = context.sample_encoder.tokenizer

    def kind(position: int) -> str:
        if input_ids[position] == context.image_token_id:
            return "image"
        return "trained" if labels[position] != IGNORE_INDEX else "context"

    pieces: list[str] = []
    # Runs of one kind are decoded together: decoding token by token would split multi-byte characters.
    for run_kind, positions in itertools.groupby(range(len(input_ids)), key=kind):
        ids = [input_ids[p] for p in positions]
        if run_kind == "image":
            pieces.append(f"<image x{len(ids)}>")
            continue
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if run_kind == "trained":
            text = f"{GREEN_BOLD}{text}{RESET}" if color else f"[[{text}]]"
        pieces.append(text)
    return "".join(pieces)


def summary_lines(tally: Tally, context: CheckContext) -> list[str]:
    def stats(values: list[int]) -> str:
        return f"{min(values)} / {sum(values) / len(values):.1f} / {max(values)}" if values else "-"

    problems = len(tally.problem_keys)
    rows = [
        ("samples checked", tally.samples),
        ("encoded for training", tally.encoded),
        ("skipped by SampleEncoder", tally.skipped),
        ("empty labels", tally.empty_labels),
        ("wrong image-token count", tally.wrong_image_tokens),
        ("tokens min / mean / max", stats(tally.lengths)),
        ("trained tokens min / mean / max", stats(tally.trained)),
    ]
    lines = ["", f"summary ({context.description})"]
    lines += [f"  {label:<32}{value:>20}" for label, value in rows]
    for reason, count in tally.skip_reasons.most_common():
        lines.append(f"  skip reason x{count}: {reason}  (e.g. {tally.skip_examples[reason]})")
    if problems:
        shown = ", ".join(tally.problem_keys[:8]) + (" ..." if problems > 8 else "")
        lines.append(f"  problem samples: {shown}")
    if not tally.samples:
        lines.append("FAIL: no samples to check (the shards are empty)")
    else:
        lines.append(f"{'FAIL' if problems else 'OK'}: {problems} problems in {tally.samples} samples")
    return lines


def run_check(context: CheckContext, num_render: int, limit: int | None, color: bool) -> Tally:
    tally = Tally()
    print(context.description)
    for sample in read_samples(context.urls, limit):
        check = check_sample(sample, context)
        if tally.samples < num_render:
            print(render_sample(check, context, color))
        add_to_tally(tally, check)
    print("\n".join(summary_lines(tally, context)))
    return tally
