"""``python -m mmkit.data.shards`` on real files, and ShardSet reading what it wrote."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image

from mmkit.core.errors import DataError
from mmkit.data.datasets.dataset_source import ShardSet


def _conversation(question: str, answer: str, image: bool = True) -> list[dict[str, str]]:
    prefix = "<image>\n" if image else ""
    return [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Seven records of every kind the converter meets, converted once by the real CLI."""
    root = tmp_path_factory.mktemp("llava")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (32, 24), (255, 0, 0)).save(images / "red.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(images / "sub" / "blue.jpg", quality=90)
    Image.new("RGB", (16, 16), (0, 255, 0)).save(images / "green.jpeg")
    Image.new("RGB", (8, 8), (255, 255, 0)).save(images / "yellow.gif")
    records = [
        {"id": "png1", "image": "red.png", "conversations": _conversation("Colour?", "Red.")},
        {"id": "jpg1", "image": "sub/blue.jpg", "conversations": _conversation("Colour?", "Blue.")},
        {"id": "text1", "conversations": _conversation("Say hi.", "Hi.", image=False)},
        {"id": "lost", "image": "missing.png", "conversations": _conversation("Colour?", "Unknown.")},
        {"id": "coco/train.2017.v1", "image": "red.png", "conversations": _conversation("Shape?", "Square.")},
        {"id": "jpeg1", "image": "green.jpeg", "conversations": _conversation("Colour?", "Green.")},
        {"image": "yellow.gif", "conversations": _conversation("Colour?", "Yellow.")},  # no id
    ]
    json_path = root / "data.json"
    json_path.write_text(json.dumps(records))
    out = root / "shards"
    result = run_cli(
        ["-m", "mmkit.data.shards", "--json", str(json_path), "--images", str(images), "--out", str(out),
         "--samples-per-shard", "3"]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {"root": root, "images": images, "records": records, "out": out, "stdout": result.stdout}


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


def _all_members(out: Path) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    for tar_path in sorted(out.glob("*.tar")):
        members.update(_members(tar_path))
    return members


def test_cli_reports_what_it_wrote_and_skipped(converted: dict) -> None:
    lines = converted["stdout"].strip().splitlines()
    # Shard i holds the usable records among records 3i..3i+2: the skipped record 3 makes shard 1 smaller.
    assert lines[0] == f"wrote 6 samples in 3 shards to {converted['out']}"
    assert lines[1].startswith("  skipped record 3 (id lost): image file not found: ")
    assert lines[1].endswith("missing.png")
    assert lines[2:] == ["skipped 1 record: 1 image file not found"]
    # Shards appear only when complete: no partial file is left behind.
    assert sorted(p.name for p in converted["out"].iterdir()) == [
        "manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"
    ]


def test_tar_members_and_keys(converted: dict) -> None:
    out = converted["out"]
    assert sorted(_members(out / "shard-000000.tar")) == [
        "jpg1.jpg", "jpg1.json", "png1.json", "png1.png", "text1.json"
    ]
    members = _all_members(out)
    # Dots and slashes in ids become underscores (WebDataset splits a member name at its first dot);
    # a record without an id is keyed by its index.
    assert sorted(members) == [
        "000000006.json", "000000006.png",
        "coco_train_2017_v1.json", "coco_train_2017_v1.png",
        "jpeg1.jpg", "jpeg1.json",
        "jpg1.jpg", "jpg1.json",
        "png1.json", "png1.png",
        "text1.json",
    ]
    assert all("." not in name.rsplit(".", 1)[0] for name in members)
    # Each .json member is the record unchanged.
    by_id = {r.get("id"): r for r in converted["records"]}
    assert json.loads(members["coco_train_2017_v1.json"]) == by_id["coco/train.2017.v1"]
    assert json.loads(members["text1.json"]) == by_id["text1"]
    assert json.loads(members["000000006.json"]) == by_id[None]


def test_image_bytes_are_stored_unchanged(converted: dict) -> None:
    images, members = converted["images"], _all_members(converted["out"])
    assert members["png1.png"] == (images / "red.png").read_bytes()
    assert members["jpg1.jpg"] == (images / "sub" / "blue.jpg").read_bytes()
    assert members["jpeg1.jpg"] == (images / "green.jpeg").read_bytes()  # .jpeg is stored under .jpg
    assert members["coco_train_2017_v1.png"] == (images / "red.png").read_bytes()
    # A format the loader does not read (GIF) is decoded once and stored as PNG, pixels intact.
    stored = Image.open(io.BytesIO(members["000000006.png"]))
    assert stored.format == "PNG"
    assert stored.size == (8, 8) and stored.convert("RGB").getpixel((3, 3)) == (255, 255, 0)


def test_manifest_counts_and_hashes_match_the_files(converted: dict) -> None:
    out = converted["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s["samples"] for s in manifest["shards"]] == [3, 2, 1]
    assert manifest["num_samples"] == 6
    for shard in manifest["shards"]:
        assert shard["sha256"] == hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest()
    assert len(manifest["skipped"]) == 1
    skipped = manifest["skipped"][0]
    assert (skipped["index"], skipped["id"]) == ("3", "lost")
    assert skipped["reason"].startswith("image file not found") and skipped["reason"].endswith("missing.png")


def test_shard_set_from_folder_with_and_without_manifest(converted: dict, tmp_path: Path) -> None:
    out = converted["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    expected_hashes = {s["file"]: s["sha256"] for s in manifest["shards"]}

    with_manifest = ShardSet.from_folder(out)
    assert with_manifest.urls == tuple(str(out / f"shard-00000{i}.tar") for i in range(3))
    assert with_manifest.num_samples == 6
    assert with_manifest.sha256 == expected_hashes

    # Without a manifest the samples are counted in the tars and the hashes computed.
    bare = tmp_path / "bare"
    bare.mkdir()
    for tar_path in out.glob("*.tar"):
        shutil.copy(tar_path, bare / tar_path.name)
    without = ShardSet.from_folder(bare)
    assert without.urls == tuple(str(bare / f"shard-00000{i}.tar") for i in range(3))
    assert without.num_samples == 6
    assert without.sha256 == expected_hashes

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .tar shards and no manifest.json"):
        ShardSet.from_folder(empty)


@pytest.mark.parametrize(
    ("content", "message"),
    [("[{not json", "not valid JSON"), ('{"id": "a dict, not a list"}', "expected a list of records, found dict")],
)
def test_bad_json_fails_with_one_line(tmp_path: Path, content: str, message: str) -> None:
    json_path = tmp_path / "bad.json"
    json_path.write_text(content)
    result = run_cli(["-m", "mmkit.data.shards", "--json", str(json_path), "--out", str(tmp_path / "out")])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {json_path}: {message}")
    assert not (tmp_path / "out").exists()  # nothing written for an unreadable input
