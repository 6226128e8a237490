"""Evaluation split across processes: python -m mmkit.evaluate and the lmms-eval adapter under
torchrun on CPU (gloo), each answering its rank's share, with results equal to one process's."""
from __future__ import annotations

import json

import pytest
from conftest import run_cli
from test_lmms_eval import _mmkit_generator, _prompt, _samples, _write_tasks

from mmkit.evaluation.answers import answer_items
from mmkit.evaluation.evaluator import EvalItem
from mmkit.inference.generation import Prompt

# torchrun; --standalone takes a free port, so runs side by side do not meet.
TWO_PROCESSES = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# Two scenes, twelve questions; short answers keep each run to seconds.
SYNTHETIC = ["-m", "mmkit.evaluate", "task=synthetic", "task.count=2", "max_new_tokens=8", "batch_size=2"]
OUTPUTS = ("answers.jsonl", "results.json", "predictions.jsonl", "table.md")


@pytest.mark.slow
def test_two_processes_write_what_one_does_and_resume_from_their_own_files(lively_run, tmp_path):
    one = run_cli(SYNTHETIC + [f"model={lively_run}", f"out_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(TWO_PROCESSES + SYNTHETIC + [f"model={lively_run}", f"out_dir={tmp_path / 'two'}"])
    assert two.returncode == 0, two.stderr[-3000:]
    for name in OUTPUTS:
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name
    assert two.stdout.count("| overall |") == 1  # rank 0 alone scores and prints
    assert not list((tmp_path / "two").glob("answers.rank*"))

    # An interrupted two-process run left rank 1's file: one answer saved, then a torn line.
    records = [json.loads(line) for line in (tmp_path / "one" / "answers.jsonl").read_text().splitlines()]
    records[1]["text"] = "kept from before"  # item 1 is rank 1's first: it must not be asked again
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "answers.rank1.jsonl").write_text(json.dumps(records[1]) + '\n{"question_id": "te')
    again = run_cli(TWO_PROCESSES + SYNTHETIC + [f"model={lively_run}", f"out_dir={resumed}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"1 of {len(records)} items answered already" in again.stdout
    assert [json.loads(line) for line in (resumed / "answers.jsonl").read_text().splitlines()] == records
    assert not list(resumed.glob("answers.rank*"))


def test_one_process_takes_up_the_files_an_interrupted_multi_process_run_left(tmp_path):
    items = [EvalItem(f"q{i}", Prompt([{"from": "human", "value": f"question {i}"}], None), None) for i in range(5)]
    path = tmp_path / "answers.jsonl"
    (tmp_path / "answers.rank0.jsonl").write_text(json.dumps({"question_id": "q2", "prompt": "question 2", "text": "two"}) + "\n")
    (tmp_path / "answers.rank1.jsonl").write_text(json.dumps({"question_id": "q1", "prompt": "question 1", "text": "one"}) + "\n{")
    generator = EchoGenerator()

    answers = answer_items(items, generator, path)

    assert generator.asked == ["question 0", "question 3", "question 4"]
    assert answers == {"q0": "0?", "q1": "one", "q2": "two", "q3": "3?", "q4": "4?"}
    saved = [json.loads(line) for line in path.read_text().splitlines()]
    # What was answered now comes first, as it was saved; the ranks' answers follow in item order.
    assert [(r["question_id"], r["text"]) for r in saved] == [("q0", "0?"), ("q3", "3?"), ("q4", "4?"), ("q1", "one"), ("q2", "two")]
    assert not list(tmp_path.glob("answers.rank*"))


class EchoGenerator:
    """Answers "N?" to "question N" and remembers what it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def answer_batches(self, prompts, progress=True, desc="answering", sampling=None):
        self.asked += [prompt.text for prompt in prompts]
        yield slice(0, len(prompts)), [prompt.text.split()[-1] + "?" for prompt in prompts]


@pytest.mark.slow
def test_lmms_eval_gives_each_of_two_processes_its_share_of_the_requests(lively_run, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = _write_tasks(tasks)
    out = tmp_path / "out"
    result = run_cli(TWO_PROCESSES + [
        "-m", "lmms_eval", "eval", "--model", "mmkit", "--model_args", f"model={lively_run}",
        "--tasks", "mmkit_qa", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "1",
        "--output_path", str(out), "--log_samples",
    ])
    assert result.returncode == 0 and len(list(out.rglob("*_results.json"))) == 1, result.stderr[-4000:]
    samples = _samples(out, "mmkit_qa")
    # lmms-eval gathers every rank's samples: had each rank answered every request, each doc would come twice.
    assert sorted(s["doc_id"] for s in samples) == list(range(len(docs)))

    generator = _mmkit_generator(lively_run)
    expected = [generator.answer([_prompt(d)], progress=False)[0].split("\n")[0].strip() for d in docs]
    assert [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])] == expected
