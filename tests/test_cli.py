"""The training command as a user runs it: real subprocesses, real run folders."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, compose, run_cli
from safetensors import safe_open

TRAIN = ["-m", "mmkit.train"]


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_unknown_connector_config_fails_with_one_line():
    result = run_cli(TRAIN + ["connector=mlp3x"])
    assert result.returncode == 2
    assert error_lines(result) == [
        "error: connector=mlp3x: no such connector config; available: identity, linear, mlp2x_gelu; "
        "did you mean 'mlp2x_gelu'?"
    ]
    assert "Traceback" not in result.stderr


def test_unknown_registered_name_fails_with_one_line():
    result = run_cli(TRAIN + ["connector.name=mlp3x"])
    assert result.returncode == 2
    assert error_lines(result) == [
        "error: connector.name='mlp3x': unknown connector; registered: identity, linear, mlp{N}x_gelu; "
        "did you mean 'mlp2x_gelu'?"
    ]


def test_out_of_range_layer_fails_before_training_and_leaves_no_run_folder(tmp_path):
    result = run_cli(TRAIN + ["encoder.layer=99"], cwd=tmp_path)
    assert result.returncode == 2
    assert error_lines(result) == [
        "error: encoder.layer=99 is out of range: this encoder has 5 hidden states (embeddings + 4 blocks), "
        "so use -5..4"
    ]
    assert list(tmp_path.iterdir()) == []  # Hydra's outputs/DATE/TIME was made, and removed again


def test_a_refused_config_keeps_a_run_folder_that_holds_a_run(tmp_path):
    (tmp_path / "pretrain").mkdir()  # an earlier run's stage
    result = run_cli(TRAIN + ["recipe.stages.pretrain.epochs=0", f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 2 and "epochs" in error_lines(result)[0]
    assert (tmp_path / "pretrain").is_dir()
    fresh = tmp_path / "fresh"
    again = run_cli(TRAIN + ["recipe.stages.pretrain.epochs=0", f"hydra.run.dir={fresh}"])
    assert again.returncode == 2 and not fresh.exists()


def test_multirun_with_several_devices_is_refused(tmp_path):
    result = run_cli(TRAIN + ["-m", "connector=linear,mlp2x_gelu", "trainer.devices=2", f"hydra.sweep.dir={tmp_path}"])
    assert result.returncode == 2
    assert "Hydra multirun (-m) in one process" in error_lines(result)[0]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["experiment=llava_v1_5"], {"encoder.path": "openai/clip-vit-large-patch14-336", "connector.name": "mlp2x_gelu",
                                     "decoder.path": "lmsys/vicuna-7b-v1.5", "data.image_mode": "pad",
                                     "recipe.stages.pretrain.global_batch_size": 256,
                                     "recipe.stages.pretrain.optimizer.lr": 1e-3,
                                     "recipe.stages.finetune.global_batch_size": 128,
                                     "recipe.stages.finetune.optimizer.lr": 2e-5, "recipe.stages.finetune.epochs": 1}),
        (["experiment=llava_v1_5", "decoder=vicuna_13b", "trainer=fsdp"],
         {"decoder.path": "lmsys/vicuna-13b-v1.5", "trainer.strategy.name": "fsdp", "trainer.precision": "bf16-mixed"}),
        (["experiment=llava_v1"], {"encoder.path": "openai/clip-vit-large-patch14", "connector.name": "linear",
                                   "encoder.layer": -2, "recipe.stages.pretrain.global_batch_size": 128,
                                   "recipe.stages.pretrain.optimizer.lr": 2e-3,
                                   "recipe.stages.finetune.global_batch_size": 32,
                                   "recipe.stages.finetune.optimizer.lr": 2e-5, "recipe.stages.finetune.epochs": 3}),
        (["experiment=llava_v1", "decoder=vicuna_7b", "trainer=ddp"], {"decoder.path": "lmsys/vicuna-7b-v1.5",
                                                                       "trainer.strategy": "ddp"}),
        (["recipe=no_stage1"], {"recipe.stages.finetune.train": ["connector", "decoder"]}),
    ],
)
def test_paper_configs_compose_without_loading_weights(overrides, expected):
    from omegaconf import OmegaConf

    cfg = compose(overrides)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    for key, value in expected.items():
        assert OmegaConf.select(cfg, key) == value, key
    if overrides == ["recipe=no_stage1"]:
        assert list(cfg.recipe.stages) == ["finetune"]


def test_experiment_cfg_job_prints_the_composed_config():
    result = run_cli(TRAIN + ["experiment=llava_v1_5", "decoder=vicuna_13b", "trainer=fsdp", "--cfg", "job"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "path: lmsys/vicuna-13b-v1.5" in result.stdout and "name: fsdp" in result.stdout


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_default_recipe_writes_a_traceable_run_folder(tmp_path):
    result = run_cli(TRAIN + TINY_RUN + ["connector=linear", "encoder.layer=-1", f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    # Lightning's advertisements and torch's LeafSpec deprecation are dropped; its other messages stay.
    output = result.stdout + result.stderr
    assert "Tip:" not in output and "litlogger" not in output and "LeafSpec" not in output
    assert "GPU available" in output
    summary = read_summary(tmp_path)
    assert list(summary["stages"]) == ["pretrain", "finetune"]
    pretrain, finetune = summary["stages"]["pretrain"], summary["stages"]["finetune"]
    assert pretrain["steps"] == 6 and pretrain["samples"] == 96
    assert pretrain["trainable_params"] == 128 * 128 + 128  # linear 128 -> 128
    assert finetune["connector_from"] == str(tmp_path / "pretrain" / "trainable.safetensors")
    for stage in (pretrain, finetune):
        assert stage["final_loss"] > 0 and stage["skipped_samples"] == 0 and stage["wall_time_s"] > 0
        assert stage["shards_sha256"] and all(len(h) == 64 for h in stage["shards_sha256"].values())
        assert stage["total_params"] > stage["trainable_params"]
    assert summary["seed"] == 0 and summary["versions"]["torch"] and "commit" in summary["git"]
    logged = (tmp_path / "pretrain" / "metrics.csv").read_text().splitlines()[0]
    assert "throughput/real_tokens_per_s" in logged and "throughput/real_token_share" in logged
    composed = (tmp_path / ".hydra" / "config.yaml").read_text()
    assert "name: linear" in composed and "layer: -1" in composed
    with safe_open(str(tmp_path / "pretrain" / "trainable.safetensors"), "pt") as handle:
        assert sorted(handle.keys()) == ["connector.proj.bias", "connector.proj.weight"]
    assert "finetune" in result.stdout and "final loss" in result.stdout

    # The run ends with the held-out evaluation, written to the run folder and printed.
    metrics = summary["evaluation"]["synthetic"]
    assert json.loads((tmp_path / "eval" / "synthetic" / "results.json").read_text()) == metrics
    assert 0 <= metrics["acc"] <= 100 and 0 <= metrics["blind_acc"] <= 100
    predictions = (tmp_path / "eval" / "synthetic" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) >= 8 and "| overall |" in result.stdout

    # The run folder is a model: loading it gives back exactly the weights each stage trained.
    from safetensors.torch import load_file

    from mmkit.models.load import load_run

    _, model = load_run(tmp_path)
    state = model.state_dict()
    finetuned = load_file(str(tmp_path / "finetune" / "trainable.safetensors"))
    assert finetuned and all(torch.equal(state[name], tensor) for name, tensor in finetuned.items())


@pytest.mark.slow
def test_no_stage1_recipe_trains_only_stage2(tmp_path):
    finetune_only = [o for o in TINY_RUN if "pretrain" not in o]
    result = run_cli(TRAIN + finetune_only + ["recipe=no_stage1", f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(tmp_path)
    assert list(summary["stages"]) == ["finetune"]
    assert summary["stages"]["finetune"]["connector_from"] is None
    assert not (tmp_path / "pretrain").exists()


@pytest.mark.slow
def test_multirun_sweeps_connector_and_layer(tmp_path):
    result = run_cli(
        TRAIN + ["-m", "connector=linear,mlp2x_gelu", "encoder.layer=-1,-2", f"hydra.sweep.dir={tmp_path}"]
        + TINY_RUN + ["recipe.stages.pretrain.max_steps=2", "recipe.stages.finetune.max_steps=2"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(tmp_path.glob("*/summary.json"))
    assert len(runs) == 4
    seen = set()
    for path in runs:
        overrides = tuple(sorted(json.loads(path.read_text())["overrides"]))
        seen.add(overrides)
        assert json.loads(path.read_text())["stages"]["finetune"]["steps"] == 2
    assert {tuple(o for o in s if o.startswith(("connector=", "encoder.layer="))) for s in seen} == {
        ("connector=linear", "encoder.layer=-1"), ("connector=linear", "encoder.layer=-2"),
        ("connector=mlp2x_gelu", "encoder.layer=-1"), ("connector=mlp2x_gelu", "encoder.layer=-2"),
    }


@pytest.mark.slow
def test_two_process_ddp_trains_on_disjoint_shards(tmp_path):
    overrides = TINY_RUN + [
        "recipe.stages.pretrain.micro_batch_size=8", "trainer.devices=2", "trainer.strategy=ddp",
        "log_sample_keys=true", f"hydra.run.dir={tmp_path}",
    ]
    result = run_cli(TRAIN + overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(tmp_path)
    for name in ("pretrain", "finetune"):
        stage = summary["stages"][name]
        assert stage["world_size"] == 2
        rank0 = (tmp_path / name / "samples.rank0.txt").read_text().split()
        rank1 = (tmp_path / name / "samples.rank1.txt").read_text().split()
        assert rank0 and rank1 and len(rank0) == len(rank1)  # same number of batches on every rank
        assert not set(rank0) & set(rank1)  # split by node: no sample seen by both ranks
        assert stage["samples"] == len(rank0) + len(rank1)
    assert summary["stages"]["pretrain"]["samples"] == 96
