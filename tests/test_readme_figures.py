"""The README's figures for the embedded default are the ones `experiments/default_run.py` measured.

Each test formats a README sentence from the result files (`experiments/default_run/results.json`
and the shipped `experiments/sample_answers_default/sample_answers.md`) and looks for it in the
README, so a re-measured figure that the README does not follow, or a README edit that the
results do not back, fails here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
RESULTS = json.loads((REPO / "experiments" / "default_run" / "results.json").read_text())
SAMPLE_ANSWERS = REPO / "experiments" / "sample_answers_default" / "sample_answers.md"

ROUND_HEADING = re.compile(r"^## (\w+), step (\d+)( \(end of stage\))?$")
ROUND_SCORE = re.compile(r"^Score on these (\d+) items: acc ([\d.]+)")


def readme_says(sentence: str) -> None:
    # The README wraps its lines: compare with every run of whitespace as one space.
    flat = " ".join(README.split())
    assert " ".join(sentence.split()) in flat, f"README.md should say: {sentence!r}"


def sample_answer_rounds() -> list[dict]:
    """Each round of the shipped sample answers: stage, step, end of stage or not, items right."""
    rounds, heading = [], None
    for line in SAMPLE_ANSWERS.read_text().splitlines():
        if match := ROUND_HEADING.match(line):
            heading = match
        elif (match := ROUND_SCORE.match(line)) and heading is not None:
            items = int(match.group(1))
            rounds.append({
                "stage": heading.group(1),
                "end_of_stage": heading.group(3) is not None,
                "items": items,
                "right": round(float(match.group(2)) * items / 100),
            })
            heading = None
    return rounds


def test_default_accuracy_is_the_measured_one() -> None:
    figures = RESULTS["warm"]["figures"]
    readme_says(f"about {figures['acc']:.0f}% overall against {figures['blind_acc']:.0f}% blind")
    readme_says(f"its {figures['acc']:.0f}% held-out accuracy")


def test_cold_and_warm_runs_reach_the_same_accuracy() -> None:
    # The warm run reuses what the cold one built; a difference would mean the cache changes results.
    assert RESULTS["cold"]["figures"] == RESULTS["warm"]["figures"]


def test_timings_are_the_measured_ones_and_say_the_machine() -> None:
    cold_min, warm_min = RESULTS["cold"]["wall_s"] / 60, RESULTS["warm"]["wall_s"] / 60
    readme_says(f"(~{cold_min:.0f} min cold, ~{warm_min:.0f} min warm)")
    readme_says(f"(~{RESULTS['suite']['wall_s'] / 60:.0f} min)")
    machine = RESULTS["machine"]
    readme_says(f"measured on {machine['cpus']} CPU cores ({machine['cpu_model']}), torch {machine['torch']}")
    loads = [load for step in ("cold", "warm", "suite") for load in (RESULTS[step]["load_before"][0], RESULTS[step]["load_after"][0])]
    readme_says(f"1-minute load average between {min(loads):.1f} and {max(loads):.1f}")
    readme_says("`experiments/default_run/results.json`")


def test_the_measured_suite_passed() -> None:
    counts = RESULTS["suite"]["figures"]["counts"]
    assert counts["passed"] > 0 and not counts.get("failed") and not counts.get("error") and not counts.get("errors")


def test_sample_answers_are_the_measured_ones() -> None:
    rounds = sample_answer_rounds()
    stage_ends = [entry for entry in rounds if entry["end_of_stage"]]
    assert [entry["stage"] for entry in stage_ends] == ["pretrain", "finetune"]
    items = stage_ends[0]["items"]
    readme_says(f"It has {stage_ends[0]['right']} of {items} right at the end of stage 1 "
                f"and {stage_ends[1]['right']} of {items} at the end.")
    stage2 = [entry["right"] for entry in rounds if entry["stage"] == "finetune"]
    readme_says(f"stage 2 swings between {min(stage2)} and {max(stage2)} of {items}")
    # The shipped file is the measured run's: its images are there, one per item.
    images = sorted(path.name for path in (SAMPLE_ANSWERS.parent / "sample_answers").iterdir())
    assert images == [f"{index}.png" for index in range(items)]


@pytest.mark.parametrize("step", ["scienceqa_untrained", "scienceqa_trained"])
def test_scienceqa_figures_are_the_measured_ones(step: str) -> None:
    figures = RESULTS[step]["figures"]
    readme_says(f"{figures['acc']:.1f}% ({figures['unparsed_official']} of {figures['problems']} answers unparsed)")


def test_scienceqa_chance_is_the_measured_one() -> None:
    readme_says(f"a uniform guess scores {RESULTS['scienceqa_chance_acc']:.1f}%")
