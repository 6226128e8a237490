"""Convert LLaVA JSON + an image folder into WebDataset tar shards.

    python -m mmkit.data.shards --json llava_instruct_150k.json --images coco/train2017 --out shards/instruct

Each sample is ``{key}.json`` (the LLaVA record) plus ``{key}.{jpg,png,...}`` (the image bytes as
stored, not re-encoded). ``manifest.json`` beside the shards lists each shard with its sample
count and sha256, so a training run can trace its result to the exact data.

A record is skipped, with its reason in the manifest and the printed summary, when its image path
leads outside the image folder (``..``, an absolute path, a link to elsewhere), or its file is
missing, unreadable, not an image, or over the size limits (``--max-side``, ``--max-pixels``, by
default those of training's ``image_limits``), read from the header alone.

Shard ``i`` holds the usable records among records ``i * samples_per_shard`` to the next
multiple, so a skipped record makes its shard smaller rather than moving the shard boundaries:
each shard's contents are known before any image is read. That lets ``--workers`` processes
write whole shards each, in any order, with byte-identical results whatever their number. A
``{shard}.done`` file written after each shard lets a conversion killed outright (SIGKILL, OOM,
a lost node) be run again and finish the rest without rewriting what is done; the done files
are removed once the manifest is written. An error or Ctrl-C still removes every shard.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import signal
import sys
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from mmkit.core.atomic_io import atomic_path, write_text_atomically
from mmkit.core.errors import DataError, MmkitError
from mmkit.data.images import DEFAULT_LIMITS, ImageLimits, decode_image, header_size
from mmkit.data.llava_records import IMAGE_EXTENSIONS, load_records, record_problem

MANIFEST = "manifest.json"
DONE_SUFFIX = ".done"
# Shards each worker may have queued: enough to keep it busy, few enough that the records
# waiting in the queue stay a small part of memory.
_QUEUED_PER_WORKER = 2


@dataclass
class ConversionReport:
    shards: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return sum(shard["samples"] for shard in self.shards)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _image_path(image_folder: Path, name: str) -> Path:
    """``name`` in ``image_folder`` with its links resolved; DataError when it leads outside the
    folder (``..``, an absolute path, a link to elsewhere): a record never copies another file."""
    if Path(name).is_absolute():
        raise DataError(f"image path outside the image folder: {name} (absolute; records name files in the folder)")
    try:
        path = (image_folder / name).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a link loop, a NUL byte in the name
        raise DataError(f"image path not usable: {name!r} ({exc})") from None
    if not path.is_relative_to(image_folder.resolve()):
        raise DataError(f"image path outside the image folder: {name}")
    if not path.is_file():
        raise DataError(f"image file not found: {image_folder / name}")
    return path


def _image_member(path: Path, limits: ImageLimits) -> tuple[str, bytes]:
    """(member extension, bytes) of an image file; DataError with the reason its record is skipped."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"image file unreadable: {exc.strerror or exc}") from None
    if (size := header_size(data)) is None:
        raise DataError(f"not an image: {path.name} is no image format PIL reads")
    limits.check_size(*size)  # from the header: an oversized image is never decoded, here or in training
    extension = path.suffix.lower().lstrip(".")
    extension = "jpg" if extension == "jpeg" else extension
    if extension in IMAGE_EXTENSIONS:
        return extension, data
    # Formats the loader does not list (gif, tiff...) are stored as PNG, decoded once here.
    buffer = io.BytesIO()
    decode_image(data, limits).convert("RGB").save(buffer, format="PNG")
    return "png", buffer.getvalue()


def _sample_key(record_id: Any, index: int, seen: set[str]) -> str:
    # WebDataset splits a member name at its first dot, so keys must not contain one.
    key = re.sub(r"[^A-Za-z0-9_-]", "_", str(record_id)) if record_id is not None else f"{index:09d}"
    if key in seen:
        key = f"{key}_{index}"
    seen.add(key)
    return key


# A worker process costs seconds to start (more on a loaded machine); below this many records
# each, one process is faster.
RECORDS_PER_WORKER = 5000


def default_workers(records: int | None = None) -> int:
    """The CPUs this process may run on, but no more than one per ``RECORDS_PER_WORKER`` records."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cpus if records is None else max(1, min(cpus, records // RECORDS_PER_WORKER))


@dataclass(frozen=True)
class _ShardJob:
    """One shard to write: its records with their sample keys, numbered from ``first_index``."""

    path: Path
    first_index: int
    keyed_records: list[tuple[str, Any]]
    image_folder: Path | None
    limits: ImageLimits

    def fingerprint(self) -> str:
        """What determines the shard's bytes (the images aside), so a done file from other
        records or limits is never taken for this shard's."""
        identity = [self.first_index, self.keyed_records, str(self.image_folder), repr(self.limits)]
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _done_path(path: Path) -> Path:
    return path.with_name(path.name + DONE_SUFFIX)


def _sample(key: str, record: Any, image_folder: Path | None, limits: ImageLimits) -> dict[str, Any]:
    """The shard sample of a record; DataError with the reason it is skipped."""
    if (problem := record_problem(record)) is not None:
        raise DataError(problem)
    sample: dict[str, Any] = {"__key__": key}
    if "image" in record:
        if image_folder is None:
            raise DataError("has an image but no image folder was given")
        extension, data = _image_member(_image_path(image_folder, record["image"]), limits)
        sample[extension] = data
    sample["json"] = json.dumps(record, ensure_ascii=False).encode("utf-8")
    return sample


def _finished_shard(job: _ShardJob, fingerprint: str) -> dict[str, Any] | None:
    """The result a previous run recorded for this very shard, when its done file and tar agree."""
    try:
        done = json.loads(_done_path(job.path).read_text(encoding="utf-8"))
        if done["fingerprint"] != fingerprint:
            return None
        if done["samples"] and file_sha256(job.path) != done["sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return done


def _write_shard(job: _ShardJob) -> dict[str, Any]:
    """Write one shard (unless a previous run finished it) and its done file; returns
    ``{"samples", "sha256", "skipped"}``. A shard with no usable record has no tar."""
    fingerprint = job.fingerprint()
    if (done := _finished_shard(job, fingerprint)) is not None:
        return done
    skipped: list[dict[str, str]] = []
    count = 0
    # mtime 0: the same records give the same bytes, in any run and any worker.
    with atomic_path(job.path) as temporary, wds.TarWriter(str(temporary), mtime=0) as writer:
        for offset, (key, record) in enumerate(job.keyed_records):
            try:
                writer.write(_sample(key, record, job.image_folder, job.limits))
                count += 1
            except DataError as exc:
                record_id = record.get("id") if isinstance(record, dict) else None
                skipped.append({"index": str(job.first_index + offset), "id": str(record_id), "reason": str(exc)})
    sha256 = file_sha256(job.path) if count else None
    if not count:
        job.path.unlink()
    done = {"fingerprint": fingerprint, "samples": count, "sha256": sha256, "skipped": skipped}
    write_text_atomically(_done_path(job.path), json.dumps(done))
    return done


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the parent alone decides what happens then, and lets
    # each worker finish the shard it is writing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _InProcess(Executor):
    """A one-worker executor that runs each job when submitted, in this process; an error is
    raised by ``submit`` itself."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _executor(workers: int) -> Executor:
    if workers <= 1:
        return _InProcess()
    # forkserver: workers start from a clean process that has imported this module once, so none of
    # them inherits the caller's records (gigabytes at 665K) or threads, as a plain fork would.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_ignore_sigint)


def _jobs(
    records: Iterable[Any], image_folder: Path | None, out_dir: Path, samples_per_shard: int, prefix: str,
    limits: ImageLimits,
) -> Iterator[_ShardJob]:
    """The records cut into shards of ``samples_per_shard``; keys are given here, in record order,
    so a duplicate id gets the same key whichever worker writes it."""
    seen: set[str] = set()
    indexed = enumerate(records)
    for number in itertools.count():
        chunk = list(itertools.islice(indexed, samples_per_shard))
        if not chunk:
            return
        keyed = [(_sample_key(r.get("id") if isinstance(r, dict) else None, i, seen), r) for i, r in chunk]
        yield _ShardJob(out_dir / f"{prefix}-{number:06d}.tar", chunk[0][0], keyed, image_folder, limits)


def _remove_leftovers(out_dir: Path, prefix: str) -> None:
    """Temporary files of a killed run: their shards are written again."""
    for path in out_dir.glob(f".{prefix}-*.partial-*"):
        path.unlink(missing_ok=True)


def write_shards(
    records: Iterable[dict[str, Any]],
    image_folder: Path | None,
    out_dir: Path,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    progress: bool = True,
    total: int | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    workers: int = 1,
) -> ConversionReport:
    """Write ``records`` as shards into ``out_dir`` plus a manifest, with ``workers`` processes.
    Each shard appears whole or not at all. A conversion that fails or is interrupted removes the
    shards it wrote: no folder of shards without their manifest passes for the whole data set.
    One killed outright leaves its finished shards with their done files, and running it again
    writes only the rest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir, prefix)
    samples_per_shard = max(samples_per_shard, 1)
    if total is not None:
        workers = min(workers, max(-(-total // samples_per_shard), 1))
    report = ConversionReport()
    submitted: list[Path] = []
    executor = _executor(workers)
    try:
        with tqdm(total=total, desc="shards", unit="record", disable=not progress) as bar:
            pending: deque[tuple[_ShardJob, Future]] = deque()

            def collect_oldest() -> None:
                job, future = pending.popleft()
                done = future.result()
                report.skipped.extend(done["skipped"])
                if done["samples"]:
                    report.shards.append({"file": job.path.name, "samples": done["samples"], "sha256": done["sha256"]})
                bar.update(len(job.keyed_records))

            for job in _jobs(records, image_folder, out_dir, samples_per_shard, prefix, limits):
                submitted.append(job.path)  # before it is written: an interruption right after still removes it
                pending.append((job, executor.submit(_write_shard, job)))
                if len(pending) > _QUEUED_PER_WORKER * workers:
                    collect_oldest()
            while pending:
                collect_oldest()
        manifest = {"shards": report.shards, "num_samples": report.num_samples, "skipped": report.skipped}
        write_text_atomically(out_dir / MANIFEST, json.dumps(manifest, indent=1))
        for path in submitted:
            _done_path(path).unlink(missing_ok=True)
    except BaseException:
        executor.shutdown(wait=True, cancel_futures=True)  # no worker writes after the removal below
        for path in submitted:
            path.unlink(missing_ok=True)
            _done_path(path).unlink(missing_ok=True)
        raise
    executor.shutdown()
    return report


def skip_summary(skipped: list[dict[str, str]]) -> str:
    """``skipped 3 records: 2 image path outside the image folder, 1 not an image``: the reasons
    counted by their kind, the text before the first colon."""
    kinds = Counter(skip["reason"].split(": ", 1)[0] for skip in skipped)
    counts = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
    return f"skipped {len(skipped)} record{'s' if len(skipped) != 1 else ''}: {counts}"


def convert_llava_json(
    json_path: Path, image_folder: Path | None, out_dir: Path, samples_per_shard: int = 1000, progress: bool = True,
    limits: ImageLimits = DEFAULT_LIMITS, workers: int | None = None,
) -> ConversionReport:
    """``workers``: processes writing shards; None: :func:`default_workers` for this many records."""
    records = load_records(json_path)
    workers = default_workers(len(records)) if workers is None else workers
    return write_shards(records, image_folder, out_dir, samples_per_shard, progress=progress, total=len(records),
                        limits=limits, workers=workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkit.data.shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, type=Path, help="LLaVA JSON (list) or JSONL file")
    parser.add_argument("--images", type=Path, default=None, help="folder the records' 'image' paths are relative to")
    parser.add_argument("--out", required=True, type=Path, help="output folder for the .tar shards and manifest.json")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None,
                        help=f"processes writing shards (default: the CPUs this process may use, at most one per "
                             f"{RECORDS_PER_WORKER} records)")
    parser.add_argument("--max-side", type=int, default=DEFAULT_LIMITS.max_side,
                        help="skip images with a longer side (as training's image_limits.max_side)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_LIMITS.max_pixels,
                        help="skip images with more pixels (as training's image_limits.max_pixels)")
    args = parser.parse_args(argv)
    limits = ImageLimits(args.max_side, args.max_pixels)
    try:
        report = convert_llava_json(args.json, args.images, args.out, args.samples_per_shard, limits=limits,
                                    workers=args.workers)
    except MmkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: no shard of this conversion is left in {args.out}", file=sys.stderr)
        return 130
    print(f"wrote {report.num_samples} samples in {len(report.shards)} shards to {args.out}")
    for skip in report.skipped[:10]:
        print(f"  skipped record {skip['index']} (id {skip['id']}): {skip['reason']}")
    if len(report.skipped) > 10:
        print(f"  ... and {len(report.skipped) - 10} more, listed in {args.out / MANIFEST}")
    if report.skipped:
        print(skip_summary(report.skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
