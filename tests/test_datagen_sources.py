"""Instruction data from real annotations: a COCO-format fixture (real JPEGs, COCO-shaped
caption and instance files made here) and a jsonl file, written by the openai teacher against
the test chat server on 127.0.0.1 with a prompt folder in LLaVA's layout made here; the output
trains a tiny run through the ``llava_json`` dataset. Also the dry run's figures and the quality
report on the fixture, with a planted hallucinating reply."""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN, compose, run_cli
from openai_server import FakeChatServer
from PIL import Image, ImageDraw

from mmkit.core.errors import ConfigError
from mmkit.data.datasets.llava_json import LlavaJsonDataset
from mmkit.datagen.prompts import SYSTEM_PROMPTS, format_context, load_prompt_folder
from mmkit.datagen.sources.coco import CocoSource
from mmkit.datagen.sources.jsonl import JsonlSource
from mmkit.datagen.teacher import IMAGE_PLACEHOLDER

KEY_ENV = "MMKIT_TEST_TEACHER_KEY"
DATAGEN = ["-m", "mmkit.datagen"]
CATEGORIES = {1: "person", 2: "bicycle", 6: "bus", 15: "bench", 18: "dog", 25: "giraffe"}
# file name, width, height, captions, instances (category id, COCO bbox [x, y, w, h] in pixels)
IMAGES = [
    ("000000000139.jpg", 640, 480, ["A man sits on a park bench with his dog.", "A person and a dog near a bench."],
     [(1, [100, 120, 200, 300]), (18, [400, 300, 160, 120]), (15, [600, 400, 50, 100])]),
    ("000000000285.jpg", 500, 375, ["A dog runs beside a bicycle.", "A brown dog and a parked bicycle."],
     [(18, [50, 100, 150, 150]), (2, [250, 50, 200, 300])]),
    ("000000000632.jpg", 427, 640, ["A red double-decker bus on a street.", "A person waits as the bus passes."],
     [(6, [20, 100, 400, 300]), (1, [300, 400, 60, 200])]),
    ("000000000724.jpg", 480, 480, ["A stop sign on a quiet corner.", "A red sign by the road."], []),
]
LLAVA_TYPE_FOLDERS = {"conversation": "conversation", "detailed": "detail_description", "reasoning": "complex_reasoning"}
_BOX_LINE = re.compile(r"^([a-z ]+): \[([^\]]*)\]$", re.MULTILINE)


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "secret")


def _jpeg(path: Path, width: int, height: int, seed: int) -> None:
    image = Image.new("RGB", (width, height), (40 * seed % 255, 120, 200))
    ImageDraw.Draw(image).rectangle([width // 4, height // 4, width // 2, height // 2], fill=(250, 200, 20))
    image.save(path, format="JPEG", quality=85)


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """COCO's layout: annotations/{captions,instances}_val2017.json beside val2017/."""
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    (root / "val2017").mkdir()
    images, captions, instances = [], [], []
    for index, (name, width, height, texts, boxes) in enumerate(IMAGES):
        image_id = int(Path(name).stem)
        _jpeg(root / "val2017" / name, width, height, index)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height, "license": 1,
                       "coco_url": f"http://images.cocodataset.org/val2017/{name}"})
        captions += [{"id": 1000 * image_id + k, "image_id": image_id, "caption": text} for k, text in enumerate(texts)]
        instances += [{"id": 2000 * image_id + k, "image_id": image_id, "category_id": category, "bbox": bbox,
                       "area": bbox[2] * bbox[3], "iscrowd": 0, "segmentation": []}
                      for k, (category, bbox) in enumerate(boxes)]
    info = {"description": "test fixture in COCO's format", "version": "1.0", "year": 2017}
    (root / "annotations" / "captions_val2017.json").write_text(
        json.dumps({"info": info, "images": images, "annotations": captions}))
    categories = [{"id": key, "name": name, "supercategory": "thing"} for key, name in CATEGORIES.items()]
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"info": info, "images": images, "annotations": instances, "categories": categories}))
    return root


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prompt folder in LLaVA's playground/data/prompts layout, with its own wording."""
    root = tmp_path_factory.mktemp("prompts")
    examples = {
        "conversation": ("Question:\nWhat is on the table?\n===\nAnswer:\nA cake with candles.\n===\n"
                         "Question:\nIs anyone eating?\n===\nAnswer:\nNo, nobody is eating yet."),
        "detailed": "A birthday cake with candles stands on a wooden table in a bright room.",
        "reasoning": "Question:\nWhat is being celebrated?\n===\nAnswer:\nThe candles on the cake suggest a birthday.",
    }
    for response_type, folder in LLAVA_TYPE_FOLDERS.items():
        path = root / folder
        path.mkdir()
        (path / "system_message.txt").write_text(f"You are an AI visual assistant [{response_type} prompt]. "
                                                 "Answer as if you saw the image.\n")
        for number in range(2):
            (path / f"{number:03d}_caps.txt").write_text(
                f"A cake on a table, example {number}.\nCandles burn on a cake.\n\ncake: [0.2, 0.3, 0.6, 0.7]\n")
            (path / f"{number:03d}_conv.txt").write_text(examples[response_type].replace("cake", f"cake {number}"))
    return root


def _type_of(messages: list[dict]) -> str:
    """The response type a request asks for: by the test folder's mark, or the shipped prompt's system message."""
    system = messages[0]["content"]
    return next(t for t in LLAVA_TYPE_FOLDERS if f"[{t} prompt]" in system or SYSTEM_PROMPTS[t] == system)


def _context(messages: list[dict]) -> tuple[list[str], list[str]]:
    """(captions, labels) of the image a request asks about, read from its last message."""
    text = messages[-1]["content"]
    captions = text.split("\n\n")[0].splitlines()
    return captions, [label for label, _ in _BOX_LINE.findall(text)]


class Teacher:
    """The chat server's replies, in LLaVA's reply format, true of the image's notes, except:
    the bus image's conversation invents a giraffe; the first reasoning reply about the bicycle
    image does not parse (its second does); every detailed reply about the stop sign does not."""

    def __init__(self) -> None:
        self.asked: Counter[tuple[str, str]] = Counter()

    def __call__(self, messages: list[dict]) -> str:
        response_type = _type_of(messages)
        captions, labels = _context(messages)
        self.asked[response_type, captions[0]] += 1
        objects = " and ".join(f"a {label}" for label in labels) or "no labelled objects"
        if response_type == "conversation":
            extra = ("There is a giraffe standing next to the bus." if "double-decker" in captions[0]
                     else "No, there is no giraffe in the image.")
            return (f"Question:\nWhat can you see?\n===\nAnswer:\nI can see {objects}.\n===\n"
                    f"Question:\nIs there a giraffe?\n===\nAnswer:\n{extra}")
        if response_type == "detailed":
            if "stop sign" in captions[0]:
                return "Question:\nWhat is it?\n===\nAnswer:\nA sign."
            return f"{captions[0]} The picture shows {objects}."
        if "bicycle" in captions[0] and self.asked[response_type, captions[0]] == 1:
            return "I am not sure what to ask."
        return f"Question:\nHow many objects are labelled?\n===\nAnswer:\nThere are {len(labels)}: {objects}."


def _datagen(server: FakeChatServer, out: Path, cache: Path, *extra: str) -> list[str]:
    return DATAGEN + ["--teacher", "openai", "--out", str(out), "--samples-per-shard", "4", "--no-progress",
                      "--option", f"base_url={server.base_url}", "--option", "model=fake-gpt",
                      "--option", f"api_key_env={KEY_ENV}", "--option", f"cache_dir={cache}", *extra]


def _coco_source(coco: Path) -> list[str]:
    return ["--source", "coco",
            "--source-option", f"captions={coco / 'annotations' / 'captions_val2017.json'}",
            "--source-option", f"instances={coco / 'annotations' / 'instances_val2017.json'}"]


def test_coco_boxes_are_fractions_of_each_image_with_three_decimals(coco: Path) -> None:
    source = CocoSource(captions=str(coco / "annotations" / "captions_val2017.json"),
                        instances=str(coco / "annotations" / "instances_val2017.json"))
    assert source.image_root == coco / "val2017"  # COCO's layout
    images = source.images()
    assert [(i.id, i.image) for i in images] == [(Path(n).stem, n) for n, *_ in IMAGES]
    view = source.view(images[0], rng=None)
    assert view["captions"] == IMAGES[0][3]
    context = format_context(view)
    # person [100, 120, 200, 300] in 640 x 480: x2 = 300, y2 = 420; the bench overhangs and is clipped.
    assert context.splitlines()[-3:] == [
        "person: [0.156, 0.25, 0.469, 0.875]", "dog: [0.625, 0.625, 0.875, 0.875]", "bench: [0.938, 0.833, 1.0, 1.0]"]
    # The portrait image is normalised by its own size.
    assert "bus: [0.047, 0.156, 0.984, 0.625]" in format_context(source.view(images[2], rng=None))
    assert source.view(images[3], rng=None)["objects"] == []
    assert source.vocabulary() == sorted(CATEGORIES.values())


def test_a_prompt_folder_in_llava_layout_is_read_verbatim_and_refused_when_a_pair_is_broken(
        prompts: Path, tmp_path: Path) -> None:
    prompt = load_prompt_folder(prompts / "conversation")
    assert prompt.system == (prompts / "conversation" / "system_message.txt").read_text().rstrip("\n")
    assert [caps for caps, _ in prompt.examples] == [
        (prompts / "conversation" / f"{n:03d}_caps.txt").read_text().rstrip("\n") for n in range(2)]
    assert prompt.with_boxes  # its examples list boxes, so each image's context does too
    unpaired = tmp_path / "unpaired"
    unpaired.mkdir()
    (unpaired / "system_message.txt").write_text("hi")
    (unpaired / "000_caps.txt").write_text("A cat on a mat.")
    (unpaired / "000_conv.txt").write_text("Question:\nWhat is it?\n===\nAnswer:\nA cat.")
    (unpaired / "001_conv.txt").write_text("Question:\nWhere?\n===\nAnswer:\nOn a mat.")
    with pytest.warns(UserWarning, match="001_conv.txt has no 001_caps.txt beside it; that example is left out"):
        captions_only = load_prompt_folder(unpaired)
    assert captions_only.examples == (("A cat on a mat.", "Question:\nWhat is it?\n===\nAnswer:\nA cat."),)
    # Examples with captions only (LLaVA's conversation prompt): the image's context has no boxes either.
    view = {"captions": ["A dog on grass."], "objects": [{"category": "dog", "bbox": [0.1, 0.2, 0.3, 0.4]}]}
    assert not captions_only.with_boxes and captions_only.messages(view)[-1]["content"] == "A dog on grass."
    with pytest.raises(ConfigError, match="has no system_message.txt"):
        load_prompt_folder(tmp_path)


@pytest.fixture(scope="module")
def coco_run(coco: Path, prompts: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("coco_run")
    teacher = Teacher()
    with FakeChatServer(api_key="secret", respond=teacher) as server, pytest.MonkeyPatch.context() as env:
        env.setenv(KEY_ENV, "secret")  # the autouse fixture's is set per test, after this module's fixture
        dry = run_cli(_datagen(server, work / "dry", work / "cache", *_coco_source(coco), "--prompts", str(prompts),
                               "--dry-run", "--price-in", "2.5", "--price-out", "10"), timeout=120)
        sent_by_dry_run = server.requests
        result = run_cli(_datagen(server, work / "out", work / "cache", *_coco_source(coco),
                                  "--prompts", str(prompts)), timeout=120)
        received = list(server.received)
    return {"dry": dry, "result": result, "received": received, "out": work / "out", "dry_out": work / "dry",
            "sent_by_dry_run": sent_by_dry_run}


@pytest.mark.slow
def test_coco_annotations_become_llava_instruct_data_written_through_llava_prompts(coco_run, coco, prompts) -> None:
    result, out = coco_run["result"], coco_run["out"]
    assert result.returncode == 0, result.stderr
    # The requests carry the prompt folder verbatim: system message, examples in order, then the image.
    for messages in coco_run["received"]:
        folder = prompts / LLAVA_TYPE_FOLDERS[_type_of(messages)]
        expected = [{"role": "system", "content": (folder / "system_message.txt").read_text().rstrip("\n")}]
        for number in range(2):
            expected += [{"role": "user", "content": (folder / f"{number:03d}_caps.txt").read_text().rstrip("\n")},
                         {"role": "assistant", "content": (folder / f"{number:03d}_conv.txt").read_text().rstrip("\n")}]
        assert messages[:-1] == expected and messages[-1]["role"] == "user"
    contexts = {m[-1]["content"] for m in coco_run["received"]}
    assert "A man sits on a park bench with his dog.\nA person and a dog near a bench.\n\n" \
           "person: [0.156, 0.25, 0.469, 0.875]\ndog: [0.625, 0.625, 0.875, 0.875]\nbench: [0.938, 0.833, 1.0, 1.0]" \
           in contexts
    # 12 first replies; the bicycle image's reasoning and the stop sign's description asked again.
    assert len(coco_run["received"]) == 12 + 2
    assert "unusable replies asked again 2, made good by the second reply 1" in result.stdout
    assert "failed: 1 (detailed 1)" in result.stdout
    assert "000000000724-1 (detailed): a description was asked for, but the reply has Question/Answer lines (twice)" \
        in result.stdout

    records = json.loads((out / "llava_instruct.json").read_text())
    assert len(records) == 11 and all(set(r) == {"id", "image", "conversations"} for r in records)
    assert {r["image"] for r in records} == {name for name, *_ in IMAGES}  # relative to the image folder
    by_id = {r["id"]: r for r in records}
    chat = by_id["000000000139-0"]["conversations"]
    assert [t["from"] for t in chat] == ["human", "gpt"] * 2
    assert chat[0]["value"].replace(IMAGE_PLACEHOLDER, "").strip() == "What can you see?"
    assert chat[0]["value"].count(IMAGE_PLACEHOLDER) == 1 and IMAGE_PLACEHOLDER not in chat[2]["value"]
    assert chat[1]["value"] == "I can see a person and a dog and a bench."
    assert by_id["000000000285-2"]["conversations"][1]["value"] == "There are 2: a dog and a bicycle."
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] == 11

    # The quality report flags the planted giraffe, and nothing else.
    quality = json.loads((out / "quality.json").read_text())
    assert quality["conversations"] == 11
    assert quality["hallucination"]["flagged"] == 1
    (flagged,) = quality["hallucination"]["examples"]
    assert flagged["id"] == "000000000632-0" and flagged["absent"] == ["giraffe"]
    assert (out / "quality.md").is_file() and (out / "quality.png").stat().st_size > 0
    assert "hallucination proxy" in result.stdout


@pytest.mark.slow
def test_the_dry_run_counts_what_a_run_sends_and_prices_it(coco_run) -> None:
    dry = coco_run["dry"]
    assert dry.returncode == 0, dry.stderr
    assert coco_run["sent_by_dry_run"] == 0 and not coco_run["dry_out"].exists()
    rows = {line.split()[0]: [int(v.replace(",", "")) for v in line.split()[1:]]
            for line in dry.stdout.splitlines() if re.match(r"^(conversation|detailed|reasoning|total) ", line)}
    # The prompt tokens of the requests the real run sent first (not its retries), at 4 characters a
    # token and 4 a message, as the dry run says it counts.
    first = {}
    for messages in coco_run["received"]:
        first.setdefault((_type_of(messages), messages[-1]["content"]), messages)
    sent = Counter()
    for (response_type, _), messages in first.items():
        sent[response_type] += sum(math.ceil(len(m["content"]) / 4) + 4 for m in messages)
    for response_type in LLAVA_TYPE_FOLDERS:
        assert rows[response_type][:2] == [4, sent[response_type]]
    assert rows["total"][:2] == [12, sum(sent.values())]
    reply_tokens, most = rows["total"][2], rows["total"][3]
    assert most == 12 * 1024
    cost = re.search(r"total \$([\d.]+) \(at most \$([\d.]+)\)", dry.stdout)
    assert float(cost[1]) == pytest.approx(sum(sent.values()) * 2.5e-6 + reply_tokens * 10e-6, abs=1e-4)
    assert float(cost[2]) == pytest.approx(sum(sent.values()) * 2.5e-6 + most * 10e-6, abs=1e-4)
    # The README shows this dry run's table and cost: they are these figures.
    readme = (REPO / "README.md").read_text()
    shown = [line for line in dry.stdout.splitlines() if line.startswith(("type ", "conversation ", "detailed ",
                                                                             "reasoning ", "total ", "cost at "))]
    assert len(shown) == 6 and all(f"    {line}\n" in readme for line in shown), dry.stdout


@pytest.mark.slow
def test_the_written_json_trains_a_tiny_run_through_llava_json(coco_run, coco, tmp_path: Path) -> None:
    from mmkit.models.build import build_model
    from mmkit.training.recipe import run_stage

    json_path = coco_run["out"] / "llava_instruct.json"
    shards = LlavaJsonDataset(json=str(json_path), image_folder=str(coco / "val2017"), samples_per_shard=4).shard_set()
    assert shards.num_samples == 11
    cfg = compose(TINY_RUN + [
        "~data.finetune", f"+data.finetune={{name: llava_json, json: {json_path}, image_folder: {coco / 'val2017'}}}",
        # One sample a step: every one of the 11 is trained (a last, incomplete batch would be dropped).
        "recipe.stages.finetune.micro_batch_size=1", "recipe.stages.finetune.global_batch_size=1",
        "data.shuffle_buffer=0"])
    summary, _ = run_stage(cfg, "finetune", build_model(cfg), tmp_path / "run", previous=None)
    assert summary["samples"] == 11 and summary["skipped_samples"] == 0
    assert summary["steps"] == 11 and math.isfinite(summary["final_loss"])


@pytest.mark.slow
def test_a_jsonl_source_works_the_same_way(coco: Path, prompts: Path, tmp_path: Path) -> None:
    lines = [
        {"image": "000000000139.jpg", "captions": ["A man and his dog on a bench, by a toy giraffe."],
         "boxes": [{"label": "dog", "bbox": [0.625, 0.625, 0.875, 0.875]},  # fractions already
                   {"label": "giraffe", "bbox": [0.1, 0.1, 0.2, 0.3]}]},  # the check knows the file's labels
        {"id": "bike", "image": "000000000285.jpg", "caption": "A dog and a bicycle.", "width": 500, "height": 375,
         "boxes": [{"label": "bicycle", "bbox": [250, 50, 450, 350]}]},  # pixels, size on the line
        {"image": "000000000632.jpg", "captions": ["A red double-decker bus."],
         "boxes": [{"label": "bus", "bbox": [20, 100, 420, 400]}]},  # pixels, size from the file's header
    ]
    path = tmp_path / "annotations.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = JsonlSource(path=str(path), images=str(coco / "val2017"))
    assert [image.id for image in source.images()] == ["000000000139", "bike", "000000000632"]
    assert source.view(source.images()[1], rng=None)["objects"] == [{"category": "bicycle", "bbox": [0.5, 0.133, 0.9, 0.933]}]
    assert source.view(source.images()[2], rng=None)["objects"][0]["bbox"] == [0.047, 0.156, 0.984, 0.625]

    with FakeChatServer(api_key="secret", respond=Teacher()) as server:
        result = run_cli(_datagen(server, tmp_path / "out", tmp_path / "cache", "--source", "jsonl",
                                  "--source-option", f"path={path}", "--source-option", f"images={coco / 'val2017'}",
                                  "--prompts", f"conversation={prompts / 'conversation'}"), timeout=120)
        assert result.returncode == 0, result.stderr
        conversation_requests = [m for m in server.received if "[conversation prompt]" in m[0]["content"]]
    assert len(conversation_requests) == 3  # the folder given for one type; the shipped prompts for the others
    records = json.loads((tmp_path / "out" / "llava_instruct.json").read_text())
    assert {r["id"].rsplit("-", 1)[0] for r in records} == {"000000000139", "bike", "000000000632"}
    quality = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert [e["id"] for e in quality["hallucination"]["examples"]] == ["000000000632-0"]
    assert LlavaJsonDataset(json=str(tmp_path / "out" / "llava_instruct.json"),
                            image_folder=str(coco / "val2017")).shard_set().num_samples == len(records)


def test_bad_sources_and_flags_are_one_line_errors(coco: Path, prompts: Path, tmp_path: Path) -> None:
    captions = f"captions={coco / 'annotations' / 'captions_val2017.json'}"
    cases = {
        ("--source", "coco", "--source-option", "captions=nowhere.json"): "error: source.captions='nowhere.json': no such file",
        ("--source", "coco", "--source-option", captions, "--split", "val"): "error: --split: only the synthetic source",
        ("--source", "coco", "--source-option", captions, "--count", "9"): "error: --count=9: coco (captions_val2017.json) has 4 images",
        ("--source", "flickr"): "error: source='flickr': unknown source",
        ("--source", "jsonl", "--source-option", f"path={tmp_path}/none.jsonl"): "error: source.path=",
        ("--source", "coco", "--source-option", captions, "--prompts", str(tmp_path)): "error: --prompts",
    }
    for extra, message in cases.items():
        args = DATAGEN + ["--teacher", "openai", "--option", "model=m", "--option", "api_key_env=null",
                          "--out", str(tmp_path / "x"), *extra]
        result = run_cli(args, timeout=60)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1, (extra, result.stderr)
        assert errors[0].startswith(message), errors
        assert "Traceback" not in result.stderr
    synthetic = run_cli(DATAGEN + ["--teacher", "rules", "--out", str(tmp_path / "y")], timeout=60)
    assert synthetic.returncode == 2 and "error: --count: the synthetic source" in synthetic.stderr
