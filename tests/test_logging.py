"""Watching a run: the logger group (csv, tensorboard, wandb) and the sample answers written
during training (Markdown in the run folder, a table in the logger)."""
from __future__ import annotations

import json
import re

import pytest
from conftest import TINY_RUN, compose, run_cli

from mmkit.models.build import build_model
from mmkit.training.recipe import run_stage


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tensorboard_run")
    result = run_cli(["-m", "mmkit.train", *TINY_RUN, "logger=tensorboard", "sample_answers.every_n_steps=3",
                      "sample_answers.count=4", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _rounds(run_dir, stage: str) -> list[int]:
    """The steps of the sample-answer rounds: every 3rd step, and the last one when it is not one."""
    last = json.loads((run_dir / "summary.json").read_text())["stages"][stage]["steps"]
    return list(range(3, last + 1, 3)) + ([last] if last % 3 else [])


@pytest.mark.slow
def test_a_tensorboard_run_writes_events_tensorboard_reads(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for stage in ("pretrain", "finetune"):
        events = EventAccumulator(str(tensorboard_run / stage), size_guidance={"tensors": 0, "images": 0, "scalars": 0})
        events.Reload()
        tags = events.Tags()
        assert {"train/loss", "throughput/real_tokens_per_s", "throughput/tokens_per_s"} <= set(tags["scalars"])
        assert len(events.Scalars("train/loss")) >= 1
        # The sample answers: a Markdown table in the Text tab each round, the images once.
        assert f"sample_answers/{stage}/text_summary" in tags["tensors"]
        rounds = events.Tensors(f"sample_answers/{stage}/text_summary")
        table = rounds[-1].tensor_proto.string_val[0].decode()
        assert table.startswith("| # | question | answer | reference |") and table.count("\n") == 2 + 3
        assert [event.step for event in rounds] == _rounds(tensorboard_run, stage)
        assert sum(tag.startswith(f"sample_answers/{stage}/") for tag in tags["images"]) == 4
        assert (tensorboard_run / stage / "metrics.csv").is_file()  # csv is always written


@pytest.mark.slow
def test_sample_answers_are_written_round_by_round_with_images_and_references(tensorboard_run):
    markdown = (tensorboard_run / "sample_answers.md").read_text()
    titles = re.findall(r"^## (.+)$", markdown, flags=re.M)
    expected = []
    for stage in ("pretrain", "finetune"):
        steps = _rounds(tensorboard_run, stage)
        last = json.loads((tensorboard_run / "summary.json").read_text())["stages"][stage]["steps"]
        expected += [f"{stage}, step {step}" + (" (end of stage)" if step == last and last % 3 else "") for step in steps]
    assert titles == expected and len(titles) >= 3
    rows = [line for line in markdown.splitlines() if line.startswith("| ![](sample_answers/")]
    assert len(rows) == 4 * len(titles)
    assert all((tensorboard_run / "sample_answers" / f"{index}.png").is_file() for index in range(4))
    assert markdown.count("Score on these 4 items: acc") == len(titles)


def test_a_wandb_run_is_written_offline_with_the_sample_answers_table(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose(TINY_RUN + ["logger=wandb", "recipe.stages.finetune.max_steps=2", "sample_answers.count=2"])
    summary, _ = run_stage(cfg, "finetune", build_model(cfg), tmp_path, previous=None)
    assert summary["steps"] == 2
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(offline.glob("run-*.wandb"))
    assert list((offline / "files" / "media" / "table").rglob("*.table.json"))


def test_an_unknown_logger_is_refused_in_one_line():
    result = run_cli(["-m", "mmkit.train", "logger=mlflow"], timeout=120)
    assert result.returncode == 2
    assert "logger=mlflow: no such logger config; available: csv, tensorboard, wandb" in result.stderr
