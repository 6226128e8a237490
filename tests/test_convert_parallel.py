"""The mix665k-shaped generator, and the converter at that size: parallel workers give the same
bytes as one, a conversion killed outright finishes on a second run with the same bytes, and
under a launcher only rank 0 converts while the others wait for its manifest."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from mmkit.data.shards import DONE_SUFFIX, MANIFEST, write_shards
from mmkit.synth.mix665k import (
    OPTION_LETTER,
    REGION_BOX,
    REGION_DESCRIPTION,
    SHORT_ANSWER,
    SOURCES,
    estimated_tokens,
    source_counts,
    write_mix665k,
)

RECORDS = 6650  # a hundredth of the real file


@pytest.fixture(scope="module")
def mix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mix")
    return write_mix665k(out, records=RECORDS, images=60, seed=0, progress=False)


def _group(record: dict) -> str:
    """The record's source, as far as its shape tells it (VQAv2 and OK-VQA look alike)."""
    if "image" not in record:
        return "sharegpt"
    folder, text = record["image"].split("/")[0], record["conversations"][0]["value"]
    if folder != "coco":
        return {"gqa": "gqa", "ocr_vqa": "ocrvqa", "textvqa": "textcaps", "vg": "vg"}[folder]
    if OPTION_LETTER in text:
        return "aokvqa"
    if SHORT_ANSWER in text:
        return "vqav2+okvqa"
    if REGION_BOX in text or REGION_DESCRIPTION in text:
        return "refcoco"
    return "llava"


def test_generator_keeps_the_real_proportions_and_shapes(mix: Path) -> None:
    records = json.loads(mix.read_text())
    assert len(records) == RECORDS
    expected = source_counts(RECORDS)
    assert sum(expected.values()) == RECORDS
    whole = sum(thousands for thousands, _ in SOURCES.values())
    for source, count in expected.items():  # within rounding of Table 7's shares
        assert abs(count - RECORDS * SOURCES[source][0] / whole) < 1
    expected["vqav2+okvqa"] = expected.pop("vqav2") + expected.pop("okvqa")
    assert Counter(_group(r) for r in records) == expected

    text_only = [r for r in records if "image" not in r]
    assert all("<image>" not in turn["value"] for r in text_only for turn in r["conversations"])
    assert sum(estimated_tokens(r) > 2048 for r in text_only) >= 0.02 * len(text_only)
    vqa = [r for r in records if SHORT_ANSWER in r["conversations"][0]["value"]]
    assert max(len(r["conversations"]) for r in vqa) >= 16  # many short turns
    boxes = [t["value"] for r in records if _group(r) in ("refcoco", "vg") for t in r["conversations"]
             if t["value"].startswith("[")]
    assert boxes and all(len(json.loads(box)) == 4 for box in boxes)
    images = {r["image"] for r in records if "image" in r}
    assert all((mix.parent / image).is_file() for image in images)
    assert {image.split("/")[0] + "/" + image.split("/")[1] for image in images} == {
        "coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K"}
    assert len(images) < len(records) // 50  # images are reused across records


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.iterdir())}


def test_parallel_conversion_equals_one_worker_byte_for_byte(mix: Path, tmp_path: Path) -> None:
    records = json.loads(mix.read_text())[:1500]
    records[7]["image"] = "../outside.jpg"  # a skipped record in the middle of a shard
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"workers{workers}"
        report = write_shards(records, mix.parent, outs[workers], samples_per_shard=100, progress=False,
                              total=len(records), workers=workers)
        assert report.num_samples == len(records) - 1
    one, two = _shard_bytes(outs[1]), _shard_bytes(outs[2])
    assert len(one) == 16 and one == two  # 15 shards and the manifest; no done file left
    assert not any(name.endswith(DONE_SUFFIX) for name in one)


def _convert_command(json_path: Path, images: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "mmkit.data.shards", "--json", str(json_path), "--images", str(images),
            "--out", str(out), "--samples-per-shard", "200", "--workers", "2"]


@pytest.mark.slow
def test_a_killed_conversion_finishes_on_a_second_run_with_the_same_bytes(mix: Path, tmp_path: Path) -> None:
    records = json.loads(mix.read_text()) * 2
    big = tmp_path / "big.json"
    big.write_text(json.dumps(records))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    write_shards(records, mix.parent, whole, samples_per_shard=200, progress=False, workers=2)

    # A new session: SIGKILL reaches the parent and its workers at once, as a lost node would.
    process = subprocess.Popen(_convert_command(big, mix.parent, killed), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(killed.glob(f"*{DONE_SUFFIX}"))) < 2:
            assert process.poll() is None and time.monotonic() < deadline, "finished before it could be killed"
            time.sleep(0.01)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    done_before = {path.name: path.stat().st_mtime_ns for path in killed.glob("*.tar")
                   if Path(f"{path}{DONE_SUFFIX}").exists()}
    assert done_before and not (killed / MANIFEST).exists()

    result = subprocess.run(_convert_command(big, mix.parent, killed), check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert {name: (killed / name).stat().st_mtime_ns for name in done_before} == done_before  # not rewritten
    assert _shard_bytes(killed) == _shard_bytes(whole)


def _shard_set_command() -> list[str]:
    script = ("import sys; from mmkit.data.datasets.llava_json import LlavaJsonDataset; "
              "print(LlavaJsonDataset(sys.argv[1], sys.argv[2], 500).shard_set().num_samples)")
    return [sys.executable, "-c", script]


@pytest.mark.slow
def test_only_rank_zero_converts_and_the_others_wait_for_its_manifest(mix: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MMKIT_HOME": str(tmp_path / "home")}
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        env.pop(name, None)
    arguments = [str(mix), str(mix.parent)]
    waiting = subprocess.Popen(_shard_set_command() + arguments, env={**env, "RANK": "1"}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    converting = subprocess.run(_shard_set_command() + arguments, env={**env, "RANK": "0"}, check=False, text=True,
                                capture_output=True)
    waited, wait_log = waiting.communicate(timeout=300)
    assert converting.returncode == 0, converting.stderr
    assert waiting.returncode == 0, wait_log
    assert waited.strip() == converting.stdout.strip() == str(RECORDS)
    assert "rank 1: waiting up to" in wait_log and "rank 0 to convert" in wait_log
    assert "shards" not in wait_log.split("waiting up to", 1)[1].split("\n", 1)[1]  # rank 1 converted nothing


@pytest.mark.slow
def test_a_rank_alone_gives_up_with_a_clear_message(mix: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MMKIT_HOME": str(tmp_path / "home"), "SLURM_PROCID": "3", "MMKIT_RANK0_WAIT_S": "1"}
    env.pop("RANK", None)
    result = subprocess.run(_shard_set_command() + [str(mix), str(mix.parent)], env=env, check=False, text=True,
                            capture_output=True)
    assert result.returncode != 0
    assert "DataError: rank 3: rank 0 did not convert" in result.stderr
    assert "within 1 s" in result.stderr and "MMKIT_RANK0_WAIT_S" in result.stderr
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*.tar"))
