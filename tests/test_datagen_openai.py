"""The openai teacher over real HTTP (a chat server on 127.0.0.1), its prompts and parsers, and
``python -m mmkit.datagen`` as a user runs it: summaries, files, resume after kill -9."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from openai_server import FakeChatServer

from mmkit.core.errors import ConfigError, DataError
from mmkit.datagen.openai import OpenAITeacher
from mmkit.datagen.prompts import SYSTEM_PROMPTS, build_messages, format_context, parse_reply
from mmkit.datagen.rules import DETAILED_INSTRUCTIONS
from mmkit.datagen.teacher import IMAGE_PLACEHOLDER, Failed, UnusableOutput, Written
from mmkit.synth.llava_data import scene_rng, write_llava_dataset
from mmkit.synth.world import describe, generate_scenes, number_word, quadrant, reading_order, symbolic_view

KEY_ENV = "MMKIT_TEST_TEACHER_KEY"
DATAGEN = ["-m", "mmkit.datagen"]
SCENES = generate_scenes("val", 6, seed=3)


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, "secret")
    return "secret"


def make_teacher(server: FakeChatServer, cache: Path, **options) -> OpenAITeacher:
    settings = {"base_url": server.base_url, "model": "fake-gpt", "api_key_env": KEY_ENV, "cache_dir": cache,
                "backoff_s": 0.01, "max_retries": 3, "timeout_s": 10, "concurrency": 1}
    return OpenAITeacher(**{**settings, **options})


def views_and_rngs(scenes=SCENES):
    rngs = [scene_rng(0, scene) for scene in scenes]
    return [(symbolic_view(scene, rng), rng) for scene, rng in zip(scenes, rngs)]


def first_question(turns: list[dict]) -> str:
    return turns[0]["value"].replace(IMAGE_PLACEHOLDER, "").strip()


# ---------------------------------------------------------------------------------------------
# Prompts and parsing


def test_prompts_give_the_teacher_captions_and_boxes_only() -> None:
    view = symbolic_view(SCENES[0], random.Random(0))
    prompts = {t: build_messages(t, view) for t in SYSTEM_PROMPTS}
    assert set(prompts) == {"conversation", "detailed", "reasoning"}
    assert len({messages[0]["content"] for messages in prompts.values()}) == 3  # one system prompt per type
    for messages in prompts.values():
        roles = [m["role"] for m in messages]
        assert roles[0] == "system" and roles[-1] == "user"
        assert roles[1:-1] == ["user", "assistant"] * ((len(roles) - 2) // 2) and len(roles) >= 4  # few-shot pairs
        context = messages[-1]["content"]
        assert context == format_context(view)
        assert all(caption in context for caption in view["captions"])
        for annotation in view["objects"]:  # LLaVA's caps layout: "label: [x1, y1, x2, y2]" lines
            box = ", ".join(repr(c) for c in annotation["bbox"])
            assert f"\n{annotation['category']}: [{box}]" in context
        # The few-shot replies are in the format their own parser reads.
    for response_type, messages in prompts.items():
        for example_reply in (m["content"] for m in messages if m["role"] == "assistant"):
            assert parse_reply(response_type, example_reply)


def test_reply_parsing() -> None:
    text = (
        "Sure, here it is.\n**Question 1:** What colour is the circle?\n**Answer:** Red.\n\n"
        "Q: Any squares?\nA: No,\nnone at all."
    )
    assert parse_reply("conversation", text) == [
        ("What colour is the circle?", "Red."),
        ("Any squares?", "No,\nnone at all."),
    ]
    assert parse_reply("reasoning", "Question: Why?\nAnswer: Because.") == [("Why?", "Because.")]
    assert parse_reply("detailed", "Description: Two shapes.") == [("", "Two shapes.")]
    bad = {
        ("conversation", "I cannot help with that."): "no 'Question:'",
        ("conversation", "Question: What is it?\nQuestion: And this?\nAnswer: A circle."): "question 1 has no answer",
        ("conversation", "Question: What is it?\nAnswer: A circle.\nQuestion: Where?"): "question 2 has no answer",
        ("conversation", "Answer: A circle."): "answer 1 has no question",
        ("conversation", "Question: What is it?\nAnswer:"): "answer 1 is empty",
        ("reasoning", "Question: a?\nAnswer: b.\nQuestion: c?\nAnswer: d."): "expected one Question/Answer pair",
        ("detailed", "  \n"): "empty",
        ("detailed", "The circle's bounding box is at the top."): "bounding box",
        ("conversation", "Question: Where is it?\nAnswer: At [0.1, 0.2, 0.3, 0.4]."): "mentions the notes",
        ("detailed", "Question: x?\nAnswer: y."): "Question/Answer lines",
        ("detailed", "<image> A circle."): "image placeholder",
    }
    for (response_type, reply), reason in bad.items():
        with pytest.raises(UnusableOutput, match=reason.replace("[", r"\[")) as caught:
            parse_reply(response_type, reply)
        assert caught.value.response_type == response_type


# ---------------------------------------------------------------------------------------------
# The teacher over HTTP


def test_three_types_over_http_with_answers_true_of_the_scene(tmp_path: Path) -> None:
    views = views_and_rngs(SCENES[:3])
    with FakeChatServer(api_key="secret") as server:
        results = list(make_teacher(server, tmp_path).write_many(views))
    assert server.requests == 9 and server.authorizations == ["Bearer secret"] * 9
    placements = set()
    for scene, written in zip(SCENES, results):
        assert [w.type for w in written] == ["conversation", "detailed", "reasoning"]
        assert all(isinstance(w, Written) for w in written)
        chat, detailed, reasoning = (w.conversation for w in written)
        for turns in (chat, detailed, reasoning):
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].count(IMAGE_PLACEHOLDER) == 1
            assert not any(IMAGE_PLACEHOLDER in t["value"] for t in turns[1:])
            placements.add(turns[0]["value"].startswith(IMAGE_PLACEHOLDER))
        # Conversation: three parsed turns whose answers are the scene's facts.
        assert len(chat) == 6
        assert first_question(chat) == "How many objects are in the image?"
        assert chat[1]["value"] == f"{number_word(len(scene.objects)).capitalize()}."
        first = reading_order(scene.objects)[0]
        assert chat[2]["value"] == f"What is in the {quadrant(first.box)} of the image?"
        assert chat[3]["value"] == f"A {describe(first)}."
        # Detailed: our instruction, the teacher's description.
        assert first_question(detailed) in DETAILED_INSTRUCTIONS
        assert all(describe(o) in detailed[1]["value"] for o in scene.objects)
        # Reasoning: one question, answered with the facts.
        assert len(reasoning) == 2 and reasoning[1]["value"].endswith(
            f"So the answer is {number_word(sum(o.size == 'large' for o in scene.objects))}."
        )
    assert placements == {True, False}


@pytest.mark.parametrize("status", [429, 500, 503])
def test_retries_recover_from_rate_limits_and_server_errors(tmp_path: Path, status: int) -> None:
    view, rng = symbolic_view(SCENES[0], random.Random(0)), random.Random(1)
    with FakeChatServer(api_key="secret", fail_first=2, fail_status=status) as server:
        teacher = make_teacher(server, tmp_path, types=["detailed"])
        (written,) = teacher.write(view, rng)
    assert written.type == "detailed"
    assert server.requests == 3 and teacher.stats()["requests sent"] == 3


def test_retries_give_up_after_max_retries(tmp_path: Path) -> None:
    view = symbolic_view(SCENES[0], random.Random(0))
    with FakeChatServer(api_key="secret", fail_first=100, fail_status=500) as server:
        with pytest.raises(DataError, match=r"after 3 attempt\(s\); last: HTTP 500: try again \(3\)"):
            make_teacher(server, tmp_path, types="detailed", max_retries=2).write(view, random.Random(0))
    assert server.requests == 3


def test_connection_errors_are_retried(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:  # a port with nothing listening on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    teacher = OpenAITeacher(
        base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key_env=None, cache_dir=tmp_path, max_retries=2,
        backoff_s=0.01, types="detailed",
    )
    with pytest.raises(DataError, match=r"after 3 attempt\(s\); last: connection error"):
        teacher.write(symbolic_view(SCENES[0], random.Random(0)), random.Random(0))
    assert teacher.stats()["requests sent"] == 3


def test_a_400_fails_at_once_with_the_status_and_the_servers_message(tmp_path: Path) -> None:
    with FakeChatServer(api_key="secret", status=400, message="model 'fake-gpt' does not exist") as server:
        with pytest.raises(DataError, match=r"failed with HTTP 400: model 'fake-gpt' does not exist"):
            make_teacher(server, tmp_path).write(symbolic_view(SCENES[0], random.Random(0)), random.Random(0))
        assert server.requests == 1  # not retried
        with pytest.raises(DataError, match=r"HTTP 400: model 'fake-gpt' does not exist"):
            list(make_teacher(server, tmp_path, concurrency=3).write_many(views_and_rngs()))
        assert server.requests <= 1 + 3 * len(SCENES)  # each request at most once


def test_a_wrong_key_is_a_401_and_a_missing_key_a_config_error(tmp_path: Path, monkeypatch) -> None:
    with FakeChatServer(api_key="other") as server:
        with pytest.raises(DataError, match="HTTP 401: invalid API key"):
            make_teacher(server, tmp_path).write(symbolic_view(SCENES[0], random.Random(0)), random.Random(0))
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=f"teacher.api_key_env='{KEY_ENV}'.*not set"):
        OpenAITeacher(base_url="http://127.0.0.1:9/v1", model="m", api_key_env=KEY_ENV)
    # api_key_env=None: no Authorization header at all.
    with FakeChatServer(api_key=None) as server:
        make_teacher(server, tmp_path, api_key_env=None, types="detailed").write(
            symbolic_view(SCENES[0], random.Random(0)), random.Random(0)
        )
    assert server.authorizations == [None]


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="teacher.model"):
        OpenAITeacher(base_url="http://127.0.0.1:9/v1", api_key_env=None)
    with pytest.raises(ConfigError, match="teacher.base_url"):
        OpenAITeacher(base_url="127.0.0.1:9", model="m", api_key_env=None)
    with pytest.raises(ConfigError, match="teacher.types"):
        OpenAITeacher(base_url="http://h/v1", model="m", api_key_env=None, types="poetry")
    with pytest.raises(ConfigError, match="teacher.concurrency"):
        OpenAITeacher(base_url="http://h/v1", model="m", api_key_env=None, concurrency=0)


def test_the_cache_makes_a_second_run_send_no_requests(tmp_path: Path) -> None:
    with FakeChatServer(api_key="secret") as server:
        first = list(make_teacher(server, tmp_path / "cache").write_many(views_and_rngs()))
        assert server.requests == 3 * len(SCENES)
        again_teacher = make_teacher(server, tmp_path / "cache")
        again = list(again_teacher.write_many(views_and_rngs()))
        assert server.requests == 3 * len(SCENES)  # nothing new was sent
        assert again == first
        stats = again_teacher.stats()
        assert stats["requests sent"] == 0 and stats["replies from the cache"] == 3 * len(SCENES)
        # A different temperature is a different request.
        list(make_teacher(server, tmp_path / "cache", temperature=0.1, types="detailed").write_many(views_and_rngs()))
        assert server.requests == 4 * len(SCENES)
    cached = list((tmp_path / "cache").rglob("*.json"))
    assert len(cached) == 4 * len(SCENES) and not list((tmp_path / "cache").rglob("*.tmp"))


def test_concurrent_requests_give_the_sequential_results_in_order(tmp_path: Path) -> None:
    with FakeChatServer(api_key="secret", hold_until_in_flight=2) as server:
        parallel = list(make_teacher(server, tmp_path / "a", concurrency=6).write_many(views_and_rngs()))
        # The server held the first request until a second one arrived: only a concurrent client gets there.
        assert server.max_in_flight >= 2
    with FakeChatServer(api_key="secret") as server:
        sequential = list(make_teacher(server, tmp_path / "b", concurrency=1).write_many(views_and_rngs()))
        assert server.max_in_flight == 1
    assert parallel == sequential


def test_unusable_replies_are_asked_for_once_more_then_reported_per_type(tmp_path: Path) -> None:
    def garble(response_type, objects):
        return "I'd rather not." if response_type == "reasoning" else None

    view = symbolic_view(SCENES[0], random.Random(0))
    with FakeChatServer(api_key="secret", reply=garble) as server:
        teacher = make_teacher(server, tmp_path)
        (outcomes,) = list(teacher.write_many([(view, random.Random(0))]))
        assert [type(o) for o in outcomes] == [Written, Written, Failed]
        assert outcomes[2] == Failed("reasoning", "no 'Question:' / 'Answer:' lines in the reply (twice)")
        assert server.requests == 3 + 1  # the unusable reply was asked for again, once
        assert teacher.stats()["unusable replies asked again"] == 1 and teacher.stats()["made good by the second reply"] == 0
        with pytest.raises(UnusableOutput, match="reasoning: no 'Question:'"):
            teacher.write(view, random.Random(0))
    with FakeChatServer(api_key="secret", finish_reason="length") as server:
        teacher = make_teacher(server, tmp_path / "b", types="detailed")
        (outcomes,) = list(teacher.write_many([(view, random.Random(0))]))
        assert outcomes == [Failed("detailed", "the reply was cut off at max_tokens=1024 (twice)")]

    # A first reply that cannot be used and a second that can: the second is kept.
    replies = iter(["Sure! Let me think about it.", None])
    with FakeChatServer(api_key="secret", reply=lambda response_type, objects: next(replies)) as server:
        teacher = make_teacher(server, tmp_path / "c", types="reasoning")
        (outcomes,) = list(teacher.write_many([(view, random.Random(0))]))
        assert [type(o) for o in outcomes] == [Written] and server.requests == 2
        assert teacher.stats()["unusable replies asked again"] == 1 and teacher.stats()["made good by the second reply"] == 1


# ---------------------------------------------------------------------------------------------
# python -m mmkit.datagen


def summary_counts(stdout: str) -> dict[str, int]:
    """``{type: count}`` from the summary's indented ``  <type>  <count>`` lines."""
    rows = (line.split() for line in stdout.splitlines() if line.startswith("  "))
    return {row[0]: int(row[1]) for row in rows if len(row) == 2 and row[1].isdigit()}


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_cli_rules_teacher_writes_json_shards_and_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = DATAGEN + ["--teacher", "rules", "--split", "val", "--count", "10", "--seed", "4", "--resolution", "48",
                      "--out", str(out), "--samples-per-shard", "8"]
    result = run_cli(args, timeout=120)
    assert result.returncode == 0, result.stderr
    assert summary_counts(result.stdout) == {"conversation": 10, "detailed": 10, "reasoning": 10, "total": 30}
    assert "failed: 0" in result.stdout and "10 written now, 0 from an earlier run" in result.stdout
    assert "scenes" in result.stderr  # the progress bar
    # The JSON is exactly what write_llava_dataset writes for the same arguments.
    expected = write_llava_dataset(tmp_path / "ref", "val", 10, seed=4, teacher="rules", resolution=48, progress=False)
    assert (out / "val.json").read_bytes() == expected.read_bytes()
    records = json.loads((out / "val.json").read_text())
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] == 30 and [s["samples"] for s in manifest["shards"]] == [8, 8, 8, 6]
    assert all((out / "shards" / s["file"]).is_file() for s in manifest["shards"])
    assert len(list((out / "images").glob("*.png"))) == 10 and len({r["id"] for r in records}) == 30
    lines = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [line["type"] for line in lines[:3]] == ["conversation", "detailed", "reasoning"]

    # Run again: nothing left to write. A different seed in the same folder is refused.
    again = run_cli(args + ["--no-shards"], timeout=120)
    assert again.returncode == 0 and "0 written now, 10 from an earlier run" in again.stdout
    assert (out / "val.json").read_bytes() == expected.read_bytes()
    other = run_cli([*args[:-4], "--out", str(out), "--seed", "5", "--no-shards"], timeout=120)
    assert other.returncode == 2 and len(error_lines(other)) == 1
    assert "seed: 4 there, 5 now" in error_lines(other)[0] and "Traceback" not in other.stderr
    option = run_cli(args + ["--no-shards", "--option", "turns=2"], timeout=120)
    assert option.returncode == 2 and "option turns: 3 there, 2 now" in error_lines(option)[0]
    # A larger count extends the folder; the result is the larger run's.
    more = run_cli([*args[:-4], "--out", str(out), "--count", "12", "--no-shards"], timeout=120)
    assert more.returncode == 0 and "2 written now, 10 from an earlier run" in more.stdout
    expected = write_llava_dataset(tmp_path / "ref12", "val", 12, seed=4, teacher="rules", resolution=48, progress=False)
    assert (out / "val.json").read_bytes() == expected.read_bytes()


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    cases = {
        ("--teacher", "gpt5"): "error: teacher='gpt5': unknown teacher",
        ("--teacher", "rules", "--option", "turn=2"): "error: teacher: 'rules' takes no option(s) turn",
        ("--teacher", "rules", "--option", "turns"): "error: --option 'turns': expected KEY=VALUE",
        ("--teacher", "rules", "--split", "dev"): "error: split='dev'",
        ("--teacher", "openai", "--option", "model=m", "--option", "api_key_env=MMKIT_UNSET_KEY"): (
            "error: teacher.api_key_env='MMKIT_UNSET_KEY'"
        ),
    }
    for extra, message in cases.items():
        result = run_cli(DATAGEN + ["--count", "2", "--out", str(tmp_path / "x"), *extra], timeout=60)
        assert result.returncode == 2, (extra, result.stderr)
        assert len(error_lines(result)) == 1 and error_lines(result)[0].startswith(message), result.stderr
        assert "Traceback" not in result.stderr
    missing = run_cli(DATAGEN + ["--teacher", "rules"], timeout=60)
    assert missing.returncode == 2 and error_lines(missing)[0].startswith("error: the following arguments are required")


def test_cli_resumes_after_kill_9_without_duplicates_or_losses(tmp_path: Path) -> None:
    count = 1500
    common = ["--teacher", "rules", "--split", "train", "--count", str(count), "--seed", "2", "--resolution", "24",
              "--no-shards", "--no-progress"]
    out = tmp_path / "killed"
    records = out / "records.jsonl"
    process = subprocess.Popen(
        [sys.executable, *DATAGEN, *common, "--out", str(out)], cwd=REPO, env=os.environ.copy(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if records.is_file() and records.stat().st_size > 0 and records.read_bytes().count(b"\n") >= 150:
                break
            time.sleep(0.005)
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "train.json").exists()
    saved = records.read_bytes()
    assert 150 <= saved.count(b"\n") < 3 * count
    # Make the tail as bad as a kill can: half a line, after a scene cut short.
    lines = saved.splitlines(keepends=True)
    records.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])

    resumed = run_cli(DATAGEN + common + ["--out", str(out)], timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    done_before = int(resumed.stdout.split(" written now, ")[1].split()[0])
    assert 0 < done_before < count
    assert summary_counts(resumed.stdout)["total"] == 3 * count

    fresh = run_cli(DATAGEN + common + ["--out", str(tmp_path / "fresh")], timeout=120)
    assert fresh.returncode == 0, fresh.stderr
    assert (out / "train.json").read_bytes() == (tmp_path / "fresh" / "train.json").read_bytes()
    ids = [json.loads(line)["id"] for line in records.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 3 * count
    assert sorted(ids) == sorted(f"train-{i:06d}-{k}" for i in range(count) for k in range(3))
    for name in ("train-000000.png", f"train-{count - 1:06d}.png"):
        assert (out / "images" / name).read_bytes() == (tmp_path / "fresh" / "images" / name).read_bytes()
    assert not list((out / "images").glob("*.tmp"))


def test_cli_openai_teacher_against_the_test_server(tmp_path: Path) -> None:
    def garble_reasoning_of_small_scenes(response_type, objects):
        return "No idea." if response_type == "reasoning" and len(objects) == 1 else None

    scenes = generate_scenes("train", 8, seed=0)
    single = sum(len(s.objects) == 1 for s in scenes)
    out = tmp_path / "gpt"
    server = FakeChatServer(api_key="secret", reply=garble_reasoning_of_small_scenes, fail_first=2, fail_status=429)
    with server:
        args = DATAGEN + [
            "--teacher", "openai", "--count", "8", "--seed", "0", "--out", str(out), "--samples-per-shard", "100",
            "--option", f"base_url={server.base_url}", "--option", "model=fake-gpt",
            "--option", f"api_key_env={KEY_ENV}", "--option", f"cache_dir={tmp_path / 'cache'}",
            "--option", "concurrency=4", "--option", "backoff_s=0.01",
        ]
        result = run_cli(args, timeout=120)
        assert result.returncode == 0, result.stderr
        counts = summary_counts(result.stdout)
        assert counts == {"conversation": 8, "detailed": 8, "reasoning": 8 - single, "total": 24 - single}
        if single:
            assert f"failed: {single} (reasoning {single})" in result.stdout
            assert "No idea" not in (out / "train.json").read_text()
        # 24 first replies, 2 refused with 429 and sent again, and a second sample of each unusable reply.
        assert f"requests sent {24 + 2 + single}, replies from the cache 0" in result.stdout
        assert server.requests == 24 + 2 + single and set(server.authorizations) == {"Bearer secret"}
        manifest = json.loads((out / "shards" / "manifest.json").read_text())
        assert manifest["num_samples"] == 24 - single

        # Started over in a new folder with the same cache: every reply comes from the cache.
        where = args.index("--out") + 1
        again = run_cli(args[:where] + [str(tmp_path / "gpt2")] + args[where + 1:], timeout=120)
        assert again.returncode == 0, again.stderr
        assert f"requests sent 0, replies from the cache {24 + single}" in again.stdout
        assert server.requests == 26 + single
        assert (tmp_path / "gpt2" / "train.json").read_bytes() == (out / "train.json").read_bytes()

    # A server that refuses the request: one error line, exit 2, nothing written for the scene.
    with FakeChatServer(api_key="secret", status=400, message="unknown model") as server:
        bad = run_cli(DATAGEN + [
            "--teacher", "openai", "--count", "2", "--out", str(tmp_path / "bad"),
            "--option", f"base_url={server.base_url}", "--option", "model=nope",
            "--option", f"api_key_env={KEY_ENV}", "--option", f"cache_dir={tmp_path / 'c2'}",
        ], timeout=60)
    assert bad.returncode == 2 and len(error_lines(bad)) == 1, bad.stderr
    assert "HTTP 400: unknown model" in error_lines(bad)[0] and "0 of 2 scenes are saved" in error_lines(bad)[0]
