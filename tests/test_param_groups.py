"""AdamW's parameter groups as LLaVA's trainer makes them: the connector at its own learning rate
(``mm_projector_lr``), no weight decay on biases and norm weights, each group scaled by the
schedule from its own peak; and QLoRA's 4-bit base, refused in one line where it cannot run."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import compose

from mmkit.core.errors import ConfigError
from mmkit.core.schema import check_ranges
from mmkit.models.build import build_model
from mmkit.models.decoders.hf_causal_lm import quantize_4bit_options
from mmkit.training.module import LitVLM
from mmkit.training.optimizer import parameter_groups, warmup_cosine
from mmkit.training.stages import configure_trainable

OPTIMIZER = {"lr": 2e-5, "connector_lr": 2e-4, "weight_decay": 0.1, "fused": False}
QLORA_RUNS_HERE = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def model_training(parts: list[str], lora: bool):
    """A fresh tiny model (the default config's) with ``parts`` trainable, the decoder through LoRA if asked."""
    overrides = ["decoder.lora.enabled=true", "decoder.lora.r=4"] if lora else []
    model = build_model(compose(overrides), weights="shapes")
    configure_trainable(model, parts, "recipe.stages.test.train")
    return model


def no_decay_by_name(name: str) -> bool:
    """transformers' Trainer's name rule (get_decay_parameter_names): biases and norm layers' weights."""
    module = name.rsplit(".", 2)[-2].lower()
    return name.endswith(".bias") or "norm" in module


@pytest.mark.parametrize("parts,lora", [(["connector", "decoder"], True), (["connector", "decoder"], False),
                                        (["encoder", "connector"], False)],
                         ids=["connector+lora", "connector+decoder", "encoder+connector"])
def test_groups_hold_every_trainable_weight_once_at_its_lr_and_decay(parts, lora):
    model = model_training(parts, lora)
    groups = parameter_groups(model, OPTIMIZER)
    names = {id(p): name for name, p in model.named_parameters()}
    placed = [names[id(p)] for group in groups for p in group["params"]]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert len(placed) == len(set(placed)), "a weight is in two groups"
    assert set(placed) == trainable, "a frozen weight is optimized, or a trainable one is not"
    for group in groups:
        group_names = [names[id(p)] for p in group["params"]]
        part, decay = group["name"].split("/")
        assert all(n.startswith("connector.") == (part == "connector") for n in group_names), group["name"]
        assert group["lr"] == (OPTIMIZER["connector_lr"] if part == "connector" else OPTIMIZER["lr"])
        assert all(no_decay_by_name(n) == (decay == "no_decay") for n in group_names), group["name"]
        assert group["weight_decay"] == (OPTIMIZER["weight_decay"] if decay == "decay" else 0.0)
    # The connector's biases, and under full training the decoder's RMSNorm and the encoder's
    # LayerNorm weights, are there to be left undecayed; LoRA's adapters have neither.
    expected = {"connector/decay", "connector/no_decay", "other/decay"} | ({"other/no_decay"} if not lora else set())
    assert {group["name"] for group in groups} == expected
    if lora:
        assert all("lora_" in names[id(p)] for group in groups if group["name"].startswith("other") for p in group["params"])


def test_connector_lr_null_is_the_stage_lr_and_is_the_default():
    cfg = compose()
    assert all(stage.optimizer.connector_lr is None for stage in cfg.recipe.stages.values())
    model = model_training(["connector", "decoder"], lora=True)
    groups = parameter_groups(model, {**OPTIMIZER, "connector_lr": None})
    assert {group["lr"] for group in groups} == {OPTIMIZER["lr"]}


def test_a_connector_lr_out_of_range_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"^recipe.stages.finetune.optimizer.connector_lr=0.0: must be positive"):
        check_ranges(compose(["recipe.stages.finetune.optimizer.connector_lr=0.0"]))
    check_ranges(compose(["recipe.stages.finetune.optimizer.connector_lr=2e-4"]))


def test_each_group_follows_its_own_peak_through_the_warmup_and_cosine_schedule():
    model = model_training(["connector", "decoder"], lora=True)
    schedule = {"warmup_ratio": 0.25, "min_lr_ratio": 0.1}
    total, warmup = 8, 2  # warm-up: ceil(0.25 x 8) steps
    configured = LitVLM(model, OPTIMIZER, schedule, total_steps=total).configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]

    # One real AdamW step with zero gradients moves a weight by its decoupled decay alone:
    # w <- w * (1 - lr x weight_decay), with each group's lr and weight_decay at this step.
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in trainable]
    for parameter in trainable:
        parameter.grad = torch.zeros_like(parameter)
    lrs = [group["lr"] for group in optimizer.param_groups]
    optimizer.step()
    index = 0
    for group, lr in zip(optimizer.param_groups, lrs):
        for parameter in group["params"]:
            torch.testing.assert_close(parameter.detach(), before[index] * (1 - lr * group["weight_decay"]))
            index += 1
    assert any(group["weight_decay"] > 0 for group in optimizer.param_groups)

    for step in range(total + 2):
        factor = warmup_cosine(step, warmup, total, schedule["min_lr_ratio"])
        for group in optimizer.param_groups:
            expected = group["initial_lr"] * factor
            assert group["lr"] == pytest.approx(expected, rel=1e-12), (step, group["name"])
        if step:
            optimizer.step()  # the scheduler expects its optimizer to have stepped first
        scheduler.step()
    connector = next(g for g in optimizer.param_groups if g["name"] == "connector/decay")
    other = next(g for g in optimizer.param_groups if g["name"] == "other/decay")
    assert (connector["initial_lr"], other["initial_lr"]) == (OPTIMIZER["connector_lr"], OPTIMIZER["lr"])
    assert connector["lr"] == pytest.approx(OPTIMIZER["connector_lr"] * schedule["min_lr_ratio"])


@pytest.mark.skipif(QLORA_RUNS_HERE, reason="a CUDA GPU and bitsandbytes are here: the 4-bit base loads")
def test_qlora_without_a_gpu_or_bitsandbytes_is_refused_in_one_line_naming_the_key():
    cfg = compose(["decoder.lora.enabled=true", "decoder.lora.quantize_4bit=true"])
    with pytest.raises(ConfigError) as refused:
        build_model(cfg)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("decoder.lora.quantize_4bit=true: a 4-bit (QLoRA) base needs a CUDA GPU and "
                              "bitsandbytes (pip install bitsandbytes), but ")


def test_qlora_is_refused_without_lora_or_with_a_gguf_file():
    with pytest.raises(ConfigError, match=r"^decoder.lora.quantize_4bit=true: .*decoder.lora.enabled=true$"):
        quantize_4bit_options({"enabled": False, "quantize_4bit": True})
    with pytest.raises(ConfigError, match=r"^decoder.lora.quantize_4bit=true: not with decoder.gguf_file=m.gguf"):
        quantize_4bit_options({"enabled": True, "quantize_4bit": True}, gguf_file="m.gguf")
    assert quantize_4bit_options({"enabled": True, "quantize_4bit": False}) == {}


@pytest.mark.skipif(not QLORA_RUNS_HERE, reason="QLoRA's 4-bit base needs a CUDA GPU and bitsandbytes")
def test_qlora_loads_a_4bit_base_and_trains_only_the_adapters_and_connector():
    cfg = compose(["decoder.lora.enabled=true", "decoder.lora.r=4", "decoder.lora.quantize_4bit=true"])
    model = build_model(cfg).cuda()
    assert any(type(m).__name__ == "Linear4bit" for m in model.decoder.modules())
    configure_trainable(model, ["connector", "decoder"], "recipe.stages.finetune.train")
    groups = parameter_groups(model, OPTIMIZER)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("connector.") or "lora_" in n for n in trained)
    assert sum(len(group["params"]) for group in groups) == len(trained)
    ids = torch.randint(0, 100, (1, 8), device="cuda")
    model.decoder.model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
