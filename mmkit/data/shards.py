"""Convert LLaVA JSON + an image folder into WebDataset tar shards.

    python -m mmkit.data.shards --json llava_instruct_150k.json --images coco/train2017 --out shards/instruct

Each sample is ``{key}.json`` (the LLaVA record) plus ``{key}.{jpg,png,...}`` (the image bytes as
stored, not re-encoded). ``manifest.json`` beside the shards lists each shard with its sample
count and sha256, so a training run can trace its result to the exact data.

A record is skipped, with its reason in the manifest and the printed summary, when its image path
leads outside the image folder (``..``, an absolute path, a link to elsewhere), or its file is
missing, unreadable, not an image, or over the size limits (``--max-side``, ``--max-pixels``, by
default those of training's ``image_limits``), read from the header alone.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
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


def _samples(
    records: Iterable[Any], image_folder: Path | None, limits: ImageLimits, report: ConversionReport, bar: tqdm
) -> Iterator[dict[str, Any]]:
    """The shard samples of the usable records; each other record is added to ``report.skipped``
    with its reason."""
    seen: set[str] = set()
    for index, record in enumerate(records):
        bar.update()
        sample: dict[str, Any] = {}
        try:
            if (problem := record_problem(record)) is not None:
                raise DataError(problem)
            if "image" in record:
                if image_folder is None:
                    raise DataError("has an image but no image folder was given")
                extension, data = _image_member(_image_path(image_folder, record["image"]), limits)
                sample[extension] = data
        except DataError as exc:
            record_id = record.get("id") if isinstance(record, dict) else None
            report.skipped.append({"index": str(index), "id": str(record_id), "reason": str(exc)})
            continue
        sample["__key__"] = _sample_key(record.get("id"), index, seen)
        sample["json"] = json.dumps(record, ensure_ascii=False).encode("utf-8")
        yield sample


def write_shards(
    records: Iterable[dict[str, Any]],
    image_folder: Path | None,
    out_dir: Path,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    progress: bool = True,
    total: int | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> ConversionReport:
    """Write ``records`` as shards into ``out_dir`` plus a manifest. Each shard appears whole or not
    at all, and a conversion that fails or is interrupted removes the shards it wrote: no folder of
    shards without their manifest passes for the whole data set."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ConversionReport()
    written: list[Path] = []
    try:
        with tqdm(total=total, desc="shards", unit="record", disable=not progress) as bar:
            samples = _samples(records, image_folder, limits, report, bar)
            while (first := next(samples, None)) is not None:
                path = out_dir / f"{prefix}-{len(written):06d}.tar"
                written.append(path)  # before it exists: an interruption right after its rename still removes it
                count = 0
                with atomic_path(path) as temporary, wds.TarWriter(str(temporary)) as writer:
                    for sample in itertools.chain([first], itertools.islice(samples, max(samples_per_shard, 1) - 1)):
                        writer.write(sample)
                        count += 1
                report.shards.append({"file": path.name, "samples": count, "sha256": file_sha256(path)})
        manifest = {"shards": report.shards, "num_samples": report.num_samples, "skipped": report.skipped}
        write_text_atomically(out_dir / MANIFEST, json.dumps(manifest, indent=1))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return report


def skip_summary(skipped: list[dict[str, str]]) -> str:
    """``skipped 3 records: 2 image path outside the image folder, 1 not an image``: the reasons
    counted by their kind, the text before the first colon."""
    kinds = Counter(skip["reason"].split(": ", 1)[0] for skip in skipped)
    counts = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
    return f"skipped {len(skipped)} record{'s' if len(skipped) != 1 else ''}: {counts}"


def convert_llava_json(
    json_path: Path, image_folder: Path | None, out_dir: Path, samples_per_shard: int = 1000, progress: bool = True,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> ConversionReport:
    records = load_records(json_path)
    return write_shards(records, image_folder, out_dir, samples_per_shard, progress=progress, total=len(records),
                        limits=limits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkit.data.shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, type=Path, help="LLaVA JSON (list) or JSONL file")
    parser.add_argument("--images", type=Path, default=None, help="folder the records' 'image' paths are relative to")
    parser.add_argument("--out", required=True, type=Path, help="output folder for the .tar shards and manifest.json")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--max-side", type=int, default=DEFAULT_LIMITS.max_side,
                        help="skip images with a longer side (as training's image_limits.max_side)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_LIMITS.max_pixels,
                        help="skip images with more pixels (as training's image_limits.max_pixels)")
    args = parser.parse_args(argv)
    limits = ImageLimits(args.max_side, args.max_pixels)
    try:
        report = convert_llava_json(args.json, args.images, args.out, args.samples_per_shard, limits=limits)
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
