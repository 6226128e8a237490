"""ScienceQA: the published layout, LLaVA's prompt formats, both parse modes, and per-column scores."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image

from mmkit.core.errors import ConfigError, DataError
from mmkit.data.datasets.scienceqa import ScienceQADataset
from mmkit.data.scienceqa_layout import load_problems, parse_answer, prompt_text, target_text
from mmkit.evaluation.run import run_task
from mmkit.evaluation.scienceqa import ScienceQAEvaluator
from mmkit.synth.scienceqa_questions import write_scienceqa

# pid -> (subject, hint, has image, grade); answers are always option B (index 1) of three.
FIXTURE = {
    "1": ("natural science", "A hint.", True, "grade2"),    # NAT TXT IMG G1-6
    "2": ("natural science", "", True, "grade8"),           # NAT IMG G7-12
    "3": ("social science", "Some text.", False, "grade5"),  # SOC TXT G1-6
    "4": ("social science", "", False, "grade11"),          # SOC NO G7-12
    "5": ("language science", "", False, "grade1"),         # LAN NO G1-6
    "6": ("language science", "More text.", True, "grade12"),  # LAN TXT IMG G7-12
}
# pid -> the model's answer text, in every form a model emits.
ANSWERS = {
    "1": "The answer is B.",              # official: B (correct)
    "2": "B",                             # official: B (correct)
    "3": "(B)",                           # official: unparsed; lenient: B (correct)
    "4": "b. because it is",              # official: unparsed; lenient: B (correct)
    "5": "The answer is A. The answer is B.",  # two answers: unparsed in both
    "6": "C. The picture shows it.",      # official: C (wrong)
}


@pytest.fixture()
def scienceqa_dir(tmp_path: Path) -> Path:
    problems = {}
    for pid, (subject, hint, has_image, grade) in FIXTURE.items():
        problems[pid] = {
            "question": f"Question {pid}?", "choices": ["first", "second", "third"], "answer": 1, "hint": hint,
            "image": "image.png" if has_image else None, "subject": subject, "grade": grade, "split": "test",
            "lecture": "A lecture.", "solution": "A solution.",
        }
        if has_image:
            (tmp_path / "images" / "test" / pid).mkdir(parents=True)
            Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "images" / "test" / pid / "image.png")
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"train": [], "val": [], "test": list(FIXTURE)}))
    return tmp_path


def _answer_file(path: Path, answers: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"question_id": pid, "prompt": "?", "text": text}) + "\n" for pid, text in answers.items()))
    return path


def _expected(correct_pids: set[str], column_of) -> float:
    pids = [pid for pid in FIXTURE if column_of(pid)]
    return round(100 * sum(pid in correct_pids for pid in pids) / len(pids), 2)


def test_per_column_accuracies_match_an_independent_count(scienceqa_dir, tmp_path):
    result = run_task("scienceqa", ScienceQAEvaluator(str(scienceqa_dir)), tmp_path / "out",
                      predictions=_answer_file(tmp_path / "answers.jsonl", ANSWERS))
    columns = {
        "NAT": lambda p: FIXTURE[p][0] == "natural science", "SOC": lambda p: FIXTURE[p][0] == "social science",
        "LAN": lambda p: FIXTURE[p][0] == "language science", "TXT": lambda p: bool(FIXTURE[p][1]),
        "IMG": lambda p: FIXTURE[p][2], "NO": lambda p: not FIXTURE[p][1] and not FIXTURE[p][2],
        "G1_6": lambda p: int(FIXTURE[p][3][5:]) <= 6, "G7_12": lambda p: int(FIXTURE[p][3][5:]) >= 7,
    }
    for prefix, correct in (("acc", {"1", "2"}), ("lenient_acc", {"1", "2", "3", "4"})):
        assert result.metrics[prefix] == _expected(correct, lambda p: True)
        for column, member in columns.items():
            assert result.metrics[f"{prefix}_{column}"] == _expected(correct, member), (prefix, column)
    assert result.metrics["unparsed_official"] == 3 and result.metrics["unparsed_lenient"] == 1
    assert "| official |" in result.table and "| lenient |" in result.table
    by_pid = {p["question_id"]: p for p in result.predictions}
    assert by_pid["6"]["official_choice"] == "C" and not by_pid["6"]["official_correct"]


def test_missing_answers_count_as_wrong_never_as_guesses(scienceqa_dir, tmp_path):
    result = run_task("scienceqa", ScienceQAEvaluator(str(scienceqa_dir)), tmp_path / "out",
                      predictions=_answer_file(tmp_path / "answers.jsonl", {"1": "B"}))
    assert result.metrics["acc"] == round(100 / 6, 2) and result.metrics["missing"] == 5


@pytest.mark.parametrize("text, official, lenient", [
    ("B", 1, 1), ("B. second", 1, 1), ("The answer is B.", 1, 1), ("Because... The answer is C.", 2, 2),
    ("(B)", None, 1), ("b", None, 1), ("(b) since", None, 1), ("The answer is (B).", None, 1),
    ("the answer is b", None, 1), ("Answer: C", None, 2), ("B) second", None, 1),
    ("A or B", None, None), ("The answer is A. The answer is B.", None, None), ("", None, None),
    ("I am not sure.", None, None), ("D", None, None),  # D is not an option of three
])
def test_parse_modes_on_every_form(text, official, lenient):
    assert parse_answer(text, 3, "official") == official
    assert parse_answer(text, 3, "lenient") == lenient


def test_prompt_formats_follow_llava_and_answer_first_is_one_override(scienceqa_dir):
    problem = load_problems(scienceqa_dir, "test")[3]  # no hint, no image
    assert prompt_text(problem, "QCM") == "Question: Question 4?\nContext: N/A\nOptions: (A) first (B) second (C) third"
    assert prompt_text(problem, "CQM").startswith("Context: N/A\nQuestion:")
    assert target_text(problem, "LEA") == "A lecture. A solution. The answer is B."
    assert target_text(problem, "ALE") == "The answer is B. BECAUSE: A lecture. A solution."
    assert target_text(problem, "A") == "The answer is B."
    with pytest.raises(ConfigError, match="data.prompt_format='QCM-XYZ'"):
        ScienceQADataset(str(scienceqa_dir), prompt_format="QCM-XYZ")


def test_broken_layouts_are_named(tmp_path):
    with pytest.raises(DataError, match="no problems.json"):
        load_problems(tmp_path, "test")
    (tmp_path / "problems.json").write_text(json.dumps({"1": {"question": "?", "choices": ["a"], "answer": 3}}))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1"]}))
    with pytest.raises(DataError, match="problem 1 is malformed"):
        load_problems(tmp_path, "test")
    with pytest.raises(ConfigError, match="split='minitest'"):
        load_problems(tmp_path, "minitest")


def _targets(shards) -> list[str]:
    targets = []
    for url in shards.urls:
        with tarfile.open(url) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".json"):
                    targets.append(json.loads(archive.extractfile(member).read())["conversations"][-1]["value"])
    return targets


def test_training_shards_in_both_target_orders(scienceqa_dir, tmp_path):
    problems = json.loads((scienceqa_dir / "problems.json").read_text())
    for problem in problems.values():
        problem["split"] = "train"
    (scienceqa_dir / "problems.json").write_text(json.dumps(problems))
    (scienceqa_dir / "pid_splits.json").write_text(json.dumps({"train": list(FIXTURE)}))
    (scienceqa_dir / "images" / "test").rename(scienceqa_dir / "images" / "train")
    reasoning_first = ScienceQADataset(str(scienceqa_dir), prompt_format="QCM-LEA").shard_set()
    answer_first = ScienceQADataset(str(scienceqa_dir), prompt_format="QCM-ALE").shard_set()
    assert reasoning_first.num_samples == answer_first.num_samples == len(FIXTURE)
    assert all(t.endswith("The answer is B.") for t in _targets(reasoning_first))
    assert all(t.startswith("The answer is B. BECAUSE:") for t in _targets(answer_first))


def test_synthetic_set_has_the_published_layout_and_fills_every_column(tmp_path):
    write_scienceqa(tmp_path, {"train": 20, "test": 120}, seed=3)
    problems = load_problems(tmp_path, "test")
    assert len(problems) == 120
    columns = {column for problem in problems for column in problem.columns()}
    assert columns == {"NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1_6", "G7_12"}
    for problem in problems:
        if problem.image:
            assert (tmp_path / "images" / "test" / problem.pid / "image.png").is_file()
    # Scoring the correct letters through the evaluator gives 100 in every column.
    answers = _answer_file(tmp_path / "a.jsonl", {p.pid: f"The answer is {p.answer_letter}." for p in problems})
    result = run_task("scienceqa", ScienceQAEvaluator(str(tmp_path)), tmp_path / "out", predictions=answers)
    assert all(value == 100.0 for key, value in result.metrics.items() if key.startswith(("acc", "lenient_acc")))


@pytest.mark.slow
def test_cli_scores_an_answer_file_without_a_model(scienceqa_dir, tmp_path):
    answers = _answer_file(tmp_path / "answers.jsonl", ANSWERS)
    result = run_cli(["-m", "mmkit.evaluate", "task=scienceqa", f"predictions={answers}", f"data_dir={scienceqa_dir}",
                      f"out_dir={tmp_path / 'out'}"])
    assert result.returncode == 0, result.stderr
    assert "| official |" in result.stdout
    metrics = json.loads((tmp_path / "out" / "results.json").read_text())
    assert metrics["acc"] == round(100 * 2 / 6, 2)
    bad = run_cli(["-m", "mmkit.evaluate", "task=scienceqa", f"predictions={tmp_path / 'nope.jsonl'}",
                   f"data_dir={scienceqa_dir}", f"out_dir={tmp_path / 'out2'}"])
    assert bad.returncode == 2 and "nope.jsonl: no such file" in bad.stderr and "Traceback" not in bad.stderr
