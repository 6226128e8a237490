"""The offline evaluation path: train the default model, then score it with python -m mmkit.evaluate."""
from __future__ import annotations

import json

import pytest
from conftest import run_cli

EVALUATE = ["-m", "mmkit.evaluate"]


@pytest.mark.slow
def test_synthetic_and_scienceqa_run_on_a_trained_model_and_resume(trained_run):
    synthetic = run_cli(EVALUATE + ["task=synthetic", f"model={trained_run}", "task.count=6"])
    assert synthetic.returncode == 0, synthetic.stderr[-3000:]
    assert "| overall |" in synthetic.stdout
    results = json.loads((trained_run / "eval" / "synthetic" / "results.json").read_text())
    assert 0 <= results["acc"] <= 100 and "blind_acc" in results

    # The offline ScienceQA path: mmkit's synthetic ScienceQA-format set, answered by the model.
    scienceqa = run_cli(EVALUATE + ["task=scienceqa", f"model={trained_run}", "task.limit=10", "max_new_tokens=16"])
    assert scienceqa.returncode == 0, scienceqa.stderr[-3000:]
    out = trained_run / "eval" / "scienceqa"
    answers = (out / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 10 and {"question_id", "prompt", "text"} <= set(json.loads(answers[0]))
    metrics = json.loads((out / "results.json").read_text())
    assert {"acc", "acc_NAT", "lenient_acc", "unparsed_official"} <= set(metrics)

    # Re-running the same command answers nothing again; a larger limit answers only the new items.
    again = run_cli(EVALUATE + ["task=scienceqa", f"model={trained_run}", "task.limit=12", "max_new_tokens=16"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "10 of 12 items answered already" in again.stdout
    assert len((out / "answers.jsonl").read_text().splitlines()) == 12


@pytest.mark.slow
def test_llava_bench_with_the_rules_judge_runs_on_a_trained_model(trained_run):
    result = run_cli(EVALUATE + ["task=llava_bench", f"model={trained_run}", "task.limit=6", "max_new_tokens=24"])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((trained_run / "eval" / "llava_bench" / "results.json").read_text())
    assert 0 < metrics["relative"] <= 100 and metrics["judge"].startswith("rules") and metrics["judge_failures"] == 0
    assert "| overall |" in result.stdout


@pytest.mark.slow
def test_bias_probes_with_and_without_images_run_on_a_trained_model(trained_run):
    result = run_cli(EVALUATE + ["task=bias", f"model={trained_run}", "max_new_tokens=12"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = trained_run / "eval" / "bias"
    metrics = json.loads((out / "results.json").read_text())
    assert 0 <= metrics["sas"] <= 100 and metrics["missing"] == 0 and (out / "plot.png").is_file()
    assert "| overall |" in result.stdout


@pytest.mark.slow
def test_bad_model_folder_is_one_line(tmp_path):
    result = run_cli(EVALUATE + ["task=synthetic", f"model={tmp_path}"])
    assert result.returncode == 2 and "not an mmkit run folder" in result.stderr and "Traceback" not in result.stderr
