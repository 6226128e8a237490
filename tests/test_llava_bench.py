"""LLaVA-Bench: the published layout, relative scores per category, and judges (rules; an
OpenAI-compatible one over real HTTP, including malformed scores, 429s and 500s)."""
from __future__ import annotations

import json
import threading

import pytest
from openai_server import FakeChatServer

from mmkit.core.errors import ConfigError
from mmkit.evaluation.judges import fact_f1, parse_scores
from mmkit.evaluation.llava_bench import LlavaBenchEvaluator
from mmkit.evaluation.run import run_task
from mmkit.synth.llava_bench_questions import write_llava_bench


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return write_llava_bench(tmp_path_factory.mktemp("bench"), scenes=4, seed=1)


def _answers(path, bench_dir, text_for):
    references = {json.loads(l)["question_id"]: json.loads(l)["text"] for l in (bench_dir / "answers_gpt4.jsonl").read_text().splitlines()}
    path.write_text("".join(json.dumps({"question_id": str(q), "prompt": "", "text": text_for(q, r)}) + "\n" for q, r in references.items()))
    return path


def test_the_layout_has_every_category_and_the_reference_scores_100(bench_dir, tmp_path):
    evaluator = LlavaBenchEvaluator(str(bench_dir))
    assert {item.reference.category for item in evaluator.items()} == {"conv", "detail", "complex"}
    result = run_task("llava_bench", evaluator, tmp_path, predictions=_answers(tmp_path / "a.jsonl", bench_dir, lambda q, r: r))
    assert result.metrics["relative"] == 100.0 and result.metrics["relative_std"] == 0.0
    assert result.metrics["judge"].startswith("rules") and result.metrics["judge_runs"] == 3
    assert "| overall |" in result.table


def test_rules_judge_scores_by_the_facts_stated():
    assert fact_f1("A small red circle in the top left.", "In the top left there is a small red circle.") == 1.0
    assert fact_f1("Blue.", "Red.") == 0.0
    half = fact_f1("A red square.", "A red circle.")  # 1 of 2 facts right
    assert half == pytest.approx(0.5)


def test_wrong_answers_score_below_the_reference_and_missing_ones_are_counted(bench_dir, tmp_path):
    answers = _answers(tmp_path / "a.jsonl", bench_dir, lambda q, r: "I cannot tell." if q % 2 else r)
    lines = answers.read_text().splitlines()
    answers.write_text("\n".join(lines[:-1]) + "\n")  # the last question unanswered
    result = run_task("llava_bench", LlavaBenchEvaluator(str(bench_dir)), tmp_path / "out", predictions=answers)
    assert result.metrics["relative"] < 100 and result.metrics["missing"] == 1


def test_score_line_parsing():
    assert parse_scores("8 6\nBecause...") == (8.0, 6.0)
    assert parse_scores("7.5, 9") == (7.5, 9.0)
    for bad in ("Both are good.", "8\n6", "11 3", "", None, "0 5"):
        assert parse_scores(bad) is None


def _judge(server, tmp_path, **options):
    return {"name": "openai", "base_url": server.base_url, "model": "fake-judge", "api_key_env": None,
            "backoff_s": 0.01, "cache_dir": str(tmp_path / "judge_cache"), **options}


def test_openai_judge_over_http_averages_three_runs_and_caches(bench_dir, tmp_path):
    counter = {"n": 0}
    lock = threading.Lock()

    def respond(messages):
        assert "[Answer 1]" in messages[-1]["content"] and "[Answer 2]" in messages[-1]["content"]
        with lock:
            counter["n"] += 1
        return "8 6\nAnswer 2 misses a detail."

    answers = _answers(tmp_path / "a.jsonl", bench_dir, lambda q, r: "Something.")
    with FakeChatServer(api_key=None, respond=respond, fail_first=2, fail_status=429) as server:
        # One order only here (swap_order=False): this test counts requests; tests/test_judging.py swaps.
        evaluator = LlavaBenchEvaluator(str(bench_dir), judge=_judge(server, tmp_path), swap_order=False)
        result = run_task("llava_bench", evaluator, tmp_path / "out", predictions=answers)
        questions = len(evaluator.items())
        assert server.requests == 3 * questions + 2  # three runs, plus the two 429s retried
        assert result.metrics["relative"] == 75.0 and result.metrics["judge_failures"] == 0
        assert result.metrics["judge"] == f"fake-judge at {server.base_url}"
        again = run_task("llava_bench", LlavaBenchEvaluator(str(bench_dir), judge=_judge(server, tmp_path), swap_order=False),
                         tmp_path / "out2", predictions=answers)
        assert server.requests == 3 * questions + 2  # every judgment came from the cache
        assert again.metrics == result.metrics


def test_malformed_scores_and_500s_are_retried_then_counted_as_failures_never_zero(bench_dir, tmp_path):
    answers = _answers(tmp_path / "a.jsonl", bench_dir, lambda q, r: r)
    with FakeChatServer(api_key=None, respond=lambda m: "Both answers are fine.") as server:
        evaluator = LlavaBenchEvaluator(str(bench_dir), judge=_judge(server, tmp_path, max_retries=2), runs=1, swap_order=False)
        result = run_task("llava_bench", evaluator, tmp_path / "out", predictions=answers)
        questions = len(evaluator.items())
        assert server.requests == 3 * questions  # each asked three times (max_retries=2)
        assert result.metrics["judge_failures"] == questions and "relative" not in result.metrics
        assert "judge failures (not scored): " + str(questions) in result.table
    with FakeChatServer(api_key=None, status=500) as server:
        evaluator = LlavaBenchEvaluator(str(bench_dir), judge=_judge(server, tmp_path, max_retries=1), runs=1, limit=2,
                                        swap_order=False)
        result = run_task("llava_bench", evaluator, tmp_path / "out3", predictions=answers)
        assert result.metrics["judge_failures"] == 2 and server.requests == 4


def test_a_bad_judge_config_names_its_key(bench_dir):
    with pytest.raises(ConfigError, match="task.judge.model"):
        LlavaBenchEvaluator(str(bench_dir), judge={"name": "openai", "api_key_env": None})
    with pytest.raises(ConfigError, match="task.judge"):
        LlavaBenchEvaluator(str(bench_dir), judge={"name": "gpt5"})
