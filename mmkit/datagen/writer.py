"""Write a teacher's instruction data about the synthetic world into a folder, resumably.

The work behind ``python -m mmkit.datagen`` once its flags are parsed; the folder's layout and
the resume rules are in that command's help. :func:`write_dataset` runs the steps in order:
build the teacher, check that the folder holds this run's data (:func:`check_identity`), read
the scenes already done (:func:`load_records`), teach the others while appending their records,
then write the LLaVA JSON, the shards and a summary.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mmkit.core.atomic_io import write_text_atomically
from mmkit.core.errors import ConfigError, DataError, MmkitError
from mmkit.core.registry import TEACHERS, load_components
from mmkit.data.shards import write_shards
from mmkit.datagen.teacher import Teacher, build_teacher
from mmkit.synth.llava_data import LLAVA_KEYS, image_name, save_image, scene_records, teach
from mmkit.synth.world import Scene, generate_scenes

IDENTITY_FILE = "datagen.json"
RECORDS_FILE = "records.jsonl"
SHARD_DIR = "shards"
_FORMAT = 1


@dataclass(frozen=True)
class DatagenSettings:
    """What to write and where: the command's flags, checked, with ``--option`` parsed."""

    teacher: str
    options: dict[str, Any]
    split: str
    count: int
    seed: int
    resolution: int
    out: Path
    samples_per_shard: int
    shards: bool
    progress: bool


@dataclass
class _Tally:
    """The folder's records, split into LLaVA records and failures, counted by response type."""

    by_type: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    llava: list[dict[str, Any]] = field(default_factory=list)


def write_dataset(settings: DatagenSettings) -> str:
    """Write ``settings.out``, or continue writing it; returns the summary to print."""
    teacher = _teacher(settings.teacher, settings.options)
    scenes = generate_scenes(settings.split, settings.count, settings.seed)  # checks the split too
    check_identity(settings.out, _identity(settings, teacher))
    image_dir = _image_dir(settings.out)
    done = load_records(settings.out / RECORDS_FILE)
    resumed = _teach_missing_scenes(settings, teacher, scenes, done, image_dir)
    _restore_missing_images(scenes, image_dir, settings.resolution)
    tally = _tally(scenes, done)
    json_path = settings.out / f"{settings.split}.json"
    write_text_atomically(json_path, json.dumps(tally.llava))
    shard_note = _write_shards(tally.llava, image_dir, settings) if settings.shards else "no shards (--no-shards)"
    return _summary(settings, len(scenes), resumed, tally, teacher.stats(), json_path, shard_note)


def _teacher(name: str, options: dict[str, Any]) -> Teacher:
    if name not in TEACHERS:
        load_components()  # a plugin's teacher; the built-in ones are registered already
    return build_teacher(name, options)


def _identity(settings: DatagenSettings, teacher: Teacher) -> dict[str, Any]:
    """What decides the folder's content: a resumed run must match it exactly."""
    return {
        "format": _FORMAT,
        "teacher": settings.teacher,
        "options": _output_options(TEACHERS.get(settings.teacher), settings.options, teacher.operational_options),
        "split": settings.split,
        "seed": settings.seed,
        "resolution": settings.resolution,
    }


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


def _image_dir(out: Path) -> Path:
    image_dir = out / "images"
    image_dir.mkdir(exist_ok=True)
    for leftover in image_dir.glob(".*.tmp"):  # an image a killed run was saving
        leftover.unlink(missing_ok=True)
    return image_dir


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


def _teach_missing_scenes(
    settings: DatagenSettings, teacher: Teacher, scenes: list[Scene], done: dict[str, list[dict[str, Any]]],
    image_dir: Path,
) -> int:
    """Teach the scenes ``done`` lacks, saving each (image, then records) as it comes and adding
    it to ``done``. Returns how many scenes an earlier run had done."""
    todo = [scene for scene in scenes if scene.scene_id not in done]
    resumed = len(scenes) - len(todo)
    bar = tqdm(
        total=len(scenes), initial=resumed, desc=f"{settings.split} scenes ({settings.teacher})", unit="scene",
        disable=not settings.progress, file=sys.stderr,
    )
    written_now = 0
    try:
        with open(settings.out / RECORDS_FILE, "a", encoding="utf-8") as handle:
            for scene, outcomes in teach(teacher, todo, settings.seed):
                save_image(scene, image_dir, settings.resolution)  # before its records: done means complete
                records = scene_records(scene, outcomes)
                handle.write(scene_lines(scene.scene_id, records))
                handle.flush()
                done[scene.scene_id] = records
                written_now += 1
                bar.update()
    except MmkitError as exc:
        bar.close()
        raise _with_resume_hint(exc, resumed + written_now, len(scenes), settings.out) from None
    bar.close()
    return resumed


def _with_resume_hint(exc: MmkitError, saved: int, total: int, out: Path) -> MmkitError:
    """``exc`` retold with what is saved, so a stopped run is known to be resumable."""
    kind = ConfigError if isinstance(exc, ConfigError) else DataError
    return kind(f"{exc} ({saved} of {total} scenes are saved in {out}; run the same command again to continue)")


def _restore_missing_images(scenes: list[Scene], image_dir: Path, resolution: int) -> None:
    """Images of resumed scenes, should any have gone missing."""
    for scene in scenes:
        if not (image_dir / image_name(scene)).is_file():
            save_image(scene, image_dir, resolution)


def _tally(scenes: list[Scene], done: dict[str, list[dict[str, Any]]]) -> _Tally:
    tally = _Tally()
    for scene in scenes:  # in scene order, so the LLaVA JSON does not depend on where a run resumed
        for record in done[scene.scene_id]:
            if "error" in record:
                tally.failed[record["type"]] += 1
                tally.failures.append(f"{record['id']} ({record['type']}): {record['error']}")
            else:
                tally.by_type[record["type"]] += 1
                tally.llava.append({key: record[key] for key in LLAVA_KEYS})
    return tally


def _write_shards(llava: list[dict[str, Any]], image_dir: Path, settings: DatagenSettings) -> str:
    """Shards of the LLaVA records, written beside and then swapped in, so a killed run never
    leaves a half-written shard folder. Returns the summary's note about them."""
    staging = settings.out / f"{SHARD_DIR}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    report = write_shards(llava, image_dir, staging, settings.samples_per_shard, progress=False, total=len(llava))
    if report.skipped:
        raise DataError(f"{len(report.skipped)} record(s) could not be sharded, e.g. {report.skipped[0]}")
    shard_dir = settings.out / SHARD_DIR
    shutil.rmtree(shard_dir, ignore_errors=True)
    os.replace(staging, shard_dir)
    return f"{len(report.shards)} shard(s) of {report.num_samples} samples in {shard_dir}"


def _summary(
    settings: DatagenSettings, scenes: int, resumed: int, tally: _Tally, stats: dict[str, int], json_path: Path,
    shard_note: str,
) -> str:
    by_type, failed, failures = tally.by_type, tally.failed, tally.failures
    width = max([len("total")] + [len(t) for t in by_type] + [len(t) for t in failed])
    lines = [
        (
            f"{settings.teacher} teacher, {settings.split} split, seed {settings.seed}: {scenes} scenes "
            f"({scenes - resumed} written now, {resumed} from an earlier run)"
        ),
        "records by type:",
    ]
    lines += [f"  {kind:<{width}}  {count}" for kind, count in sorted(by_type.items())]
    lines.append(f"  {'total':<{width}}  {sum(by_type.values())}")
    lines += _failure_lines(failed, failures, settings.out / RECORDS_FILE)
    if stats:
        lines.append("teacher: " + ", ".join(f"{key} {value}" for key, value in stats.items()))
    lines.append(f"wrote {json_path} ({sum(by_type.values())} records); {shard_note}")
    return "\n".join(lines)


def _failure_lines(failed: Counter[str], failures: list[str], records_path: Path) -> list[str]:
    """The failure count by type and the first five failures; the rest are in ``records_path``."""
    if not failed:
        return ["failed: 0"]
    lines = [f"failed: {sum(failed.values())} ({', '.join(f'{k} {v}' for k, v in sorted(failed.items()))})"]
    lines += [f"  {failure}" for failure in failures[:5]]
    if len(failures) > 5:
        lines.append(f"  ... and {len(failures) - 5} more in {records_path}")
    return lines
