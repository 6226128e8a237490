"""Stages train exactly what they name; checkpoints hold exactly that and reload into the next stage."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, compose
from PIL import Image
from safetensors.torch import load_file

from mmkit.data.shards import convert_llava_json
from mmkit.models.build import build_model
from mmkit.training.recipe import _init_connector, run_stage

STEPS = ["recipe.stages.pretrain.max_steps=3", "recipe.stages.finetune.max_steps=3"]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    after = model.state_dict()
    return {name for name, tensor in before.items() if not torch.equal(tensor, after[name])}


ENCODER_GRAD_MODES: list[bool] = []


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A stage-1 run on a fresh model: (cfg, model, weights before, summary, checkpoint)."""
    cfg = compose(TINY_RUN + STEPS)
    model = build_model(cfg)
    before = snapshot(model)
    hook = model.encoder.register_forward_hook(lambda *_: ENCODER_GRAD_MODES.append(torch.is_grad_enabled()))
    summary, checkpoint = run_stage(cfg, "pretrain", model, tmp_path_factory.mktemp("run"), previous=None)
    hook.remove()
    return cfg, model, before, summary, checkpoint


def test_frozen_weights_cost_nothing_in_stage1(stage1):
    """No gradient, no optimizer state for frozen weights; the frozen tower runs without autograd."""

    from mmkit.training.module import LitVLM

    _, model, _, _, _ = stage1
    assert ENCODER_GRAD_MODES and not any(ENCODER_GRAD_MODES)
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("connector."))
    lit = LitVLM(model, {"lr": 1e-3}, {}, total_steps=10)
    optimizer = lit.configure_optimizers()["optimizer"]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.connector.parameters()}


def test_every_stage_reports_its_throughput(stage1):
    throughput = stage1[3]["throughput"]
    assert throughput["tokens_per_s"] > 0 and throughput["images_per_s"] > 0 and throughput["samples_per_s"] > 0
    assert 0 < throughput["real_token_share"] <= 1 and throughput["real_tokens_per_s"] <= throughput["tokens_per_s"]
    assert throughput["model_tflops_per_s"] > 0 and 0 <= throughput["data_wait_share"] < 1
    assert throughput["mfu"] is None and throughput["peak_tflops"] is None  # no peak to divide by on a CPU


def test_stage1_changes_only_connector_weights(stage1):
    _, model, before, summary, _ = stage1
    changed_names = changed(before, model)
    connector_names = {n for n in before if n.startswith("connector.")}
    assert changed_names == connector_names  # every connector tensor moved; every other one is bit-equal
    assert summary["steps"] == 3 and summary["samples"] == 48
    assert summary["trainable_params"] == sum(p.numel() for p in model.connector.parameters())


def test_stage1_checkpoint_holds_only_the_connector(stage1):
    _, model, _, _, checkpoint = stage1
    tensors = load_file(str(checkpoint))
    assert set(tensors) == {n for n, _ in model.connector.named_parameters(prefix="connector")}
    for name, tensor in tensors.items():
        assert torch.equal(tensor, model.state_dict()[name])


def test_stage1_checkpoint_reloads_into_stage2(stage1, tmp_path):
    cfg, trained, _, _, checkpoint = stage1
    fresh = build_model(cfg)
    assert not torch.equal(fresh.connector.layers[0].weight, trained.connector.layers[0].weight)
    assert _init_connector(fresh, "previous", checkpoint, "recipe.stages.finetune") == str(checkpoint)
    for name, tensor in trained.connector.state_dict().items():
        assert torch.equal(fresh.connector.state_dict()[name], tensor)

    before = snapshot(fresh)
    summary, stage2_checkpoint = run_stage(cfg, "finetune", fresh, tmp_path, previous=checkpoint)
    assert summary["connector_from"] == str(checkpoint)
    moved = changed(before, fresh)
    assert not any(name.startswith("encoder.") for name in moved)
    assert any(name.startswith("connector.") for name in moved)
    assert any(name.startswith("decoder.") for name in moved)
    keys = set(load_file(str(stage2_checkpoint)))
    assert not any(k.startswith("encoder.") for k in keys)
    assert {k for k in keys if k.startswith("decoder.")} == {n for n, _ in fresh.decoder.named_parameters(prefix="decoder")}


def test_lora_finetune_trains_adapters_and_connector_only(tmp_path):
    cfg = compose(TINY_RUN + STEPS + ["decoder.lora.enabled=true", "decoder.lora.r=4"])
    model = build_model(cfg)
    before = snapshot(model)
    summary, checkpoint = run_stage(cfg, "finetune", model, tmp_path, previous=None)
    moved = changed(before, model)
    assert moved and all(n.startswith("connector.") or "lora_" in n for n in moved)
    assert any("lora_B" in n for n in moved)
    keys = set(load_file(str(checkpoint)))
    assert keys and all(k.startswith("connector.") or "lora_" in k for k in keys)
    assert summary["trainable_params"] < summary["total_params"] / 4


def _write_llava_folder(folder: Path, good: int) -> Path:
    images = folder / "images"
    images.mkdir(parents=True)
    records = []
    for index in range(good):
        Image.new("RGB", (40, 30), (index * 20, 100, 50)).save(images / f"img{index}.png")
        records.append({"id": f"good{index}", "image": f"img{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour dominates?"}, {"from": "gpt", "value": "Green."}]})
    # A readable header over cut-off pixels: the converter reads headers only, so training meets the damage.
    whole = (images / "img0.png").read_bytes()
    (images / "broken.png").write_bytes(whole[: len(whole) // 2])
    records.append({"id": "corrupt_image", "image": "broken.png", "conversations": records[0]["conversations"]})
    records.append({"id": "no_answer", "image": "img0.png", "conversations": [{"from": "human", "value": "<image>\nHi"}]})
    records.append({"id": "two_placeholders", "image": "img1.png", "conversations": [
        {"from": "human", "value": "<image>\n<image>\nHi"}, {"from": "gpt", "value": "Hello."}]})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_bad_samples_are_skipped_counted_and_logged(tmp_path):
    json_path = _write_llava_folder(tmp_path / "raw", good=13)
    convert_llava_json(json_path, tmp_path / "raw" / "images", tmp_path / "shards", samples_per_shard=8, progress=False)
    cfg = compose(TINY_RUN + ["~data.finetune", f"+data.finetune={{name: shards, path: {tmp_path / 'shards'}}}",
                              "recipe.stages.finetune.micro_batch_size=4", "recipe.stages.finetune.global_batch_size=4",
                              "data.shuffle_buffer=0"])
    model = build_model(cfg)
    summary, _ = run_stage(cfg, "finetune", model, tmp_path / "run", previous=None)
    assert summary["skipped_samples"] == 3
    assert summary["samples"] == 13  # 16 stored = 4 batches of 4; every good sample trained once
    logged = [json.loads(line) for line in (tmp_path / "run" / "finetune" / "skipped.jsonl").read_text().splitlines()]
    reasons = {entry["key"]: entry["reason"] for entry in logged}
    assert set(reasons) == {"corrupt_image", "no_answer", "two_placeholders"}
    assert "undecodable image" in reasons["corrupt_image"]
    assert "no assistant reply" in reasons["no_answer"]
    assert "2 <image> placeholders for 1 image" in reasons["two_placeholders"]


def test_fsdp_strategy_wraps_the_named_layers_of_the_built_model(tiny_model):
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from mmkit.core.errors import ConfigError
    from mmkit.training.trainer import build_strategy

    strategy = build_strategy(
        {"name": "fsdp", "auto_wrap": ["LlamaDecoderLayer"], "activation_checkpointing": ["LlamaDecoderLayer"],
         "sharding_strategy": "FULL_SHARD", "use_orig_params": True}, tiny_model)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}
    assert strategy.kwargs["use_orig_params"] is True
    with pytest.raises(ConfigError, match=r"trainer.strategy.auto_wrap: \['GPT2Block'\] are not layers of this model"):
        build_strategy({"name": "fsdp", "auto_wrap": ["GPT2Block"]}, tiny_model)
    assert build_strategy("ddp", tiny_model) == "ddp"


def test_too_many_skipped_samples_stop_the_stage_with_the_reasons_kept(tmp_path):
    from mmkit.core.errors import DataError

    json_path = _write_llava_folder(tmp_path / "raw", good=13)
    convert_llava_json(json_path, tmp_path / "raw" / "images", tmp_path / "shards", samples_per_shard=8, progress=False)
    cfg = compose(TINY_RUN + ["~data.finetune", f"+data.finetune={{name: shards, path: {tmp_path / 'shards'}}}",
                              "recipe.stages.finetune.micro_batch_size=4", "recipe.stages.finetune.global_batch_size=4",
                              "data.shuffle_buffer=0", "guards.min_samples_checked=8", "guards.max_skip_fraction=0.1"])
    with pytest.raises(DataError, match=r"samples read so far were skipped .*guards.max_skip_fraction=0.1"):
        run_stage(cfg, "finetune", build_model(cfg), tmp_path / "run", previous=None)
    logged = (tmp_path / "run" / "finetune" / "skipped.jsonl").read_text().splitlines()
    assert logged and all(json.loads(line)["reason"] for line in logged)


def _poison_connector(model, calls: set[int] | None):
    """Make the connector's output NaN on the given forward calls (all calls when None)."""
    count = {"calls": 0}

    def hook(module, inputs, output):
        count["calls"] += 1
        return output * float("nan") if calls is None or count["calls"] in calls else output

    return model.connector.register_forward_hook(hook)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    cfg = compose(TINY_RUN + ["recipe.stages.finetune.micro_batch_size=8", "recipe.stages.finetune.global_batch_size=8"])
    model = build_model(cfg)
    _poison_connector(model, calls={2, 3})
    summary, _ = run_stage(cfg, "finetune", model, tmp_path, previous=None)
    assert summary["nonfinite_steps_skipped"] == 2
    assert summary["steps"] == summary["samples"] // 8  # the skipped steps are counted, their updates never applied
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert summary["final_loss"] is not None and torch.isfinite(torch.tensor(summary["final_loss"]))


def test_a_loss_that_stays_nonfinite_stops_the_run(tmp_path):
    from mmkit.core.errors import TrainingError

    cfg = compose(TINY_RUN + ["recipe.stages.finetune.micro_batch_size=8", "recipe.stages.finetune.global_batch_size=8",
                              "guards.max_nonfinite_steps=3"])
    model = build_model(cfg)
    _poison_connector(model, calls=None)
    with pytest.raises(TrainingError, match="loss was NaN or infinite for 3 steps in a row"):
        run_stage(cfg, "finetune", model, tmp_path, previous=None)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lora_without_a_stage_that_trains_the_decoder_is_refused_in_one_line():
    from mmkit.core.errors import ConfigError
    from mmkit.training.recipe import check_recipe

    with pytest.raises(ConfigError, match=r"decoder.lora.enabled=true, but no stage of the recipe trains the decoder"):
        check_recipe(compose(["recipe=stage1_only", "decoder.lora.enabled=true"]))


def test_a_pickled_checkpoint_is_refused_not_unpickled(tmp_path, tiny_model):
    from mmkit.core.errors import ConfigError
    from mmkit.models.checkpoint_io import load_stage_weights

    marker = tmp_path / "ran"

    class Payload:  # unpickling this would create the marker file
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "trainable.safetensors"
    torch.save({"connector.proj.weight": Payload()}, path)
    with pytest.raises(ConfigError, match="is not a safetensors file"):
        load_stage_weights(tiny_model, path)
    assert not marker.exists()


def test_adamw_is_fused_only_where_every_trained_weight_is_on_a_gpu_unless_the_config_says():
    from mmkit.training.optimizer import build_adamw

    weights = [torch.nn.Parameter(torch.ones(3))]
    assert build_adamw(weights, {"lr": 1e-3, "fused": None}).defaults["fused"] is False
    assert build_adamw(weights, {"lr": 1e-3, "fused": True}).defaults["fused"] is True  # PyTorch's CPU kernel
    if torch.cuda.is_available():
        assert build_adamw([torch.nn.Parameter(torch.ones(3, device="cuda"))], {"lr": 1e-3}).defaults["fused"] is True


def test_bf16_mixed_with_a_fused_adamw_clips_and_trains(tmp_path):
    # The GPU default (trainer=gpu: bf16-mixed, gradient_clip_val 1.0, a fused AdamW) reproduced on
    # CPU: Lightning's mixed-precision plugin refused to clip for a fused optimizer, so every GPU run
    # stopped at its first step until LitVLM clipped bf16 gradients itself.
    cfg = compose(TINY_RUN + ["trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1e-6",
                              "recipe.stages.finetune.optimizer.fused=true", "recipe.stages.finetune.max_steps=2",
                              "recipe.stages.finetune.optimizer.lr=1.0"])
    model = build_model(cfg)
    before = snapshot(model)
    summary, _ = run_stage(cfg, "finetune", model, tmp_path, previous=None)
    assert summary["steps"] == 2
    # lr 1 and gradients clipped to a norm of 1e-6: AdamW's update is scale-free, so the weights
    # move by about lr per step however small the gradient; what clipping must not do is stop them.
    assert changed(before, model)


def test_under_fsdp_gradients_are_clipped_by_the_root_fsdp_module(tiny_model):
    # Lightning's FSDP precision plugin refuses to clip by norm (torch's clip_grad_norm_ would see
    # one rank's shards only), which stopped trainer=fsdp runs at their first step. FSDP's root
    # module clips over all shards. (A one-GPU FSDP run cannot show it: FSDP turns into NO_SHARD
    # at world size 1, and torch 2.11's NO_SHARD with bf16 parameters fails before the clipping.)
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from mmkit.training.module import LitVLM

    clipped = []
    strategy = FSDPStrategy()
    strategy._model = SimpleNamespace(clip_grad_norm_=clipped.append)
    module = LitVLM(tiny_model, {"lr": 1e-3}, {"warmup_ratio": 0.0})
    module._trainer = SimpleNamespace(strategy=strategy, precision_plugin=SimpleNamespace())
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    module.configure_gradient_clipping(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert clipped == [1.0]


def test_activation_checkpointing_keeps_stage1_gradients_flowing_to_the_connector(tmp_path):
    # Stage 1 freezes the embeddings, so the checkpointed layers' inputs need no grad: reentrant
    # checkpointing would drop the connector's gradients and stage 1 would train nothing.
    cfg = compose(TINY_RUN + ["decoder.gradient_checkpointing=true", "recipe.stages.pretrain.max_steps=2",
                              "sample_answers.count=0"])
    model = build_model(cfg)
    lm = model.decoder.model
    assert lm.is_activation_checkpointing if hasattr(lm, "is_activation_checkpointing") else lm.is_gradient_checkpointing
    before = snapshot(model)
    run_stage(cfg, "pretrain", model, tmp_path, previous=None)
    assert {name.split(".")[0] for name in changed(before, model)} == {"connector"}


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="bf16 training with compiled layers is checked on a GPU when there is one"))])
def test_a_compiled_decoder_trains_packed_batches_through_lightning(tmp_path, trainer):
    """decoder.compile=true on the real training path, packed batches: trainer=cpu in fp32, and
    trainer=gpu (bf16-mixed, fused AdamW, clipping) where the attention compiles too."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = compose(TINY_RUN + [f"trainer={trainer}", "decoder.compile=true", "data.batching=pack",
                              "recipe.stages.finetune.max_steps=4", "sample_answers.count=0"])
    model = build_model(cfg)
    before = snapshot(model)
    summary, _ = run_stage(cfg, "finetune", model, tmp_path, previous=None)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert summary["final_loss"] is not None and math.isfinite(summary["final_loss"])
    assert any(name.startswith("decoder.") for name in changed(before, model.cpu()))
