"""``python -m mmkit.check_data``: the data as training sees it, and a non-zero exit on bad samples."""
from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import run_cli
from PIL import Image

CHECK = ["-m", "mmkit.check_data"]
SMALL_FINETUNE = ["data.finetune.count=20", "data.finetune.samples_per_shard=10"]


def _row(stdout: str, label: str) -> str:
    """The value column of one summary row."""
    match = re.search(rf"^  {re.escape(label)}\s+(.+)$", stdout, flags=re.MULTILINE)
    assert match, f"no summary row {label!r} in:\n{stdout}"
    return match.group(1).strip()


def test_default_data_is_clean_and_rendered_with_trained_spans() -> None:
    result = run_cli([*CHECK, "--samples", "2", *SMALL_FINETUNE])
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    # The last stage of the default recipe, with its template, is what gets checked.
    # (searched, not matched at the start: building the zoo tokenizer prints blank lines on first use)
    assert re.search(r"^stage finetune: template vicuna_v1, dataset synthetic", out, flags=re.MULTILINE)
    assert len(re.findall(r"^--- sample ", out, flags=re.MULTILINE)) == 2
    # Not a tty: trained spans are wrapped in [[ ]], and each is an assistant reply ending in eos.
    replies = re.findall(r"ASSISTANT:\[\[ (.+?)</s>\]\]", out)
    assert replies and all(reply.strip() for reply in replies)
    # Nothing the human says is trained.
    assert not re.search(r"\[\[[^\]]*USER:", out)
    assert "<image x4>" in out and "<image><image>" not in out
    samples = int(_row(out, "samples checked"))
    assert samples >= 20  # the rules teacher writes several conversations per scene
    assert int(_row(out, "encoded for training")) == samples
    for label in ("skipped by SampleEncoder", "empty labels", "wrong image-token count"):
        assert _row(out, label) == "0"
    assert out.rstrip().endswith(f"OK: 0 problems in {samples} samples")


def _bad_shards(tmp_path: Path) -> Path:
    from mmkit.data.shards import convert_llava_json

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "red.png")
    records = [
        {"id": "good", "image": "red.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "no_reply", "image": "red.png",
         "conversations": [{"from": "human", "value": "<image>\nDescribe the image."}]},
        {"id": "two_placeholders", "image": "red.png",
         "conversations": [{"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "Same."}]},
    ]
    json_path = tmp_path / "data.json"
    json_path.write_text(json.dumps(records))
    out = tmp_path / "shards"
    report = convert_llava_json(json_path, images, out, samples_per_shard=10, progress=False)
    assert report.num_samples == 3 and not report.skipped  # the converter keeps them: only the check can tell
    return out


def test_bad_samples_are_reported_and_fail_the_check(tmp_path: Path) -> None:
    shards = _bad_shards(tmp_path)
    result = run_cli([*CHECK, "--samples", "3", f"recipe.stages.finetune.data={{name:shards,path:'{shards}'}}"])
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "dataset shards (3 samples in 1 shards)" in out
    assert "ASSISTANT:[[ Red.</s>]]" in out  # the good sample is still rendered as trained
    assert _row(out, "samples checked") == "3"
    assert _row(out, "encoded for training") == "1"
    assert _row(out, "skipped by SampleEncoder") == "2"
    assert _row(out, "wrong image-token count") == "1"  # 8 image tokens for one image of 4
    assert "wrong image-token count (8, expected 4)" in out
    # Reasons are grouped by shape (numbers as N), each with an example sample.
    assert "skip reason x1: N <image> placeholders for N image(s)  (e.g. two_placeholders: 2 <image> placeholders for 1 image(s))" in out
    assert re.search(r"skip reason x1: the conversation has no assistant reply .*\(e\.g\. no_reply\)", out)
    assert "problem samples: no_reply, two_placeholders" in out
    assert out.rstrip().endswith("FAIL: 2 problems in 3 samples")


def test_unknown_names_fail_with_one_line() -> None:
    result = run_cli([*CHECK, "connector=nope"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: connector=nope: no such connector config; available: identity, linear, mlp2x_gelu"
    ]
    result = run_cli([*CHECK, "--stage", "stage3"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --stage stage3: the recipe has no such stage; stages: pretrain, finetune"
    ]
