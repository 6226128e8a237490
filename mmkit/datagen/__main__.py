"""Write instruction data with a teacher, about the synthetic world or your own annotated
images: LLaVA JSON, shards and a quality report.

    python -m mmkit.datagen --teacher rules --split train --count 1000 --seed 1 --out data/instruct
    python -m mmkit.datagen --source coco \
        --source-option captions=coco/annotations/captions_val2017.json \
        --source-option instances=coco/annotations/instances_val2017.json \
        --teacher openai --option base_url=http://127.0.0.1:8000/v1 --option model=gpt-4o \
        --option concurrency=8 --prompts LLaVA/playground/data/prompts --count 500 --out data/coco_instruct
    python -m mmkit.datagen --source jsonl --source-option path=my_images.jsonl --teacher openai \
        --option model=gpt-4o --dry-run --price-in 2.5 --price-out 10

Sources (``--source``): ``synthetic`` (the default: the synthetic world's scenes, rendered;
``--split`` and ``--resolution`` apply to it only), ``coco`` (``captions=`` and ``instances=``
annotation files, ``images=`` their image folder) and ``jsonl`` (``path=`` a file of one image a
line: ``image``, ``captions``, ``boxes`` with ``label`` and ``bbox``; ``images=`` its image
folder). ``--prompts DIR`` points the openai teacher at few-shot prompt folders in LLaVA's
layout (a folder holding ``conversation/``, ``detail_description/`` and ``complex_reasoning/``,
each with ``system_message.txt`` and ``000_caps.txt`` / ``000_conv.txt`` pairs), or ``--prompts
TYPE=DIR`` at one type's folder; mmkit's own prompts serve otherwise. ``--dry-run`` prints the
requests, their prompt tokens by type and, with ``--price-in`` / ``--price-out`` (dollars per
million tokens), the cost, and sends and writes nothing.

Writes into ``--out``:

- ``datagen.json``: what the folder holds (source, teacher, their options, seed);
- ``images/<scene_id>.png`` (the synthetic source; the others' images stay where they are);
- ``records.jsonl``: every image's records as they are written (one line per conversation, or per
  response the teacher could not use, with its ``type`` and, for a failure, the ``error``);
- ``<split>.json`` (synthetic) or ``llava_instruct.json``: LLaVA's JSON (``id``, ``image``
  relative to the image folder, ``conversations``), in the source's order;
- ``shards/``: WebDataset shards of it and their ``manifest.json`` (unless ``--no-shards``);
- ``quality.json``, ``quality.md``, ``quality.png``: conversations that mention an object their
  image's boxes and captions lack (a hallucination proxy), lengths by type, duplicates;

then prints counts by response type, the failures and the quality figures.

Interrupted (even by ``kill -9``), the same command continues where it stopped: images whose
records are all in ``records.jsonl`` are skipped, a half-written tail is dropped, and the result
is the same as an uninterrupted run's. A larger ``--count`` extends a folder; a different
source, teacher, seed or option is refused rather than mixed in (options that do not change what
is written, such as the openai teacher's ``concurrency``, ``max_retries`` or ``cache_dir``, may
change between runs). ``--option`` and ``--source-option`` values are read as JSON when they
parse (``4``, ``0.5``, ``null``, ``["detailed"]``) and as strings otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from mmkit.core.errors import ConfigError, MmkitError
from mmkit.datagen.cost import dry_run
from mmkit.datagen.writer import DatagenSettings, write_dataset

SYNTHETIC = "synthetic"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one "error:" line, like every other mmkit failure
        print(f"error: {message} (see python -m mmkit.datagen --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m mmkit.datagen",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--source", default=SYNTHETIC,
                        help="annotation source: synthetic (default), coco, jsonl, or a plugin's")
    parser.add_argument(
        "--source-option", action="append", default=[], metavar="KEY=VALUE",
        help="a source option; repeat for several (e.g. --source-option captions=captions_val2017.json)",
    )
    parser.add_argument("--teacher", required=True, help="registered teacher: rules, caption, openai, or a plugin's")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="a teacher constructor option; repeat for several (e.g. --option model=gpt-4o)",
    )
    parser.add_argument(
        "--prompts", action="append", default=[], metavar="DIR|TYPE=DIR",
        help="few-shot prompt folders in LLaVA's layout: one holding its three type folders, or TYPE=DIR "
             "(conversation, detailed, reasoning); repeatable",
    )
    parser.add_argument("--split", default=None, help="synthetic source: train, val or test (default: train)")
    parser.add_argument("--count", type=int, default=None,
                        help="number of images (the first N of the source; required for the synthetic source)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=None, help="synthetic source: image side in pixels (64)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (resumed if it holds a previous run)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--no-shards", action="store_true", help="write the LLaVA JSON only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the requests, prompt tokens and cost a run would have; send and write nothing")
    parser.add_argument("--price-in", type=float, default=None, metavar="USD",
                        help="dry run: dollars per million prompt tokens")
    parser.add_argument("--price-out", type=float, default=None, metavar="USD",
                        help="dry run: dollars per million reply tokens")
    return parser


def parse_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option {pair!r}: expected KEY=VALUE")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


def parse_prompts(values: list[str]) -> str | dict[str, str] | None:
    """``--prompts`` as the openai teacher's ``prompts`` option: one folder holding LLaVA's three,
    or ``TYPE=DIR`` folders (absolute paths, so a resumed run from elsewhere is the same run)."""
    if not values:
        return None
    by_type = {}
    for value in values:
        response_type, sep, folder = value.partition("=")
        if not sep:
            if len(values) > 1:
                raise ConfigError(f"--prompts {value}: one folder holding LLaVA's three, or TYPE=DIR folders, not both")
            return str(Path(value).resolve())
        by_type[response_type.strip()] = str(Path(folder).resolve())
    return by_type


def settings_from(args: argparse.Namespace) -> DatagenSettings:
    """The parsed flags as the writer's settings; a value out of range is refused here, by its flag."""
    if args.count is not None and args.count < 1:
        raise ConfigError(f"--count={args.count}: must be at least 1")
    if args.samples_per_shard < 1:
        raise ConfigError(f"--samples-per-shard={args.samples_per_shard}: must be at least 1")
    for flag, price in (("--price-in", args.price_in), ("--price-out", args.price_out)):
        if price is not None and price < 0:
            raise ConfigError(f"{flag}={price}: must be at least 0")
    source_options = parse_options(args.source_option)
    if args.source == SYNTHETIC:
        source_options = {**_synthetic_options(args), **source_options}
    else:
        given = [flag for flag, value in (("--split", args.split), ("--resolution", args.resolution)) if value is not None]
        if given:
            raise ConfigError(f"{given[0]}: only the synthetic source takes it; {args.source}'s images come from its "
                              "annotations")
    options = parse_options(args.option)
    prompts = parse_prompts(args.prompts)
    if prompts is not None:
        options["prompts"] = prompts
    return DatagenSettings(
        source=args.source, source_options=source_options, teacher=args.teacher, options=options, count=args.count,
        seed=args.seed, out=args.out, samples_per_shard=args.samples_per_shard, shards=not args.no_shards,
        progress=not args.no_progress,
    )


def _synthetic_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.count is None:
        raise ConfigError("--count: the synthetic source makes as many scenes as asked for; give --count")
    resolution = 64 if args.resolution is None else args.resolution
    if resolution < 8:
        raise ConfigError(f"--resolution={resolution}: must be at least 8 pixels")
    return {"split": args.split or "train", "seed": args.seed, "resolution": resolution, "count": args.count,
            "images": str(args.out / "images")}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
        print(dry_run(settings, args.price_in, args.price_out) if args.dry_run else write_dataset(settings))
        return 0
    except MmkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
