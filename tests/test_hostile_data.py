"""Hostile inputs and broken files: images too wide to pad, image paths that leave their folder,
files that are not images, and a conversion cut off midway.

An image is refused from its header, before a pixel is decoded: a 100000x1 PNG is a few hundred
bytes, yet padding it to a square would allocate 30 GB. Training skips and logs it, evaluation,
generation and chat stop with one line naming the file, and the shard converter skips its record.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds
from conftest import TINY_RUN, compose, run_cli
from PIL import Image, ImageFile

from mmkit.core.errors import DataError
from mmkit.core.interfaces import ImageStats
from mmkit.core.registry import TEMPLATES, load_components
from mmkit.data import images
from mmkit.data.images import ImageProcessor
from mmkit.data.samples import SampleEncoder, SkippedSample
from mmkit.data.shards import MANIFEST, write_shards
from mmkit.evaluation.run import run_task
from mmkit.evaluation.scienceqa import ScienceQAEvaluator
from mmkit.inference.chat_session import open_image
from mmkit.inference.from_run import build_generator
from mmkit.inference.generation import Prompt
from mmkit.models.build import build_model
from mmkit.models.decoders.hf_causal_lm import prepare_tokenizer
from mmkit.training.recipe import run_stage

load_components()

TURNS = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Green."}]
# (width, height) -> words of the reason: two over image_limits.max_side (16384), and one under it
# whose padded square (81 million pixels) is over image_limits.max_working_pixels.
WIDE = {
    (100000, 1): "image too large: 100000x1 has a side over the limit of 16384",
    (40000, 1): "image too large: 40000x1 has a side over the limit of 16384",
    (9000, 1): "image too large: 9000x1 padded to a square is 81000000 pixels",
}


def _png(width: int, height: int, colour: tuple[int, int, int] = (30, 160, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _sample(key: str, image: bytes) -> dict:
    return {"__key__": key, "json": json.dumps({"id": key, "conversations": TURNS}).encode(), "png": image}


def _no_decoding(*args, **kwargs):
    raise AssertionError("an over-limit image was decoded")


@pytest.mark.parametrize(("size", "reason"), list(WIDE.items()))
def test_sample_encoder_skips_a_wide_image_from_its_header(monkeypatch, size, reason):
    encoder = SampleEncoder(TEMPLATES.get("vicuna_v1")(), prepare_tokenizer("zoo://tiny-llama"),
                            ImageProcessor(ImageStats(16, (0.5,) * 3, (0.5,) * 3), "pad"), 4, 512)
    assert not isinstance(encoder(_sample("fine", _png(40, 30))), SkippedSample)
    monkeypatch.setattr(images, "decode_image_tensor", _no_decoding)
    skipped = encoder(_sample("wide", _png(*size)))
    assert isinstance(skipped, SkippedSample) and skipped.key == "wide"
    assert skipped.reason.startswith(reason), skipped.reason


@pytest.mark.slow
def test_a_shard_with_wide_images_trains_through_and_logs_each_skip_with_its_reason(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    wide = {f"wide{width}": (width, height) for width, height in WIDE}
    good = [f"good{i}" for i in range(37)]
    keys = [*good[:5], "wide100000", *good[5:19], "wide40000", *good[19:31], "wide9000", *good[31:]]
    for start in range(0, len(keys), 20):
        with wds.TarWriter(str(shards / f"shard-{start // 20:03d}.tar")) as writer:
            for key in keys[start : start + 20]:
                writer.write(_sample(key, _png(*wide[key]) if key in wide else _png(40, 30)))
    cfg = compose(TINY_RUN + ["~data.finetune", f"+data.finetune={{name: shards, path: {shards}}}",
                              "recipe.stages.finetune.micro_batch_size=10", "recipe.stages.finetune.global_batch_size=10",
                              "guards.max_skip_fraction=0.1", "guards.min_samples_checked=20"])
    summary, _ = run_stage(cfg, "finetune", build_model(cfg), tmp_path / "run", previous=None)
    with open(tmp_path / "run" / "finetune" / "skipped.jsonl") as handle:
        logged = {entry["key"]: entry["reason"] for entry in map(json.loads, handle)}
    assert logged.keys() == wide.keys()
    for key, size in wide.items():
        assert logged[key].startswith(WIDE[size]), logged[key]
    assert summary["skipped_samples"] == 3 and summary["samples"] == 37


@pytest.fixture(scope="module")
def wide_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("wide")
    files = {"fine": (40, 30), "over_side": (40000, 1), "over_square": (9000, 1), "over_64": (100, 10)}
    for name, size in files.items():
        (folder / f"{name}.png").write_bytes(_png(*size))
    (folder / "text.png").write_text("not an image at all")
    return {name: folder / f"{name}.png" for name in [*files, "text"]}


def _ask(image: Image.Image | Path) -> Prompt:
    return Prompt([{"from": "human", "value": "<image>\nWhat is it?"}], image)


def test_generation_refuses_an_over_limit_file_with_one_line_naming_it(tiny_model, default_cfg, wide_files, monkeypatch):
    generator = build_generator(default_cfg, tiny_model, batch_size=2, max_new_tokens=2)
    assert len(generator.answer([_ask(wide_files["fine"])], progress=False)) == 1
    monkeypatch.setattr(ImageFile.ImageFile, "load", _no_decoding)  # refused from the header, never decoded
    for name, reason in [("over_side", "image too large: 40000x1 has a side over the limit of 16384"),
                         ("over_square", "image too large: 9000x1 padded to a square is 81000000 pixels")]:
        with pytest.raises(DataError) as error:
            generator.answer([_ask(wide_files[name])], progress=False)
        assert str(error.value).startswith(f"{wide_files[name]}: {reason}")
        assert "\n" not in str(error.value)


def test_generation_applies_the_runs_image_limits(tiny_model, wide_files):
    generator = build_generator(compose(["image_limits.max_side=64"]), tiny_model, batch_size=1, max_new_tokens=2)
    with pytest.raises(DataError, match=r"over_64\.png: image too large: 100x10 has a side over the limit of 64$"):
        generator.answer([_ask(wide_files["over_64"])], progress=False)
    # An image already in memory (a synthetic render, an lmms-eval visual) is checked before it is copied.
    with pytest.raises(DataError, match="image too large: 100x10 has a side over the limit of 64"):
        generator.answer([_ask(Image.new("RGB", (100, 10)))], progress=False)


def test_evaluation_stops_with_one_line_naming_the_image(tiny_model, default_cfg, tmp_path):
    problems = {}
    for pid, size in [("1", (32, 32)), ("2", (40000, 1))]:
        problems[pid] = {"question": f"Question {pid}?", "choices": ["a", "b"], "answer": 1, "hint": "",
                         "image": "image.png", "subject": "natural science", "grade": "grade2", "split": "test",
                         "lecture": "", "solution": ""}
        (tmp_path / "images" / "test" / pid).mkdir(parents=True)
        (tmp_path / "images" / "test" / pid / "image.png").write_bytes(_png(*size))
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"train": [], "val": [], "test": list(problems)}))
    generator = build_generator(default_cfg, tiny_model, batch_size=1, max_new_tokens=2)
    with pytest.raises(DataError) as error:
        run_task("scienceqa", ScienceQAEvaluator(data_dir=str(tmp_path)), tmp_path / "out", generator=generator)
    assert str(error.value) == (f"{tmp_path / 'images' / 'test' / '2' / 'image.png'}: "
                                "image too large: 40000x1 has a side over the limit of 16384")
    # The item before it was answered and kept: a re-run resumes after it.
    answered = (tmp_path / "out" / "answers.jsonl").read_text().splitlines()
    assert [json.loads(line)["question_id"] for line in answered] == ["1"]


def test_chat_names_the_image_it_refuses(wide_files):
    assert open_image(str(wide_files["fine"])).size == (40, 30)
    with pytest.raises(DataError) as error:
        open_image(str(wide_files["over_side"]))
    assert str(error.value) == f"image={wide_files['over_side']}: image too large: 40000x1 has a side over the limit of 16384"
    with pytest.raises(DataError) as error:
        open_image(str(wide_files["text"]))
    assert str(error.value) == f"image={wide_files['text']}: undecodable image: not a recognised image format"


def _shard_members(out: Path) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as archive:
            members.update({m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()})
    return members


def _partials(folder: Path) -> list[str]:
    return [path.name for path in folder.rglob("*") if "partial" in path.name]


def test_converter_skips_paths_outside_the_folder_and_files_it_cannot_use(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png(12, 12, (255, 0, 255)))
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "good.png").write_bytes(_png(20, 20))
    (folder / "sub" / "inner.png").symlink_to(folder / "good.png")  # a link within the folder is fine
    (folder / "escape.png").symlink_to(secret)
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "text.png").write_text("hello, not an image")
    (folder / "wide.png").write_bytes(_png(40000, 1))
    names = {"good": "good.png", "inner": "sub/inner.png", "dotdot": "../secret.png", "deep": "sub/../../secret.png",
             "absolute": str(secret), "escape": "escape.png", "loop": "loop.png", "text": "text.png",
             "wide": "wide.png", "lost": "missing.png"}
    records = [{"id": key, "image": name, "conversations": TURNS} for key, name in names.items()]
    (tmp_path / "data.json").write_text(json.dumps(records))
    out = tmp_path / "shards"

    result = run_cli(["-m", "mmkit.data.shards", "--json", str(tmp_path / "data.json"), "--images", str(folder),
                      "--out", str(out), "--samples-per-shard", "1"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"wrote 2 samples in 2 shards to {out}"
    assert lines[-1] == ("skipped 8 records: 4 image path outside the image folder, 1 image path not usable, "
                         "1 not an image, 1 image too large, 1 image file not found")
    reasons = {skip["id"]: skip["reason"] for skip in json.loads((out / MANIFEST).read_text())["skipped"]}
    assert reasons.pop("loop").startswith("image path not usable: 'loop.png' (Symlink loop from ")
    assert reasons == {
        "dotdot": "image path outside the image folder: ../secret.png",
        "deep": "image path outside the image folder: sub/../../secret.png",
        "absolute": f"image path outside the image folder: {secret} (absolute; records name files in the folder)",
        "escape": "image path outside the image folder: escape.png",
        "text": "not an image: text.png is no image format PIL reads",
        "wide": "image too large: 40000x1 has a side over the limit of 16384",
        "lost": f"image file not found: {folder / 'missing.png'}",
    }
    for key, reason in reasons.items():
        assert f"(id {key}): {reason}" in result.stdout
    members = _shard_members(out)
    assert sorted(members) == ["good.json", "good.png", "inner.json", "inner.png"]
    assert secret.read_bytes() not in members.values()
    assert members["inner.png"] == (folder / "good.png").read_bytes()
    assert _partials(tmp_path) == []


def test_converter_limits_are_options(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "wide.png").write_bytes(_png(40000, 1))
    (tmp_path / "data.json").write_text(json.dumps([{"id": "wide", "image": "wide.png", "conversations": TURNS}]))
    result = run_cli(["-m", "mmkit.data.shards", "--json", str(tmp_path / "data.json"), "--images",
                      str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--max-side", "40000"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote 1 samples in 1 shards to {tmp_path / 'out'}"
    assert _shard_members(tmp_path / "out")["wide.png"] == (tmp_path / "images" / "wide.png").read_bytes()


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_a_conversion_cut_off_midway_leaves_no_partial_and_no_shard(tmp_path, failure):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(_png(8, 8))

    def records():
        for index in range(7):  # two whole shards of three, then a third open when it fails
            yield {"id": f"r{index}", "image": "a.png", "conversations": TURNS}
        raise failure("cut off")

    out = tmp_path / "out"
    with pytest.raises(failure):
        write_shards(records(), tmp_path / "images", out, samples_per_shard=3, progress=False)
    assert sorted(os.listdir(out)) == []  # hidden temporary files included


def test_an_interrupted_cli_conversion_leaves_nothing_behind(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(_png(8, 8))
    records = [{"id": f"r{index}", "image": "a.png", "conversations": TURNS} for index in range(100_000)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "mmkit.data.shards", "--json", str(tmp_path / "data.json"), "--images",
         str(tmp_path / "images"), "--out", str(out), "--samples-per-shard", "500"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # As a terminal's Ctrl-C finds it: a suite started in the background (`make test &`)
        # hands its children SIGINT ignored, and Python then never raises KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (out / "shard-000001.tar").exists():  # two shards written, a third open
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].endswith(f"interrupted: no shard of this conversion is left in {out}")
    assert sorted(os.listdir(out)) == []
