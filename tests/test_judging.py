"""Judged scores you can trust: judges served over real HTTP on 127.0.0.1 (tests/openai_server.py)
with known biases, and mmkit's reports of them."""
from __future__ import annotations

import json
import random
import re

import pytest
from openai_server import FakeChatServer

from mmkit.core.registry import load_components
from mmkit.evaluation.judge_validity import JudgeValidityEvaluator, corrupt
from mmkit.evaluation.judges import facts
from mmkit.evaluation.llava_bench import LlavaBenchEvaluator

load_components()
_ANSWERS = re.compile(r"\[Answer 1\]\n(.*?)\n\[End of Answer 1\]\n\n\[Answer 2\]\n(.*?)\n\[End of Answer 2\]", re.S)


def answers_of(messages: list[dict]) -> tuple[str, str]:
    first, second = _ANSWERS.search(messages[-1]["content"]).groups()
    return first, second


def openai_judge(server: FakeChatServer, tmp_path, name: str = "judge") -> dict:
    return {"name": "openai", "base_url": server.base_url, "model": name, "api_key_env": None,
            "cache_dir": str(tmp_path / f"cache-{name}")}


def test_a_judge_that_favours_the_first_answer_is_measured_and_the_swap_cancels_it(tmp_path):
    def first_gets_two_more(messages):  # the two answers are equally good; position is all that counts
        return "8 6\nThe first answer is better."

    with FakeChatServer(api_key=None, respond=first_gets_two_more) as server:
        evaluator = LlavaBenchEvaluator(judge=openai_judge(server, tmp_path), runs=1, limit=12)
        items = evaluator.items()
        result = evaluator.score(items, {item.question_id: "An answer." for item in items})
        unswapped = LlavaBenchEvaluator(judge=openai_judge(server, tmp_path), runs=1, limit=12, swap_order=False)
        plain = unswapped.score(items, {item.question_id: "An answer." for item in items})
    metrics = result.metrics
    print(f"order effect {metrics['order_effect']}, relative {metrics['relative']} (reference first "
          f"{metrics['relative_reference_first']}, candidate first {metrics['relative_candidate_first']:.2f}; "
          f"one order only {plain.metrics['relative']})")
    assert metrics["order_effect"] == pytest.approx(2.0)  # the margin the judge gives the first place
    assert all(metrics[f"order_effect_{c}"] == pytest.approx(2.0) for c in ("conv", "detail", "complex")
               if f"order_effect_{c}" in metrics)
    assert metrics["relative"] == pytest.approx(100.0)  # both orders: the bias cancels
    assert metrics["relative_reference_first"] == pytest.approx(75.0)  # LLaVA-Bench's one order: 6 / 8
    assert metrics["relative_candidate_first"] == pytest.approx(100 * 8 / 6)
    assert plain.metrics["relative"] == pytest.approx(75.0) and plain.metrics["order_effect"] is None
    assert "order effect" in result.table


def test_two_judges_that_disagree_on_known_items_give_the_kappa_computed_by_hand(tmp_path):
    # Candidates say which verdict each judge should reach: judge A reads the first tag, B the second.
    verdict_pairs = [("better", "better"), ("worse", "worse"), ("tie", "tie"), ("better", "worse"),
                     ("better", "better"), ("worse", "tie"), ("tie", "tie"), ("worse", "worse"),
                     ("better", "tie"), ("worse", "worse"), ("better", "better"), ("tie", "better")]
    score = {"better": 9, "worse": 3, "tie": 5}

    def judge(which: int):
        def respond(messages):
            first, second = answers_of(messages)

            def rating(text: str) -> int:
                tags = re.findall(r"\[(\w+)/(\w+)\]", text)
                return score[tags[0][which]] if tags else 5  # the reference, whatever its words, gets 5
            return f"{rating(first)} {rating(second)}"
        return respond

    with FakeChatServer(api_key=None, respond=judge(0)) as a, FakeChatServer(api_key=None, respond=judge(1)) as b:
        evaluator = LlavaBenchEvaluator(judge=[openai_judge(a, tmp_path, "a"), openai_judge(b, tmp_path, "b")],
                                        runs=1, limit=len(verdict_pairs))
        items = evaluator.items()
        answers = {item.question_id: f"[{x}/{y}] An answer." for item, (x, y) in zip(items, verdict_pairs)}
        metrics = evaluator.score(items, answers).metrics

    classes = {"worse": 0, "tie": 1, "better": 2}
    first = [classes[x] for x, _ in verdict_pairs]
    second = [classes[y] for _, y in verdict_pairs]
    observed = sum(x == y for x, y in zip(first, second)) / len(first)
    chance = sum(first.count(c) * second.count(c) for c in range(3)) / len(first) ** 2
    print(f"kappa_0_1 {metrics['kappa_0_1']:.6f}, by hand {(observed - chance) / (1 - chance):.6f}")
    assert metrics["kappa_0_1"] == pytest.approx((observed - chance) / (1 - chance), abs=1e-6)
    assert metrics["agreement_items"] == len(verdict_pairs)
    # Each judge's own relative score, and the panel's mean and spread.
    assert metrics["judge_0_relative"] != metrics["judge_1_relative"]
    assert metrics["relative"] == pytest.approx((metrics["judge_0_relative"] + metrics["judge_1_relative"]) / 2)
    assert metrics["judges_relative_spread"] > 0


def test_corrupting_a_reference_changes_its_facts():
    rng = random.Random(0)
    text = "There are two large red circles to the left of a small blue square. Yes."
    wrong = corrupt(text, rng)
    assert wrong != text and facts(wrong) != facts(text) and "circles" not in wrong.split()[3:4]


def test_judge_validity_is_perfect_for_the_rules_judge_and_chance_for_a_random_one(tmp_path):
    evaluator = JudgeValidityEvaluator(scenes=100, judge={"name": "rules"}, runs=1)
    items = evaluator.items()
    rules = evaluator.score(items, {}).metrics
    assert rules["auroc"] == 1.0 and rules["right"] > 200 and rules["wrong"] > 200
    assert rules["order_effect"] == pytest.approx(0.0, abs=1e-9)

    rng = random.Random(1)
    with FakeChatServer(api_key=None, respond=lambda messages: f"{rng.randint(1, 10)} {rng.randint(1, 10)}") as server:
        random_judge = JudgeValidityEvaluator(scenes=100, judge=openai_judge(server, tmp_path, "random"), runs=1)
        metrics = random_judge.score(random_judge.items(), {}).metrics
    print(f"rules judge: AUROC {rules['auroc']} over {rules['right']} right and {rules['wrong']} wrong candidates; "
          f"random judge: AUROC {metrics['auroc']} over {metrics['candidates']}, order effect {metrics['order_effect']:+.3f}")
    assert metrics["candidates"] >= 400
    assert 0.4 < metrics["auroc"] < 0.6


def test_judge_validity_runs_from_the_command_line_without_a_model(tmp_path):
    from conftest import run_cli

    out = tmp_path / "validity"
    result = run_cli(["-m", "mmkit.evaluate", "task=judge_validity", "task.scenes=20", f"out_dir={out}"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "results.json").read_text())
    assert metrics["auroc"] == 1.0 and "AUROC" in (out / "table.md").read_text()


@pytest.mark.slow
def test_a_run_whose_teacher_is_the_judge_is_flagged_in_its_results(lively_run, tmp_path):
    import shutil

    from conftest import run_cli
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    shutil.copytree(lively_run, run)
    with FakeChatServer(api_key=None, respond=lambda messages: "8 7") as server:
        config = OmegaConf.load(run / ".hydra" / "config.yaml")
        config.data.finetune.teacher = "openai"
        config.data.finetune.teacher_options = {"base_url": server.base_url, "model": "teacher-and-judge"}
        OmegaConf.save(config, run / ".hydra" / "config.yaml")
        judges = ", ".join(f"{{name: openai, base_url: '{server.base_url}', model: {model}, api_key_env: null, "
                           f"cache_dir: '{tmp_path / 'cache'}'}}" for model in ("another-judge", "teacher-and-judge"))
        result = run_cli(["-m", "mmkit.evaluate", "task=llava_bench", f"model={run}", "task.limit=3", "task.runs=1",
                          "max_new_tokens=4", f"task.judge=[{judges}]", f"out_dir={tmp_path / 'out'}"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "results.json").read_text())
    assert metrics["judge_is_teacher"] is True and "WARNING" in (tmp_path / "out" / "table.md").read_text()
    assert {"teacher": "openai", "model": "teacher-and-judge", "base_url": server.base_url} in metrics["teachers"]


def test_only_the_same_model_at_the_same_endpoint_or_a_named_family_counts_as_the_teacher():
    from mmkit.core.registry import JUDGES
    from mmkit.evaluation.llava_bench import teacher_overlap

    def judge(model: str, base_url: str = "http://127.0.0.1:9/v1"):
        return JUDGES.build({"name": "openai", "base_url": base_url, "model": model, "api_key_env": None}, "task.judge")

    teacher = {"teacher": "openai", "model": "gpt-4o-2024-08-06", "base_url": "http://127.0.0.1:9/v1"}
    assert teacher_overlap([teacher], [judge("gpt-4o-2024-08-06")], [])["judge_is_teacher"] is True
    assert teacher_overlap([teacher], [judge("gpt-4o-2024-08-06", "http://elsewhere/v1")], [])["judge_is_teacher"] is False
    assert teacher_overlap([teacher], [judge("gpt-4o-mini")], [])["judge_is_teacher"] is False
    assert teacher_overlap([teacher], [judge("gpt-4o-mini")], ["gpt-4o"])["judge_is_teacher"] is True
    assert teacher_overlap([teacher], [JUDGES.build({"name": "rules"}, "task.judge")], [])["judge_is_teacher"] is False
    assert teacher_overlap([], [judge("gpt-4o-mini")], []) == {}  # nothing known about the data: no claim
