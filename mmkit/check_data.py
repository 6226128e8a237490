"""Check a stage's training data exactly as training will see it, before spending compute on it.

    python -m mmkit.check_data                                   # the recipe's last stage
    python -m mmkit.check_data --stage pretrain --samples 5
    python -m mmkit.check_data --stage finetune template=llava_v0 data.finetune.count=50

Reads the stage's shards in order through the same template, tokenizer and ``SampleEncoder``
that training builds, renders a few samples with the trained tokens highlighted, and counts
the samples training would learn nothing from. Exit status: 0 clean, 1 problems found (so it
can gate a pipeline), 2 bad config.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from omegaconf import DictConfig

from mmkit.core.errors import ConfigError, DataError, MmkitError

IGNORE_INDEX = -100  # same value as mmkit.data.templates.template; repeated so --help stays light
GREEN_BOLD, RESET = "\033[1;32m", "\033[0m"


@dataclass
class CheckContext:
    """Everything built from the config that inspecting a sample needs."""

    sample_encoder: Any  # mmkit.data.samples.SampleEncoder (imported lazily: torch is slow to load)
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


# --- config -------------------------------------------------------------------------------


def _count(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return integer


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mmkit.check_data", description=__doc__.split("\n\n")[0],
        epilog="Any other argument is a Hydra override, as for python -m mmkit.train.",
    )
    parser.add_argument("--stage", default=None, help="recipe stage to check (default: the last one)")
    parser.add_argument("--samples", type=_count(0), default=3, help="how many samples to render (default 3)")
    parser.add_argument("--limit", type=_count(1), default=None, help="check at most this many samples (default all)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. template=llava_v0")
    # Intermixed, so options may come after overrides as well as before them.
    return parser.parse_intermixed_args(argv)


def compose_config(overrides: list[str]) -> DictConfig:
    """The config ``python -m mmkit.train OVERRIDES`` would run (same tree, same search path)."""
    from hydra.errors import HydraException

    from mmkit.core.config import compose

    try:
        return compose(overrides)
    except HydraException as exc:
        # Hydra's messages are already specific; keep them to the one line the user reads.
        raise ConfigError(" ".join(str(exc).split())) from None


def pick_stage(cfg: DictConfig, name: str | None) -> str:
    stages = list(cfg.recipe.stages or {})
    if not stages:
        raise ConfigError("recipe.stages is empty: there is no stage to check")
    if name is None:
        return stages[-1]  # the last stage is the one whose data shapes the final model
    if name not in stages:
        raise ConfigError(f"--stage {name}: the recipe has no such stage; stages: {', '.join(stages)}")
    return name


def build_context(cfg: DictConfig, stage_name: str) -> CheckContext:
    """Dataset, tokenizer, template and image geometry, built the way training builds them."""
    from mmkit.core.interfaces import IMAGE_TOKEN
    from mmkit.core.registry import DATASETS, TEMPLATES
    from mmkit.data.images import ImageProcessor
    from mmkit.data.samples import SampleEncoder
    from mmkit.models.build import as_dict, build_model, check_component_names
    from mmkit.models.decoders.hf_causal_lm import prepare_tokenizer

    stage = cfg.recipe.stages[stage_name]
    key = f"recipe.stages.{stage_name}"
    if "path" not in cfg.decoder:
        raise ConfigError(f"decoder.name={cfg.decoder.name!r}: no decoder.path to load its tokenizer from")
    # Names first, so a typo fails in a second instead of after the tokenizer has loaded.
    check_component_names(cfg)
    template = TEMPLATES.build(as_dict(stage.template), f"{key}.template")
    shards = DATASETS.build(as_dict(stage.data), f"{key}.data").shard_set()
    tokenizer = prepare_tokenizer(cfg.decoder.path, cfg.decoder.get("model_max_length"))
    # Only the geometry is needed (image size, image tokens; a resampler's count may depend on the
    # decoder's width), not the weights: the model on the meta device.
    model = build_model(cfg, weights="none")
    sample_encoder = SampleEncoder(
        template,
        tokenizer,
        ImageProcessor(model.encoder.image_stats, cfg.data.image_mode),
        model.num_image_tokens,
        cfg.data.max_length,
    )
    description = (
        f"stage {stage_name}: template {stage.template.name}, dataset {stage.data.name} "
        f"({shards.num_samples} samples in {len(shards.urls)} shards), "
        f"{sample_encoder.num_image_tokens} image tokens, max_length {cfg.data.max_length}"
    )
    return CheckContext(sample_encoder, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), shards.urls, description)


# --- reading and checking -----------------------------------------------------------------


def read_samples(urls: Sequence[str], limit: int | None) -> Iterator[dict[str, Any]]:
    """Samples in stored order, as raw members (the form SampleEncoder receives in training)."""
    import webdataset as wds

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
    from mmkit.data.llava_records import IMAGE_EXTENSIONS
    from mmkit.data.samples import SkippedSample

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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = compose_config(list(args.overrides))
        context = build_context(cfg, pick_stage(cfg, args.stage))
        tally = run_check(context, args.samples, args.limit, color=sys.stdout.isatty())
    except MmkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if tally.problem_keys or not tally.samples else 0


if __name__ == "__main__":
    sys.exit(main())
