"""python -m mmkit.chat: multi-turn, streamed, the image encoded once per conversation."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import CLI_CWD

from mmkit.inference.chat_session import ChatSession
from mmkit.inference.from_run import build_generator
from mmkit.inference.generation import Prompt, Sampling
from mmkit.synth.world import generate_scenes, render


def test_a_conversation_encodes_its_image_once_and_answers_as_the_generator_does(lively_model, monkeypatch):
    cfg, model = lively_model
    generator = build_generator(cfg, model, batch_size=1, max_new_tokens=12)
    session = ChatSession(generator, Sampling(12))
    image = render(generate_scenes("test", 1, seed=0)[0])
    calls = []
    original = model.encoder.forward
    monkeypatch.setattr(model.encoder, "forward", lambda pixels: calls.append(1) or original(pixels))
    session.set_image(image)
    first = "".join(session.reply("What colour is the circle?"))
    second = "".join(session.reply("And how many objects are there?"))
    assert len(calls) == 1
    conversation = [
        {"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": first},
        {"from": "human", "value": "And how many objects are there?"},
    ]
    assert first == generator.answer([Prompt(conversation[:1], image)], progress=False)[0]
    assert second == generator.answer([Prompt(conversation, image)], progress=False)[0]
    session.reset()
    assert "".join(session.reply("What colour is the circle?")) == first


def _chat(args: list[str], stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmkit.chat", *args], input=stdin, capture_output=True, text=True,
                          cwd=CLI_CWD[0], timeout=300)


@pytest.mark.slow
def test_the_chat_command_talks_turn_after_turn_and_takes_commands(trained_run, tmp_path):
    image = tmp_path / "scene.png"
    render(generate_scenes("test", 1, seed=0)[0]).save(image)
    result = _chat([f"model={trained_run}", f"image={image}", "max_new_tokens=8"],
                   "What colour is the circle?\nHow many objects?\n/reset\n/image nowhere.png\nWhere?\n/quit\nignored\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ASSISTANT:") == 3
    assert "(conversation cleared)" in result.stdout and "error: image=nowhere.png" in result.stdout

    missing = _chat([f"model={trained_run}", "image=nowhere.png"], "")
    assert missing.returncode == 2 and missing.stderr.startswith("error: image=nowhere.png")
    no_model = _chat([], "")
    assert no_model.returncode == 2 and "model=RUN_FOLDER is required" in no_model.stderr
