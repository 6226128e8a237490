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
import sys
from typing import TYPE_CHECKING, Sequence

from omegaconf import DictConfig

from mmkit.core.errors import ConfigError, MmkitError

if TYPE_CHECKING:
    from mmkit.data.inspection import CheckContext


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

    # Deferred: composing registers mmkit's config schema, which --help never needs.
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
    # Deferred: these import torch and transformers; --help and a bad command line answer first.
    from mmkit.core.interfaces import IMAGE_TOKEN
    from mmkit.core.registry import DATASETS, TEMPLATES
    from mmkit.data.images import ImageLimits, ImageProcessor
    from mmkit.data.inspection import CheckContext
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
    tokenizer = prepare_tokenizer(cfg.decoder.path, cfg.decoder.get("model_max_length"), cfg.decoder.get("gguf_file"),
                                  trust_remote_code=bool(cfg.decoder.get("trust_remote_code", False)))
    # Only the geometry is needed (image size, image tokens; a resampler's count may depend on the
    # decoder's width), not the weights: the model on the meta device.
    model = build_model(cfg, weights="none")
    sample_encoder = SampleEncoder(
        template,
        tokenizer,
        ImageProcessor(model.encoder.image_stats, cfg.data.image_mode, ImageLimits.from_config(cfg.get("image_limits"))),
        model.num_image_tokens,
        cfg.data.max_length,
        too_long=cfg.data.too_long,
        leading_gpt_turn=cfg.data.leading_gpt_turn,
    )
    description = (
        f"stage {stage_name}: template {stage.template.name}, dataset {stage.data.name} "
        f"({shards.num_samples} samples in {len(shards.urls)} shards), "
        f"{sample_encoder.num_image_tokens} image tokens, max_length {cfg.data.max_length}"
    )
    return CheckContext(sample_encoder, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), shards.urls, description)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Deferred with build_context's imports: webdataset loads torch.
    from mmkit.data.inspection import run_check

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
