"""Convert LLaVA JSON + an image folder into WebDataset tar shards.

    python -m mmkit.data.shards --json llava_instruct_150k.json --images coco/train2017 --out shards/instruct

Each sample is ``{key}.json`` (the LLaVA record) plus ``{key}.{jpg,png,...}`` (the image bytes as
stored, not re-encoded). ``manifest.json`` beside the shards lists each shard with its sample
count and sha256, so a training run can trace its result to the exact data.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from mmkit.core.errors import MmkitError
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


def _image_member(path: Path) -> tuple[str, bytes]:
    extension = path.suffix.lower().lstrip(".")
    extension = "jpg" if extension == "jpeg" else extension
    if extension in IMAGE_EXTENSIONS:
        return extension, path.read_bytes()
    # Formats the loader does not list (gif, tiff...) are stored as PNG, decoded once here.
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="PNG")
    return "png", buffer.getvalue()


def _sample_key(record_id: Any, index: int, seen: set[str]) -> str:
    # WebDataset splits a member name at its first dot, so keys must not contain one.
    key = re.sub(r"[^A-Za-z0-9_-]", "_", str(record_id)) if record_id is not None else f"{index:09d}"
    if key in seen:
        key = f"{key}_{index}"
    seen.add(key)
    return key


def write_shards(
    records: Iterable[dict[str, Any]],
    image_folder: Path | None,
    out_dir: Path,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    progress: bool = True,
    total: int | None = None,
) -> ConversionReport:
    """Write ``records`` as shards into ``out_dir`` (each shard appears atomically) plus a manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ConversionReport()
    seen: set[str] = set()
    writer: wds.TarWriter | None = None
    temporary: Path | None = None
    count = 0

    def close_shard() -> None:
        nonlocal writer, count
        if writer is None:
            return
        writer.close()
        final = temporary.with_suffix("")  # drop ".partial": a shard exists only when complete
        temporary.rename(final)
        report.shards.append({"file": final.name, "samples": count, "sha256": file_sha256(final)})
        writer, count = None, 0

    for index, record in enumerate(tqdm(records, total=total, desc="shards", unit="sample", disable=not progress)):
        problem = record_problem(record)
        sample: dict[str, Any] = {}
        if problem is None and "image" in record:
            if image_folder is None:
                problem = "has an image but no image folder was given"
            else:
                image_path = image_folder / record["image"]
                if not image_path.is_file():
                    problem = f"image file not found: {image_path}"
                else:
                    extension, data = _image_member(image_path)
                    sample[extension] = data
        if problem is not None:
            record_id = record.get("id") if isinstance(record, dict) else None
            report.skipped.append({"index": str(index), "id": str(record_id), "reason": problem})
            continue
        if writer is None:
            temporary = out_dir / f"{prefix}-{len(report.shards):06d}.tar.partial"
            writer = wds.TarWriter(str(temporary))
        sample["__key__"] = _sample_key(record.get("id"), index, seen)
        sample["json"] = json.dumps(record, ensure_ascii=False).encode("utf-8")
        writer.write(sample)
        count += 1
        if count >= samples_per_shard:
            close_shard()
    close_shard()
    manifest = {"shards": report.shards, "num_samples": report.num_samples, "skipped": report.skipped}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return report


def convert_llava_json(
    json_path: Path, image_folder: Path | None, out_dir: Path, samples_per_shard: int = 1000, progress: bool = True
) -> ConversionReport:
    records = load_records(json_path)
    return write_shards(records, image_folder, out_dir, samples_per_shard, progress=progress, total=len(records))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkit.data.shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, type=Path, help="LLaVA JSON (list) or JSONL file")
    parser.add_argument("--images", type=Path, default=None, help="folder the records' 'image' paths are relative to")
    parser.add_argument("--out", required=True, type=Path, help="output folder for the .tar shards and manifest.json")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    try:
        report = convert_llava_json(args.json, args.images, args.out, args.samples_per_shard)
    except MmkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {report.num_samples} samples in {len(report.shards)} shards to {args.out}; skipped {len(report.skipped)}")
    for skip in report.skipped[:10]:
        print(f"  skipped record {skip['index']} (id {skip['id']}): {skip['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
