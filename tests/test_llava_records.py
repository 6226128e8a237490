"""LLaVA's released data as LLaVA's docs lay it out, read through the data configs, and the
per-record policies that follow LLaVA's training: a sample over ``data.max_length`` is truncated
(``data.too_long``), a conversation opening with a gpt turn loses that turn (``data.leading_gpt_turn``).

The fixture folders hold the files of LLaVA's docs/Data.md under the names and in the folders of
LLaVA's scripts (scripts/finetune.sh, scripts/v1_5/{pretrain,finetune}.sh) and README, with
records shaped as the released ones: a few records, tiny real images."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from conftest import compose
from PIL import Image

from mmkit.core.errors import ConfigError
from mmkit.core.interfaces import IMAGE_TOKEN
from mmkit.core.registry import TEMPLATES, load_components
from mmkit.data.images import ImageProcessor
from mmkit.data.samples import EncodedSample, SampleEncoder, SkippedSample
from mmkit.data.templates.llava_tokenization import IGNORE_INDEX
from mmkit.training.recipe import _stage_data

load_components()

QUESTION = {"from": "human", "value": "<image>\nWhat is in the picture?"}
ANSWER = {"from": "gpt", "value": "A red circle and a blue square on a grey background."}


def caption(image: str, record_id: str, text: str) -> dict:
    """A stage-1 record: an instruction with the image, answered by the image's caption."""
    return {"id": record_id, "image": image, "conversations": [
        {"from": "human", "value": "Provide a brief description of the given image.\n<image>"},
        {"from": "gpt", "value": text}]}


def conversation(image: str, record_id: str) -> dict:
    return {"id": record_id, "image": image, "conversations": [
        QUESTION, ANSWER, {"from": "human", "value": "Which one is larger?"}, {"from": "gpt", "value": "The square."}]}


# LLaVA-1.5 (README "Visual Instruction Tuning", scripts/v1_5): LLAVA_DATA is ./playground/data.
LLAVA_V1_5 = {
    "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json": [
        caption("00453/004539375.jpg", "004539375", "select luxury furniture 3 - inch gel memory foam mattress topper"),
        caption("00223/002239345.jpg", "002239345", "a grey watercolor painting of a house"),
    ],
    "llava_v1_5_mix665k.json": [
        conversation("coco/train2017/000000033471.jpg", "000000033471"),
        conversation("gqa/images/2354786.jpg", "2354786"),
        conversation("ocr_vqa/images/140031996.jpg", "140031996"),
        conversation("textvqa/train_images/011e7e629fb9ae7b.jpg", "011e7e629fb9ae7b"),
        conversation("vg/VG_100K/2356347.jpg", "2356347"),
        conversation("vg/VG_100K_2/2405765.jpg", "2405765"),
        # ShareGPT's text-only conversations: no image, and one that opens with the assistant.
        {"id": "i6IyJda_0", "model": "", "conversations": [
            {"from": "human", "value": "How do I read a JSON file in Python?"},
            {"from": "gpt", "value": "Open it and call json.load on the file object."}]},
        {"id": "QWJhYvA_0", "model": "", "conversations": [
            {"from": "gpt", "value": "Hello! How can I help you today?"},
            {"from": "human", "value": "Name a prime number."}, {"from": "gpt", "value": "Seven."}]},
        # Longer than data.max_length: trained on its first max_length tokens.
        {"id": "long_sharegpt_0", "model": "", "conversations": [
            {"from": "human", "value": "Explain this program line by line."},
            {"from": "gpt", "value": "The first line imports the module. " * 100}]},
    ],
}
# Where each file's images are, relative to LLAVA_DATA: its config's image_folder.
IMAGE_FOLDERS = {
    "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json": "LLaVA-Pretrain/images",
    "llava_v1_5_mix665k.json": ".",
    "LLaVA-CC3M-Pretrain-595K/chat.json": "LLaVA-CC3M-Pretrain-595K/images",
    "llava_instruct_150k.json": "coco/train2017",
}
# LLaVA v1 (docs/Data.md, scripts/finetune.sh): CC-595K's chat.json and images.zip, the instruct
# file's images in COCO train2017, named by their file name alone.
LLAVA_V1 = {
    "LLaVA-CC3M-Pretrain-595K/chat.json": [
        caption("GCC_train_002582585.jpg", "GCC_train_002582585", "olive oil is a healthy ingredient used liberally ."),
        caption("GCC_train_001163426.jpg", "GCC_train_001163426", "a city street at night"),
    ],
    "llava_instruct_150k.json": [
        conversation("000000033471.jpg", "000000033471"),
        conversation("000000052846.jpg", "000000052846"),
    ],
}


def write_layout(root: Path, files: dict[str, list[dict]]) -> dict[str, tuple[int, int, int]]:
    """The JSON files and an image for every record at its path; returns each record id's colour."""
    colours: dict[str, tuple[int, int, int]] = {}
    for name, records in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(records))
        for record in records:
            if "image" not in record:
                continue
            colour = (len(colours) * 30 % 256, 200 - len(colours) * 20, 90)
            path = root / IMAGE_FOLDERS[name] / record["image"]
            path.parent.mkdir(parents=True, exist_ok=True)
            # OCR-VQA's files are all named .jpg (LLaVA's README), whatever format they came in.
            Image.new("RGB", (24, 24), colour).save(path, format="PNG" if "ocr_vqa" in record["image"] else "JPEG")
            colours[record["id"]] = colour
    return colours


@pytest.mark.parametrize("data,files", [("llava_v1_5", LLAVA_V1_5), ("llava_v1", LLAVA_V1)])
def test_each_stage_reads_every_record_with_its_image(tmp_path, monkeypatch, tiny_model, data, files):
    colours = write_layout(tmp_path, files)
    monkeypatch.setenv("LLAVA_DATA", str(tmp_path))
    for name, records in zip(("pretrain", "finetune"), files.values()):
        # The whole file in one batch: one pass over its shards (a megabatch of one batch for group).
        cfg = compose([f"data={data}", "data.num_workers=0", "data.group_batches=1",
                       f"recipe.stages.{name}.micro_batch_size={len(records)}"])
        datamodule = _stage_data(cfg, cfg.recipe.stages[name], f"recipe.stages.{name}", tiny_model)
        datamodule.setup()
        [batch] = list(datamodule.train_dataloader())
        assert batch["skipped"] == [] and sorted(batch["keys"]) == sorted(r["id"] for r in records), batch["skipped"]
        with_images = [key for key in batch["keys"] if key in colours]
        assert batch["num_images"] == len(with_images) == sum("image" in r for r in records)
        for key, pixels in zip(with_images, batch["pixel_values"]):  # the images follow the keys' order
            mean = pixels.float().mean(dim=(1, 2))
            assert torch.allclose(mean, torch.tensor(colours[key], dtype=torch.float), atol=6), (key, mean)
        if "long_sharegpt_0" in batch["keys"]:
            row = batch["keys"].index("long_sharegpt_0")
            assert batch["attention_mask"][row].sum() == cfg.data.max_length


@pytest.fixture(scope="module")
def vicuna(tiny_model):
    """An encoder factory: the LLaVA-1.5 template, the tiny model's tokenizer and image tokens."""
    def build(max_length: int = 2048, **policies) -> SampleEncoder:
        return SampleEncoder(TEMPLATES.get("vicuna_v1")(), tiny_model.tokenizer,
                             ImageProcessor(tiny_model.encoder.image_stats), tiny_model.num_image_tokens, max_length,
                             **policies)
    return build


def sample(turns: list[dict], image: bool = True) -> dict:
    stored = {"__key__": "k", "json": json.dumps({"id": "k", "conversations": turns}).encode()}
    if image:
        stored["png"] = _png()
    return stored


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (10, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


LONG = [QUESTION, {"from": "gpt", "value": "It is a long answer about the shapes. " * 40}]


def test_a_too_long_sample_is_truncated_ids_and_labels_alike(vicuna):
    whole = vicuna()(sample(LONG))
    assert isinstance(whole, EncodedSample) and whole.truncated_from is None
    cut = vicuna(max_length=len(whole.input_ids) // 2)(sample(LONG))
    assert isinstance(cut, EncodedSample), cut
    assert cut.truncated_from == len(whole.input_ids)
    assert len(cut.input_ids) == len(cut.labels) == len(whole.input_ids) // 2
    assert torch.equal(cut.input_ids, whole.input_ids[: len(cut.input_ids)])
    assert torch.equal(cut.labels, whole.labels[: len(cut.labels)])
    assert (cut.labels != IGNORE_INDEX).any() and cut.pixel_values is not None


def test_a_too_long_sample_is_skipped_when_the_config_says_so(vicuna):
    length = len(vicuna()(sample(LONG)).input_ids)
    skipped = vicuna(max_length=length - 1, too_long="skip")(sample(LONG))
    assert isinstance(skipped, SkippedSample)
    assert skipped.reason == f"{length} tokens exceed data.max_length={length - 1} (data.too_long=skip)"


def test_truncation_never_cuts_an_image(vicuna, tiny_model):
    """A cut inside the image's tokens, or before them, would leave the image without its positions."""
    late_image = [{"from": "human", "value": "Look closely at this. " * 10 + IMAGE_TOKEN}, ANSWER]
    whole = vicuna()(sample(late_image))
    image_at = whole.input_ids.tolist().index(tiny_model.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    for max_length in (image_at + 1, image_at - 1):  # inside the image's tokens; before all of them
        skipped = vicuna(max_length=max_length)(sample(late_image))
        assert isinstance(skipped, SkippedSample), max_length
        assert skipped.reason == (f"{len(whole.input_ids)} tokens exceed data.max_length={max_length}, and cutting "
                                  f"there would cut the image's {tiny_model.num_image_tokens} tokens")
    assert isinstance(vicuna(max_length=len(whole.input_ids) - 1)(sample(late_image)), EncodedSample)


def test_a_truncated_sample_with_no_reply_left_is_skipped(vicuna):
    long_question = [{"from": "human", "value": "<image>\n" + "Tell me about the shapes. " * 30}, ANSWER]
    whole = vicuna()(sample(long_question))
    first_trained = next(i for i, label in enumerate(whole.labels.tolist()) if label != IGNORE_INDEX)
    skipped = vicuna(max_length=first_trained)(sample(long_question))
    assert isinstance(skipped, SkippedSample) and skipped.reason == "no assistant tokens to train on"
    kept = vicuna(max_length=first_trained + 1)(sample(long_question))
    assert isinstance(kept, EncodedSample) and (kept.labels != IGNORE_INDEX).sum() == 1


GPT_FIRST = [{"from": "gpt", "value": "Hello! How can I help you today?"}, QUESTION, ANSWER]


def test_a_leading_gpt_turn_is_dropped(vicuna):
    dropped = vicuna()(sample(GPT_FIRST))
    without = vicuna()(sample(GPT_FIRST[1:]))
    assert isinstance(dropped, EncodedSample), dropped
    assert torch.equal(dropped.input_ids, without.input_ids) and torch.equal(dropped.labels, without.labels)


def test_a_leading_gpt_turn_is_skipped_when_the_config_says_so(vicuna):
    skipped = vicuna(leading_gpt_turn="skip")(sample(GPT_FIRST))
    assert isinstance(skipped, SkippedSample)
    assert skipped.reason == "the conversation starts with a 'gpt' turn (data.leading_gpt_turn=skip)"


def test_only_one_leading_turn_is_dropped(vicuna):
    """As in LLaVA: after the dropped turn the conversation must alternate from the human."""
    skipped = vicuna()(sample([GPT_FIRST[0], *GPT_FIRST]))
    assert isinstance(skipped, SkippedSample) and "alternate" in skipped.reason


@pytest.mark.parametrize("data", ["synthetic", "scienceqa", "llava_v1", "llava_v1_5"])
def test_every_data_config_follows_llava_by_default_and_training_takes_its_choice(tiny_model, data):
    cfg = compose([f"data={data}"])
    assert (cfg.data.too_long, cfg.data.leading_gpt_turn) == ("truncate", "drop")
    cfg = compose([f"data={data}", "data.too_long=skip", "data.leading_gpt_turn=skip"])
    encoder = _stage_data(cfg, cfg.recipe.stages.finetune, "recipe.stages.finetune", tiny_model).sample_encoder
    assert (encoder.too_long, encoder.leading_gpt_turn) == ("skip", "skip")


@pytest.mark.parametrize("option,value", [("too_long", "cut"), ("leading_gpt_turn", "keep")])
def test_an_unknown_policy_fails_naming_its_key(vicuna, option, value):
    with pytest.raises(ConfigError, match=rf"^data\.{option}='{value}': choose one of "):
        vicuna(**{option: value})
