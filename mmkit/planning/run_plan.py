"""A run planned on paper: the model built without weights, each stage's step traced on fake
tensors for its per-GPU peak memory, and its time from FLOPs and an assumed MFU; then the table
``python -m mmkit.plan`` prints."""
from __future__ import annotations

import sys
from typing import Any

from omegaconf import DictConfig

from mmkit.core.errors import ConfigError
from mmkit.core.registry import load_components
from mmkit.models.build import build_model
from mmkit.models.parameters import parameter_count
from mmkit.planning.memory import predict_memory, step_spec, strategy_of
from mmkit.planning.meta import check_configs_here
from mmkit.planning.timing import stage_samples, stage_time
from mmkit.training.recipe import check_recipe
from mmkit.training.stages import configure_trainable

GiB = 2**30


def plan_run(cfg: DictConfig) -> dict[str, Any]:
    """Parameters, per-GPU peak memory of every stage, and its time where the data size is known."""
    load_components()
    check_recipe(cfg)
    hardware = cfg.get("hardware")
    if not hardware:
        raise ConfigError("hardware: choose the accelerator to plan for (hardware=a100_40g, a100_80g, h100_80g, h200_141g)")
    strategy = strategy_of(cfg.trainer, int(hardware.gpus_per_node))
    check_configs_here(cfg)
    model = build_model(cfg, weights="none")
    result: dict[str, Any] = {
        "hardware": dict(hardware),
        "strategy": {"kind": strategy.kind, "gpus": strategy.world_size, "cpu_offload": strategy.cpu_offload,
                     "precision": str(cfg.trainer.precision)},
        "parameters": {part: parameter_count(getattr(model, part)) for part in ("encoder", "connector", "decoder")},
        "image_tokens": model.num_image_tokens,
        "stages": {},
    }
    result["parameters"]["total"] = parameter_count(model)
    budget = float(hardware.memory_gib) * (1 - float(cfg.plan.headroom))
    for stage_key, stage in cfg.recipe.stages.items():
        print(f"plan: tracing a {stage_key} step on fake tensors ...", file=sys.stderr, flush=True)
        configure_trainable(model, list(stage.train), f"recipe.stages.{stage_key}.train")
        spec = step_spec(cfg, stage, cfg.plan.sequence_length)
        memory = predict_memory(lambda: build_model(cfg, weights="shapes"), stage, stage_key, spec, strategy)
        row: dict[str, Any] = {
            "trainable": parameter_count(model, trainable=True),
            "micro_batch": spec.micro_batch,
            "sequence_length": spec.sequence_length,
            "activation_checkpointing": spec.activation_checkpointing,
            "memory_gib": memory.as_dict(),
            "fits": memory.peak / GiB <= budget,
            "memory_budget_gib": round(budget, 2),
            "largest_micro_batch": _largest_micro_batch(memory, spec.micro_batch, budget),
        }
        counted = stage_samples(cfg, stage, stage_key)
        if counted is not None:
            samples, size = counted
            mfu = float(cfg.plan.mfu.get(stage_key) or cfg.plan.default_mfu)
            timing = stage_time(model, samples, size, strategy.world_size, float(hardware.peak_tflops), mfu)
            row["time"] = {"samples": timing.samples, "tflop_per_sample": round(timing.flops_per_sample / 1e12, 3),
                           "total_flop": timing.flops, "mfu": timing.mfu, "hours": round(timing.hours, 2)}
        result["stages"][stage_key] = row
    return result


def _largest_micro_batch(memory: Any, micro_batch: int, budget_gib: float) -> int:
    """The micro-batch that would fill the budget, taking the activations as linear in it (an
    estimate: the fixed part of the step's temporaries is counted per sample too, so it errs low)."""
    fixed = memory.peak - memory.activations
    per_sample = memory.activations / micro_batch
    return max(0, int((budget_gib * GiB - fixed) // per_sample)) if per_sample else micro_batch


def format_table(result: dict[str, Any]) -> str:
    hardware, strategy, parameters = result["hardware"], result["strategy"], result["parameters"]
    offload = " + CPU offload" if strategy["cpu_offload"] else ""
    lines = [
        f"model: encoder {_count(parameters['encoder'])}, connector {_count(parameters['connector'])}, "
        f"decoder {_count(parameters['decoder'])}, total {_count(parameters['total'])}; "
        f"{result['image_tokens']} image tokens per image",
        f"on: {strategy['gpus']} x {hardware['name']} ({hardware['memory_gib']} GiB, {hardware['peak_tflops']} "
        f"TFLOP/s bf16), {strategy['kind']}{offload}, {strategy['precision']}",
        "",
        f"{'stage':<10}{'trainable':>10}{'batch x len':>13}{'ckpt':>6}{'weights':>9}{'grads':>8}{'optim':>8}"
        f"{'activ':>8}{'peak GiB':>10}{'fits':>6}{'max batch':>10}{'samples':>9}{'TFLOP/smp':>10}{'MFU':>7}{'hours':>8}",
    ]
    for name, row in result["stages"].items():
        memory, timing = row["memory_gib"], row.get("time")
        lines.append(
            f"{name:<10}{_count(row['trainable']):>10}{row['micro_batch']:>6} x {row['sequence_length']:<5}"
            f"{'yes' if row['activation_checkpointing'] else 'no':>5}{memory['weights']:>9.2f}{memory['gradients']:>8.2f}"
            f"{memory['optimizer']:>8.2f}{memory['activations']:>8.2f}{memory['peak']:>10.2f}"
            f"{'yes' if row['fits'] else 'NO':>6}{row['largest_micro_batch']:>10}"
            + (f"{timing['samples']:>9}{timing['tflop_per_sample']:>10.2f}{timing['mfu']:>7.1%}{timing['hours']:>8.2f}"
               if timing else f"{'(data.size.' + name + ' not set)':>34}")
        )
        if memory["host_per_rank"]:
            lines.append(f"{'':<10}CPU offload: {memory['host_per_rank']:.2f} GiB of host memory per GPU")
    budget = next(iter(result["stages"].values()))["memory_budget_gib"] if result["stages"] else 0
    lines += ["", f"fits: the peak is at most {budget} GiB, the card less plan.headroom. The peak is the worst case: "
                  "every row of the micro-batch at its full length.",
              "max batch: the largest micro-batch of such rows that fits (activations taken as linear in it).",
              "activ: activations and the step's temporaries at the peak; hours: samples x FLOPs per sample / "
              "(GPUs x peak x MFU)."]
    return "\n".join(lines)


def _count(number: int) -> str:
    if number >= 1e9:
        return f"{number / 1e9:.2f}B"
    return f"{number / 1e6:.1f}M" if number >= 1e6 else f"{number / 1e3:.1f}K"
