"""The lmms-eval adapter: a local lmms-eval task run through the harness's own CLI on a trained
mmkit run folder, answering exactly as mmkit's own evaluation does."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from mmkit.evaluation.synthetic import ask_about
from mmkit.synth.world import generate_scenes, render

UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def doc_to_target(doc):
    return doc["answer"]
'''

TASK = '''
task: mmkit_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
generation_kwargs:
  max_new_tokens: 8
  until: ["\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
'''


def _write_tasks(folder: Path) -> list[dict]:
    """A local lmms-eval task (generate_until) over synthetic test scenes, and its documents."""
    questions = ask_about(generate_scenes("test", 4, seed=0), ("colour", "count", "existence"), seed=0)
    docs = []
    for index, question in enumerate(questions):
        image = folder / f"{index}.png"
        render(question.scene).save(image)
        docs.append({"image": str(image), "question": question.question, "answer": question.answer, "kind": question.kind})
    (folder / "qa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "utils.py").write_text(UTILS)
    (folder / "mmkit_qa.yaml").write_text(TASK.format(data=folder / "qa.jsonl"))
    return docs


def _samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"*_samples_{task}.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_local_task_runs_through_the_lmms_eval_cli_and_answers_as_mmkit_does(trained_run, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = _write_tasks(tasks)
    out = tmp_path / "out"
    result = run_cli([
        "-m", "lmms_eval", "eval", "--model", "mmkit", "--model_args", f"model={trained_run}",
        "--tasks", "mmkit_qa", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "4",
        "--output_path", str(out), "--log_samples",
    ])
    # lmms-eval logs a failed evaluation and still exits 0: its results file is the proof.
    results_files = list(out.rglob("*_results.json"))
    assert result.returncode == 0 and len(results_files) == 1, result.stderr[-4000:]
    score = json.loads(results_files[0].read_text())["results"]["mmkit_qa"]["exact_match,none"]

    generator = _mmkit_generator(trained_run)
    expected = [a.split("\n")[0].strip() for a in generator.answer([_prompt(d) for d in docs], progress=False)]
    answered = {s["doc_id"]: s["filtered_resps"] for s in _samples(out, "mmkit_qa")}
    assert [answered[i] for i in range(len(docs))] == expected
    assert score == pytest.approx(sum(a == d["answer"] for a, d in zip(expected, docs)) / len(docs))


def test_loglikelihood_is_the_decoders_own_loss_on_the_continuation(trained_run, tmp_path):
    """lmms-eval 0.7.3 turns every loglikelihood result into a string before scoring, which breaks
    its multiple_choice tasks for all models; so the adapter's loglikelihood is checked directly."""
    from lmms_eval.api.instance import Instance

    from mmkit.evaluation.lmms_adapter import MmkitModel

    docs = [d for d in _write_tasks(tmp_path) if d["kind"] == "existence"]
    adapter = MmkitModel(model=str(trained_run), batch_size=2)
    adapter.task_dict = {"mmkit_mc": {"test": docs}}
    requests = [
        Instance("loglikelihood", (d["question"], f" {choice}", _visual, i, "mmkit_mc", "test"), idx=0,
                 metadata={"task": "mmkit_mc", "doc_id": i, "repeats": 1})
        for i, d in enumerate(docs) for choice in ("Yes.", "No.")
    ]
    results = adapter.loglikelihood(requests)

    generator = _mmkit_generator(trained_run)
    model, tokenizer = generator.model, generator.model.tokenizer
    for request, (logprob, greedy) in zip(requests, results):
        prompt = _prompt(docs[request.args[3]])
        prompt_ids = generator.template.encode(prompt.conversation, tokenizer, model.num_image_tokens, for_generation=True).input_ids
        continuation = tokenizer(request.args[1], add_special_tokens=False).input_ids
        ids = torch.tensor([prompt_ids + continuation])
        labels = torch.tensor([[-100] * len(prompt_ids) + continuation])
        with torch.no_grad():
            output = model(ids, torch.ones_like(ids), generator.image_processor(prompt.load_image()).unsqueeze(0), labels=labels)
        assert logprob == pytest.approx(-float(output.loss) * len(continuation), abs=1e-4)
        greedy_ids = output.logits[0, len(prompt_ids) - 1 : -1].argmax(-1).tolist()
        assert greedy == (greedy_ids == continuation)


def _visual(doc: dict):
    from PIL import Image

    return [Image.open(doc["image"]).convert("RGB")]


def _prompt(doc: dict):
    from mmkit.inference.generation import Prompt

    return Prompt([{"from": "human", "value": f"<image>\n{doc['question']}"}], _visual(doc)[0])


def _mmkit_generator(run_dir: Path):
    from mmkit.inference.from_run import build_generator
    from mmkit.models.load import load_run

    cfg, model = load_run(run_dir)
    return build_generator(cfg, model, batch_size=4, max_new_tokens=8)


@pytest.mark.slow
def test_a_missing_run_folder_is_one_clear_line(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    result = run_cli([
        "-m", "lmms_eval", "eval", "--model", "mmkit", "--model_args", f"model={tmp_path / 'nowhere'}",
        "--tasks", "mmkit_qa", "--include_path", str(tasks), "--device", "cpu",
    ])
    assert "not an mmkit run folder" in result.stdout + result.stderr
