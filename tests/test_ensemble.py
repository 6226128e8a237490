"""Ensembles of two answer files (complement, judge), scored by the same evaluator."""
from __future__ import annotations

import json

import pytest
from conftest import run_cli
from openai_server import FakeChatServer
from test_scienceqa import scienceqa_dir  # noqa: F401  (fixture: six problems, answer B)

from mmkit.core.errors import ConfigError
from mmkit.evaluation.ensemble import combine, parse_choice
from mmkit.evaluation.scienceqa import ScienceQAEvaluator

# A: right on 1-2, unparsable on 3-4, wrong on 5-6. B: right on 3 and 5, wrong on 4 and 6.
FIRST = {"1": "The answer is B.", "2": "B", "3": "I am not sure", "4": "", "5": "The answer is A.", "6": "C"}
SECOND = {"1": "B", "2": "B", "3": "The answer is B.", "4": "The answer is C.", "5": "B", "6": "A"}


def test_complement_takes_b_only_where_a_has_no_valid_answer(scienceqa_dir):  # noqa: F811
    evaluator = ScienceQAEvaluator(str(scienceqa_dir))
    combined, counts = combine("complement", evaluator, evaluator.items(), FIRST, SECOND)
    assert combined["3"] == SECOND["3"] and combined["4"] == SECOND["4"]
    assert combined["5"] == FIRST["5"] and counts == {"from_first": 4, "from_second": 2, "judged": 0, "judge_failures": 0}


def test_judge_settles_disagreements_over_http(scienceqa_dir, tmp_path):  # noqa: F811
    asked = []

    def respond(messages):
        asked.append(messages[-1]["content"])
        return "2\nAnswer 2 reasons correctly." if "The answer is A." in messages[-1]["content"] else "1"

    evaluator = ScienceQAEvaluator(str(scienceqa_dir))
    with FakeChatServer(api_key=None, respond=respond) as server:
        judge = {"base_url": server.base_url, "model": "fake", "api_key_env": None, "cache_dir": str(tmp_path)}
        combined, counts = combine("judge", evaluator, evaluator.items(), FIRST, SECOND, judge)
    # Disagreements with both valid: 5 (A vs B) and 6 (C vs A); 3 and 4 are complemented.
    assert len(asked) == 2 and counts["judged"] == 2
    assert combined["5"] == SECOND["5"] and combined["6"] == FIRST["6"]
    assert parse_choice("1\nbecause") == 1 and parse_choice("Answer 1") is None
    with pytest.raises(ConfigError, match="ensemble.judge.model"):
        combine("judge", evaluator, evaluator.items(), FIRST, SECOND, {})
    with pytest.raises(ConfigError, match="ensemble.method='vote'"):
        combine("vote", evaluator, evaluator.items(), FIRST, SECOND)


def _write(path, answers):
    path.write_text("".join(json.dumps({"question_id": k, "prompt": "", "text": v}) + "\n" for k, v in answers.items()))
    return path


@pytest.mark.slow
def test_cli_scores_the_complement_ensemble(scienceqa_dir, tmp_path):  # noqa: F811
    first, second = _write(tmp_path / "a.jsonl", FIRST), _write(tmp_path / "b.jsonl", SECOND)
    result = run_cli(["-m", "mmkit.evaluate", "task=scienceqa", f"data_dir={scienceqa_dir}", f"predictions={first}",
                      "ensemble.method=complement", f"ensemble.with={second}", f"out_dir={tmp_path / 'out'}"])
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / "results.json").read_text())
    assert metrics["acc"] == 50.0  # 1, 2 from A; 3 from B; 4 from B is wrong; 5, 6 wrong
    assert (tmp_path / "out" / "answers_complement.jsonl").is_file()
