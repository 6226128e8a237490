"""Write a teacher's instruction data about a source's images into a folder, resumably.

The work behind ``python -m mmkit.datagen`` once its flags are parsed; the folder's layout and
the resume rules are in that command's help. :func:`write_dataset` runs the steps in order:
build the source and the teacher, check that the folder holds this run's data
(:func:`check_identity`), make sure the images are there, read the images already done
(:func:`load_records`), teach the others while appending their records, then write the LLaVA
JSON, the shards, the quality report and a summary.
"""
from __future__ import annotations

import inspect
import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from mmkit.core.atomic_io import write_text_atomically
from mmkit.core.errors import ConfigError, DataError, MmkitError
from mmkit.core.registry import SOURCES, TEACHERS, load_components
from mmkit.data.shards import write_shards
from mmkit.datagen.quality import MARKDOWN_FILE, Reviewed, assess, summary_lines, write_quality_report
from mmkit.datagen.source import AnnotatedImage, AnnotationSource, View
from mmkit.datagen.teacher import Failed, Teacher, build_teacher, outcome_records, text_rng
from mmkit.synth.llava_data import llava_record

IDENTITY_FILE = "datagen.json"
RECORDS_FILE = "records.jsonl"
SHARD_DIR = "shards"
# 2: the annotation source is part of a folder's identity (format 1 folders were synthetic only).
_FORMAT = 2


@dataclass(frozen=True)
class DatagenSettings:
    """What to write and where: the command's flags, checked, with ``--option`` parsed."""

    source: str
    source_options: dict[str, Any]
    teacher: str
    options: dict[str, Any]
    count: int | None  # the first N images of the source; None: all of them
    seed: int
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
    source = build_source(settings.source, settings.source_options)
    teacher = load_teacher(settings.teacher, settings.options)
    images = chosen_images(source, settings.count)
    check_identity(settings.out, _identity(settings, teacher))
    source.prepare(images, settings.out, settings.progress)
    done = load_records(settings.out / RECORDS_FILE)
    resumed = _teach_missing_images(settings, teacher, source, images, done)
    tally = _tally(images, done)
    json_path = settings.out / source.output_name
    write_text_atomically(json_path, json.dumps(tally.llava))
    shard_note = _write_shards(tally.llava, source.image_root, settings) if settings.shards else "no shards (--no-shards)"
    report = assess(_reviewed(source, images, done, settings.seed), source.vocabulary())
    write_quality_report(settings.out, report)
    return _summary(settings, source, len(images), resumed, tally, teacher.stats(), json_path, shard_note, report)


def build_source(name: str, options: dict[str, Any]) -> AnnotationSource:
    """The annotation source registered as ``name`` (a plugin's too), built with ``options``."""
    if name not in SOURCES:
        load_components()
    SOURCES.get(name, key="source")
    return SOURCES.build({"name": name, **options}, key="source")


def chosen_images(source: AnnotationSource, count: int | None) -> list[AnnotatedImage]:
    """The first ``count`` images of ``source`` (all when ``count`` is None)."""
    images = source.images()
    if count is not None and count > len(images):
        raise ConfigError(f"--count={count}: {source.describe()} has {len(images)} images")
    return images if count is None else images[:count]


def load_teacher(name: str, options: dict[str, Any]) -> Teacher:
    if name not in TEACHERS:
        load_components()  # a plugin's teacher; the built-in ones are registered already
    return build_teacher(name, options)


def _identity(settings: DatagenSettings, teacher: Teacher) -> dict[str, Any]:
    """What decides the folder's content: a resumed run must match it exactly."""
    source = SOURCES.get(settings.source)
    return {
        "format": _FORMAT,
        "source": settings.source,
        "source_options": _output_options(source, settings.source_options, source.operational_options),
        "teacher": settings.teacher,
        "options": _output_options(TEACHERS.get(settings.teacher), settings.options, teacher.operational_options),
        "seed": settings.seed,
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
    nested = {"options": "option", "source_options": "source option"}
    flat = {key: value for key, value in identity.items() if key not in nested}
    for key, label in nested.items():
        options = identity.get(key)
        flat.update({f"{label} {name}": value for name, value in (options.items() if isinstance(options, dict) else [])})
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
    """The records of every image that ``path`` holds completely, by image id.

    A kill can leave a half-written last line, or some but not all of the last image's lines:
    those are dropped, and the file is rewritten (atomically) without them, so the next append
    starts on a clean line.
    """
    if not path.is_file():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete_lines, tail = lines[:-1], lines[-1]  # the tail is b"" when the file ends in a newline
    by_image: dict[str, list[dict[str, Any]]] = {}
    kept: list[bytes] = []
    group: list[tuple[dict[str, Any], bytes]] = []

    def close_group() -> None:
        if not group:
            return
        first = group[0][0]
        image_id, expected = first["image_id"], first["n_outputs"]
        records = [record for record, _ in group if "index" in record]
        if len(records) == expected and image_id not in by_image:
            by_image[image_id] = records
            kept.extend(raw for _, raw in group)
        group.clear()

    for number, raw in enumerate(complete_lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            image_id = record["image_id"]
            int(record["n_outputs"])
        except (ValueError, KeyError, TypeError):
            if number == len(complete_lines) and not tail:
                break  # a garbled last line: the run died while writing it
            raise DataError(
                f"{path}: line {number} is not a record this command wrote; delete the folder to start over"
            ) from None
        if group and group[0][0]["image_id"] != image_id:
            close_group()
        group.append((record, raw))
    close_group()
    clean = b"".join(raw + b"\n" for raw in kept)
    if clean != data:
        write_text_atomically(path, clean.decode("utf-8"))
    return by_image


def image_lines(image_id: str, records: list[dict[str, Any]]) -> str:
    """``records.jsonl`` lines for one image; each carries the image's id and how many records it
    has, so an image cut short by a kill is recognised and written again."""
    if not records:  # an image the teacher wrote nothing about still counts as done
        return json.dumps({"image_id": image_id, "n_outputs": 0}) + "\n"
    lines = [
        json.dumps({"image_id": image_id, "index": index, "n_outputs": len(records), **record}, ensure_ascii=False)
        for index, record in enumerate(records)
    ]
    return "".join(line + "\n" for line in lines)


def _views(source: AnnotationSource, images: list[AnnotatedImage], seed: int) -> Iterator[tuple[View, random.Random]]:
    for image in images:
        rng = text_rng(seed, image.id)
        yield source.view(image, rng), rng


def _teach_missing_images(
    settings: DatagenSettings, teacher: Teacher, source: AnnotationSource, images: list[AnnotatedImage],
    done: dict[str, list[dict[str, Any]]],
) -> int:
    """Teach the images ``done`` lacks, appending each one's records as they come and adding them
    to ``done``. Returns how many images an earlier run had done."""
    todo = [image for image in images if image.id not in done]
    resumed = len(images) - len(todo)
    bar = tqdm(
        total=len(images), initial=resumed, desc=f"{source.describe()}, {settings.teacher} teacher",
        unit=source.unit, disable=not settings.progress, file=sys.stderr,
    )
    outcomes = teacher.write_many(_views(source, todo, settings.seed))
    written_now = failed = 0
    started, tokens_before = time.monotonic(), teacher.stats().get("reply tokens", 0)
    try:
        with open(settings.out / RECORDS_FILE, "a", encoding="utf-8") as handle:
            for image, outcome in zip(todo, outcomes):
                records = outcome_records(image.id, image.image, outcome)
                handle.write(image_lines(image.id, records))
                handle.flush()
                done[image.id] = records
                written_now += 1
                failed += sum(isinstance(item, Failed) for item in outcome)
                bar.set_postfix_str(_progress_note(teacher, failed, started, tokens_before), refresh=False)
                bar.update()
    except MmkitError as exc:
        bar.close()
        raise _with_resume_hint(exc, resumed + written_now, len(images), settings.out, source.unit) from None
    bar.close()
    return resumed


def _progress_note(teacher: Teacher, failed: int, started: float, tokens_before: int) -> str:
    """The progress bar's note: the teacher's reply tokens a second (for a teacher that asks a
    model) and the responses that could not be used so far."""
    tokens = teacher.stats().get("reply tokens")
    note = f"failed {failed}"
    if tokens is not None:
        note = f"{(tokens - tokens_before) / max(time.monotonic() - started, 1e-9):.0f} reply tok/s, {note}"
    return note


def _with_resume_hint(exc: MmkitError, saved: int, total: int, out: Path, unit: str) -> MmkitError:
    """``exc`` retold with what is saved, so a stopped run is known to be resumable."""
    kind = ConfigError if isinstance(exc, ConfigError) else DataError
    return kind(f"{exc} ({saved} of {total} {unit}s are saved in {out}; run the same command again to continue)")


def _tally(images: list[AnnotatedImage], done: dict[str, list[dict[str, Any]]]) -> _Tally:
    tally = _Tally()
    for image in images:  # in the source's order, so the LLaVA JSON does not depend on where a run resumed
        for record in done[image.id]:
            if "error" in record:
                tally.failed[record["type"]] += 1
                tally.failures.append(f"{record['id']} ({record['type']}): {record['error']}")
            else:
                tally.by_type[record["type"]] += 1
                tally.llava.append(llava_record(record))
    return tally


def _reviewed(source: AnnotationSource, images: list[AnnotatedImage], done: dict[str, list[dict[str, Any]]],
              seed: int) -> list[Reviewed]:
    """Every conversation with the captions and labels its image's teacher was shown (the view
    drawn again from the image's generator: the same one)."""
    reviewed = []
    for image in images:
        view = source.view(image, text_rng(seed, image.id))
        labels = [str(annotation["category"]) for annotation in view["objects"]]
        reviewed += [Reviewed(id=record["id"], type=record["type"], turns=record["conversations"],
                              captions=list(view["captions"]), labels=labels)
                     for record in done[image.id] if "conversations" in record]
    return reviewed


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
    settings: DatagenSettings, source: AnnotationSource, images: int, resumed: int, tally: _Tally,
    stats: dict[str, int], json_path: Path, shard_note: str, report: dict[str, Any],
) -> str:
    by_type, failed, failures = tally.by_type, tally.failed, tally.failures
    width = max([len("total")] + [len(t) for t in by_type] + [len(t) for t in failed])
    lines = [
        (
            f"{settings.teacher} teacher on {source.describe()}, seed {settings.seed}: {images} {source.unit}s "
            f"({images - resumed} written now, {resumed} from an earlier run)"
        ),
        "records by type:",
    ]
    lines += [f"  {kind:<{width}}  {count}" for kind, count in sorted(by_type.items())]
    lines.append(f"  {'total':<{width}}  {sum(by_type.values())}")
    lines += _failure_lines(failed, failures, settings.out / RECORDS_FILE)
    if stats:
        lines.append("teacher: " + ", ".join(f"{key} {value}" for key, value in stats.items()))
    lines += summary_lines(report)
    lines.append(f"wrote {json_path} ({sum(by_type.values())} records); {shard_note}; "
                 f"quality report in {settings.out / MARKDOWN_FILE}")
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
