"""Damaged samples of every kind: logged one by one below the guard's threshold, a clear stop above it.

A shard set with 5% of its samples damaged, every kind of damage among them, trains to the end
with a 10% guard; one with 20% damaged stops with the guard's message."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import webdataset as wds
from conftest import TINY_RUN, compose
from PIL import Image

from mmkit.core.errors import DataError
from mmkit.models.build import build_model
from mmkit.training.recipe import run_stage

GOOD_TURNS = [{"from": "human", "value": "<image>\nWhat colour dominates?"}, {"from": "gpt", "value": "Green."}]


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (30, 160, 60)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _record(key: str, turns: list[dict]) -> bytes:
    return json.dumps({"id": key, "image": f"{key}.jpg", "conversations": turns}).encode()


# Each kind of damage: the sample as stored, and the words its logged reason must contain.
DAMAGE = {
    "corrupt_image": (lambda key: {"json": _record(key, GOOD_TURNS), "jpg": b"\xff\xd8\xff garbage"}, "undecodable image"),
    "truncated_image": (lambda key: {"json": _record(key, GOOD_TURNS), "jpg": _jpeg()[:300]}, "undecodable image"),
    "bad_json": (lambda key: {"json": b'{"id": "x", "conversations": [', "jpg": _jpeg()}, "undecodable JSON"),
    "no_answer": (lambda key: {"json": _record(key, GOOD_TURNS[:1]), "jpg": _jpeg()}, "no assistant reply"),
    "placeholders": (lambda key: {"json": _record(key, [{"from": "human", "value": "<image>\n<image>\nHi"},
                                                         GOOD_TURNS[1]]), "jpg": _jpeg()}, "placeholders for 1 image"),
    "too_long": (lambda key: {"json": _record(key, [GOOD_TURNS[0], {"from": "gpt", "value": "green " * 600}]),
                              "jpg": _jpeg()}, "exceed data.max_length"),
}


def write_shards(folder: Path, total: int, bad_per_kind: int) -> dict[str, str]:
    """``total`` samples in shards of 60, ``bad_per_kind`` of each kind of damage spread among
    them; returns the damaged keys with the words their reason must contain."""
    folder.mkdir(parents=True)
    damaged = {f"{kind}{i}": kind for kind in DAMAGE for i in range(bad_per_kind)}
    keys = [f"good{i}" for i in range(total - len(damaged))] + list(damaged)
    random.Random(0).shuffle(keys)  # damage spread through the shards, the same way every run
    for start in range(0, total, 60):
        with wds.TarWriter(str(folder / f"shard-{start // 60:03d}.tar")) as writer:
            for key in keys[start : start + 60]:
                sample = DAMAGE[damaged[key]][0](key) if key in damaged else {"json": _record(key, GOOD_TURNS), "jpg": _jpeg()}
                writer.write({"__key__": key, **sample})
    return {key: DAMAGE[kind][1] for key, kind in damaged.items()}


def stage_config(shards: Path) -> list[str]:
    return TINY_RUN + ["~data.finetune", f"+data.finetune={{name: shards, path: {shards}}}",
                       "recipe.stages.finetune.micro_batch_size=10", "recipe.stages.finetune.global_batch_size=10",
                       "guards.max_skip_fraction=0.1", "guards.min_samples_checked=100",
                       "data.too_long=skip"]  # these tests count over-long samples among the skipped


def test_five_percent_damaged_trains_to_the_end_with_every_sample_logged(tmp_path):
    expected = write_shards(tmp_path / "shards", total=240, bad_per_kind=2)  # 6 kinds x 2 = 12 = 5%
    cfg = compose(stage_config(tmp_path / "shards"))
    summary, _ = run_stage(cfg, "finetune", build_model(cfg), tmp_path / "run", previous=None)
    logged = {entry["key"]: entry["reason"] for entry in map(json.loads, (tmp_path / "run" / "finetune" / "skipped.jsonl").open())}
    assert logged.keys() == expected.keys()  # every damaged sample, and nothing else
    for key, words in expected.items():
        assert words in logged[key], (key, logged[key])
    assert summary["skipped_samples"] == 12 and summary["samples"] == 228  # nothing silently dropped


def test_twenty_percent_damaged_stops_with_the_message(tmp_path):
    write_shards(tmp_path / "shards", total=240, bad_per_kind=8)  # 6 kinds x 8 = 48 = 20%
    cfg = compose(stage_config(tmp_path / "shards"))
    with pytest.raises(DataError, match=r"samples read so far were skipped .* guards.max_skip_fraction=0.1"):
        run_stage(cfg, "finetune", build_model(cfg), tmp_path / "run", previous=None)
