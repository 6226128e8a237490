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
import inspect
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn

from mmkit.core.atomic_io import write_text_atomically
from mmkit.core.errors import ConfigError, DataError, MmkitError

IDENTITY_FILE = "datagen.json"
RECORDS_FILE = "records.jsonl"
SHARD_DIR = "shards"
_FORMAT = 1


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


def _output_options(constructor: Any, options: dict[str, Any], operational: frozenset[str]) -> dict[str, Any]:
    """The options that decide what a teacher writes, defaults filled in (so ``turns=3`` given
    and ``turns`` left at its default of 3 are the same run), as plain JSON values."""
    try:
        bound = inspect.signature(constructor).bind_partial(**options)
        bound.apply_defaults()
        resolved = {k: v for k, v in bound.arguments.items() if k != "self"}
    except (TypeError, ValueError):
        resolved = dict(options)
    kept = {k: v for k, v in sorted(resolved.items()) if k not in operational}
    return json.loads(json.dumps(kept, default=str))


def _flat(identity: dict[str, Any]) -> dict[str, Any]:
    """``{"options": {"model": m}}`` as ``{"option model": m}``, so a difference names the option."""
    flat = {key: value for key, value in identity.items() if key != "options"}
    options = identity.get("options")
    flat.update({f"option {key}": value for key, value in (options.items() if isinstance(options, dict) else [])})
    return flat


def check_identity(out: Path, identity: dict[str, Any]) -> bool:
    """Record what ``out`` holds, or check that it matches this run. True when resuming."""
    path = out / IDENTITY_FILE
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            raise DataError(f"{path}: not valid JSON; delete {out} to start over") from None
        if previous != identity:
            before, now = _flat(previous), _flat(identity)
            changed = [
                f"{key}: {json.dumps(before.get(key))} there, {json.dumps(now.get(key))} now"
                for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)
            ]
            raise ConfigError(
                f"--out {out} holds data written with other settings ({'; '.join(changed)}); "
                f"use another --out, or delete that folder to start over"
            )
        return True
    if (out / RECORDS_FILE).exists():
        raise ConfigError(
            f"--out {out} has a {RECORDS_FILE} but no {IDENTITY_FILE}; it was not written by this command"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(identity, indent=1, sort_keys=True))
    return False


def load_records(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The records of every scene that ``path`` holds completely, by scene id.

    A kill can leave a half-written last line, or some but not all of the last scene's lines:
    those are dropped, and the file is rewritten (atomically) without them, so the next append
    starts on a clean line.
    """
    if not path.is_file():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete_lines, tail = lines[:-1], lines[-1]  # the tail is b"" when the file ends in a newline
    by_scene: dict[str, list[dict[str, Any]]] = {}
    kept: list[bytes] = []
    group: list[tuple[dict[str, Any], bytes]] = []

    def close_group() -> None:
        if not group:
            return
        first = group[0][0]
        scene, expected = first["scene"], first["n_outputs"]
        records = [record for record, _ in group if "index" in record]
        if len(records) == expected and scene not in by_scene:
            by_scene[scene] = records
            kept.extend(raw for _, raw in group)
        group.clear()

    for number, raw in enumerate(complete_lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            scene = record["scene"]
            int(record["n_outputs"])
        except (ValueError, KeyError, TypeError):
            if number == len(complete_lines) and not tail:
                break  # a garbled last line: the run died while writing it
            raise DataError(
                f"{path}: line {number} is not a record this command wrote; delete the folder to start over"
            ) from None
        if group and group[0][0]["scene"] != scene:
            close_group()
        group.append((record, raw))
    close_group()
    clean = b"".join(raw + b"\n" for raw in kept)
    if clean != data:
        write_text_atomically(path, clean.decode("utf-8"))
    return by_scene


def scene_lines(scene_id: str, records: list[dict[str, Any]]) -> str:
    """``records.jsonl`` lines for one scene; each carries the scene and how many records it has,
    so a scene cut short by a kill is recognised and written again."""
    if not records:  # a scene the teacher wrote nothing about still counts as done
        return json.dumps({"scene": scene_id, "n_outputs": 0}) + "\n"
    lines = [
        json.dumps({"scene": scene_id, "index": index, "n_outputs": len(records), **record}, ensure_ascii=False)
        for index, record in enumerate(records)
    ]
    return "".join(line + "\n" for line in lines)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mmkit.core.registry import TEACHERS, load_components
    from mmkit.datagen.teacher import build_teacher
    from mmkit.synth.llava_data import (
        LLAVA_KEYS,
        image_name,
        save_image,
        scene_records,
        teach,
    )
    from mmkit.synth.world import generate_scenes

    if args.count < 1:
        raise ConfigError(f"--count={args.count}: must be at least 1")
    if args.resolution < 8:
        raise ConfigError(f"--resolution={args.resolution}: must be at least 8 pixels")
    if args.samples_per_shard < 1:
        raise ConfigError(f"--samples-per-shard={args.samples_per_shard}: must be at least 1")
    options = parse_options(args.option)
    if args.teacher not in TEACHERS:
        load_components()  # a plugin's teacher; the built-in ones are registered already
    teacher = build_teacher(args.teacher, options)
    scenes = generate_scenes(args.split, args.count, args.seed)  # checks the split too

    out: Path = args.out
    identity = {
        "format": _FORMAT,
        "teacher": args.teacher,
        "options": _output_options(TEACHERS.get(args.teacher), options, teacher.operational_options),
        "split": args.split,
        "seed": args.seed,
        "resolution": args.resolution,
    }
    check_identity(out, identity)
    image_dir = out / "images"
    image_dir.mkdir(exist_ok=True)
    for leftover in image_dir.glob(".*.tmp"):  # an image a killed run was saving
        leftover.unlink(missing_ok=True)
    records_path = out / RECORDS_FILE
    done = load_records(records_path)
    todo = [scene for scene in scenes if scene.scene_id not in done]
    resumed = len(scenes) - len(todo)

    bar = tqdm(
        total=len(scenes), initial=resumed, desc=f"{args.split} scenes ({args.teacher})", unit="scene",
        disable=args.no_progress, file=sys.stderr,
    )
    written_now = 0
    try:
        with open(records_path, "a", encoding="utf-8") as handle:
            for scene, outcomes in teach(teacher, todo, args.seed):
                save_image(scene, image_dir, args.resolution)  # before its records: done means complete
                records = scene_records(scene, outcomes)
                handle.write(scene_lines(scene.scene_id, records))
                handle.flush()
                done[scene.scene_id] = records
                written_now += 1
                bar.update()
    except MmkitError as exc:
        bar.close()
        kind = ConfigError if isinstance(exc, ConfigError) else DataError
        raise kind(
            f"{exc} ({resumed + written_now} of {len(scenes)} scenes are saved in {out}; "
            f"run the same command again to continue)"
        ) from None
    bar.close()

    for scene in scenes:  # images of resumed scenes, should any have gone missing
        if not (image_dir / image_name(scene)).is_file():
            save_image(scene, image_dir, args.resolution)

    by_type: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    failures: list[str] = []
    llava: list[dict[str, Any]] = []
    for scene in scenes:
        for record in done[scene.scene_id]:
            if "error" in record:
                failed[record["type"]] += 1
                failures.append(f"{record['id']} ({record['type']}): {record['error']}")
            else:
                by_type[record["type"]] += 1
                llava.append({key: record[key] for key in LLAVA_KEYS})
    json_path = out / f"{args.split}.json"
    write_text_atomically(json_path, json.dumps(llava))

    shard_note = "no shards (--no-shards)"
    if not args.no_shards:
        from mmkit.data.shards import write_shards

        staging = out / f"{SHARD_DIR}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        report = write_shards(llava, image_dir, staging, args.samples_per_shard, progress=False, total=len(llava))
        if report.skipped:
            raise DataError(f"{len(report.skipped)} record(s) could not be sharded, e.g. {report.skipped[0]}")
        shard_dir = out / SHARD_DIR
        shutil.rmtree(shard_dir, ignore_errors=True)
        os.replace(staging, shard_dir)
        shard_note = f"{len(report.shards)} shard(s) of {report.num_samples} samples in {shard_dir}"

    print(_summary(args, len(scenes), resumed, by_type, failed, failures, teacher.stats(), json_path, shard_note))
    return 0


def _summary(
    args: argparse.Namespace, scenes: int, resumed: int, by_type: Counter, failed: Counter, failures: list[str],
    stats: dict[str, int], json_path: Path, shard_note: str,
) -> str:
    width = max([len("total")] + [len(t) for t in by_type] + [len(t) for t in failed])
    lines = [
        f"{args.teacher} teacher, {args.split} split, seed {args.seed}: {scenes} scenes "
        f"({scenes - resumed} written now, {resumed} from an earlier run)",
        "records by type:",
    ]
    lines += [f"  {kind:<{width}}  {count}" for kind, count in sorted(by_type.items())]
    lines.append(f"  {'total':<{width}}  {sum(by_type.values())}")
    if failed:
        lines.append(f"failed: {sum(failed.values())} ({', '.join(f'{k} {v}' for k, v in sorted(failed.items()))})")
        lines += [f"  {failure}" for failure in failures[:5]]
        if len(failures) > 5:
            lines.append(f"  ... and {len(failures) - 5} more in {args.out / RECORDS_FILE}")
    else:
        lines.append("failed: 0")
    if stats:
        lines.append("teacher: " + ", ".join(f"{key} {value}" for key, value in stats.items()))
    lines.append(f"wrote {json_path} ({sum(by_type.values())} records); {shard_note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except MmkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
