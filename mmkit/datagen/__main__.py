"""Write instruction data about the synthetic world with a teacher: LLaVA JSON and shards.

    python -m mmkit.datagen --teacher rules --split train --count 1000 --seed 1 --out data/instruct
    python -m mmkit.datagen --teacher openai --option base_url=http://127.0.0.1:8000/v1 \\
        --option model=gpt-4o --option concurrency=8 --count 1000 --out data/gpt

Writes into ``--out``:

- ``datagen.json``: what the folder holds (teacher, its options, split, seed, resolution);
- ``images/<scene_id>.png``;
- ``records.jsonl``: every scene's records as they are written (one line per conversation, or per
  response the teacher could not use, with its ``type`` and, for a failure, the ``error``);
- ``<split>.json``: the LLaVA JSON (``id``, ``image``, ``conversations``), in scene order;
- ``shards/``: WebDataset shards of it and their ``manifest.json`` (unless ``--no-shards``);

then prints counts by response type and the failures.

Interrupted (even by ``kill -9``), the same command continues where it stopped: scenes whose
records are all in ``records.jsonl`` are skipped, a half-written tail is dropped, and the result
is the same as an uninterrupted run's. A larger ``--count`` extends a folder; a different
teacher, split, seed, resolution or teacher option is refused rather than mixed in (options that
do not change what is written, such as the openai teacher's ``concurrency``, ``max_retries`` or
``cache_dir``, may change between runs).
``--option`` values are read as JSON when they parse (``4``, ``0.5``, ``null``,
``["detailed"]``) and as strings otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from mmkit.core.errors import ConfigError, MmkitError
from mmkit.datagen.writer import DatagenSettings, write_dataset


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
    parser.add_argument("--teacher", required=True, help="registered teacher: rules, caption, openai, or a plugin's")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="a teacher constructor option; repeat for several (e.g. --option model=gpt-4o)",
    )
    parser.add_argument("--split", default="train", help="train, val or test (default: train)")
    parser.add_argument("--count", type=int, required=True, help="number of scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (resumed if it holds a previous run)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--no-shards", action="store_true", help="write the LLaVA JSON only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
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


def settings_from(args: argparse.Namespace) -> DatagenSettings:
    """The parsed flags as the writer's settings; a value out of range is refused here, by its flag."""
    if args.count < 1:
        raise ConfigError(f"--count={args.count}: must be at least 1")
    if args.resolution < 8:
        raise ConfigError(f"--resolution={args.resolution}: must be at least 8 pixels")
    if args.samples_per_shard < 1:
        raise ConfigError(f"--samples-per-shard={args.samples_per_shard}: must be at least 1")
    return DatagenSettings(
        teacher=args.teacher, options=parse_options(args.option), split=args.split, count=args.count, seed=args.seed,
        resolution=args.resolution, out=args.out, samples_per_shard=args.samples_per_shard,
        shards=not args.no_shards, progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(write_dataset(settings_from(args)))
        return 0
    except MmkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
