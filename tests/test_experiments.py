"""The experiment scripts' own claims: the oracle tower reads every scene exactly."""
import importlib.util
from pathlib import Path

import pytest
import torch

from mmkit.core.errors import ConfigError
from mmkit.data.images import ImageProcessor
from mmkit.datagen.rules import QUESTION_KINDS
from mmkit.synth.world import COLOURS, QUADRANTS, SHAPES, SIZES, generate_scenes, quadrant, render

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_oracle_tower_reads_every_object_and_empty_quadrant_exactly():
    oracle = _load("oracle_tower")
    encoder = oracle.ENCODERS.get("oracle", key="encoder.name")()
    processor = ImageProcessor(encoder.image_stats, "pad")
    scenes = generate_scenes("val", 150, seed=4)
    features = encoder(torch.stack([processor(render(scene)) for scene in scenes]))
    for scene, tokens in zip(scenes, features):
        occupied = {QUADRANTS.index(quadrant(o.box)): o for o in scene.objects}
        for index, token in enumerate(tokens):
            assert token[oracle.QUADRANT + index] == 1
            obj = occupied.get(index)
            if obj is None:
                assert token[oracle.EMPTY] == 1 and token[: oracle.EMPTY].sum() == 0
                continue
            expected = [list(COLOURS).index(obj.colour), len(COLOURS) + SHAPES.index(obj.shape),
                        len(COLOURS) + len(SHAPES) + SIZES.index(obj.size)]
            assert token[: oracle.EMPTY].nonzero().flatten().tolist() == expected


def test_lookup_questions_are_answerable_from_their_caption_and_train_on_replies_or_every_token():
    from transformers import AutoTokenizer

    from mmkit.zoo import ensure_model
    from mmkit.zoo.llama import LlamaRecipe, training_pools
    from mmkit.zoo.text import caption_questions

    sized = caption_questions("val", 30, seed=5, per_caption=3)
    assert len(sized) >= 30 * 4 // 3
    for objects, conversation in sized:
        caption = conversation[0]["value"].split("\n")[0]
        places = caption.lower().count("the top ") + caption.lower().count("the bottom ")
        assert " in the " in caption.lower() and 1 <= objects <= 4 and places == objects
        for human, reply in zip(conversation[::2], conversation[1::2]):
            question = human["value"].split("\n")[-1]
            assert question.endswith("?")
            if question.startswith(("What colour", "What is the colour")):
                assert reply["value"].rstrip(".").lower() in caption

    tokenizer = AutoTokenizer.from_pretrained(ensure_model("tiny-tokenizer"))
    pools = training_pools(LlamaRecipe(data="qa", scenes=400, per_caption=3, curriculum=100), tokenizer, split="val")
    assert len(pools) == 4 and len(pools[0]) < len(pools[1]) < len(pools[2]) < len(pools[3])
    ids, labels = pools[0][0]
    trained = tokenizer.decode(labels[labels != -100])
    assert len(trained) < len(tokenizer.decode(ids)) / 4 and trained.count("</s>") == 3  # three replies, each ended
    every_token = training_pools(LlamaRecipe(data="qa", scenes=400, per_caption=3, curriculum=100, loss="all"),
                                 tokenizer, split="val")[0][0]
    assert torch.equal(every_token[0], ids) and torch.equal(every_token[1], ids)
    with pytest.raises(ConfigError, match="LlamaRecipe.loss='answers': choose replies or all"):
        training_pools(LlamaRecipe(data="qa", scenes=400, loss="answers"), tokenizer, split="val")


def test_lm_lookup_records_each_evaluation_by_type_and_by_objects(tmp_path):
    import json
    import subprocess
    import sys

    curve = tmp_path / "curve.jsonl"
    subprocess.run([sys.executable, str(EXPERIMENTS / "lm_lookup.py"), "--width", "32", "--layers", "1", "--heads", "2",
                    "--steps", "100", "--data", "qa", "--scenes", "200", "--eval-every", "1", "--eval-scenes", "8",
                    "--threads", "1", "--out", str(curve), "--save", str(tmp_path / "lm")], check=True, capture_output=True)
    records = [json.loads(line) for line in curve.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # 100 steps at the test session's zoo scale
    assert set(records[-1]["caption_qa"]) == set(QUESTION_KINDS)
    assert set(records[-1]["by_objects"]) <= {"1", "2", "3", "4"} and len(records[-1]["by_objects"]) >= 2
    assert (tmp_path / "lm" / "model.safetensors").is_file() and (tmp_path / "lm" / "tokenizer.json").is_file()


def test_the_lookup_toy_records_the_world_and_the_recall_accuracy(tmp_path):
    import json
    import subprocess
    import sys

    curve = tmp_path / "toy.jsonl"
    for task in (["--format", "placed"], ["--format", "keyfirst", "--direct", "--recall", "1"]):
        subprocess.run([sys.executable, str(EXPERIMENTS / "lookup_toy.py"), "--width", "32", "--layers", "1", "--heads", "2",
                        "--batch", "4", "--steps", "2", "--every", "1", "--out", str(curve), *task], check=True, capture_output=True)
    records = [json.loads(line) for line in curve.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 1, 2]
    assert all(set(r["world"]) == {"colour", "position", "size"} and 0 <= r["recall"] <= 100 for r in records)
    assert records[2]["options"]["recall"] == 1 and records[0]["options"]["format"] == "placed"
