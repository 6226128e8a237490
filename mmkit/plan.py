"""Plan a run on paper: parameters, per-GPU peak memory and time of every stage, before renting GPUs.

    python -m mmkit.plan experiment=llava_v1_5 trainer.devices=8 hardware=a100_80g
    python -m mmkit.plan experiment=llava_v1_5 decoder=vicuna_13b trainer=fsdp trainer.devices=8 hardware=a100_40g
    python -m mmkit.plan experiment=llava_v1_5 trainer=ddp trainer.devices=8 decoder.lora.enabled=true

Takes every override ``python -m mmkit.train`` takes, plus ``hardware=`` (conf/hardware) and
``plan.*`` (conf/plan.yaml). Nothing is downloaded and no weights are made: the models are built
from the HF configs shipped in conf/hf_config, on the meta device and on fake tensors
(mmkit/planning). One table on stdout, and plan.json in the run folder beside .hydra/config.yaml.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mmkit.cli import hydra_command


def plan(cfg: DictConfig) -> dict[str, Any]:
    # Deferred: planning imports torch, transformers and Lightning; a bad command line is answered
    # before they load.
    from mmkit.planning.run_plan import format_table, plan_run

    result = plan_run(cfg)
    out = Path(HydraConfig.get().runtime.output_dir) / "plan.json"
    out.write_text(json.dumps(result, indent=1))
    assumed = _assumed_hardware(cfg)
    if assumed:
        print(assumed)
    print(format_table(result))
    print(f"written: {out}")
    return result


def _assumed_hardware(cfg: DictConfig) -> str | None:
    """The line that says which GPU the plan is for when the command line did not name one (a
    plan is for GPUs even when the run's own trainer is the CPU default)."""
    named = any(override.split("=", 1)[0].lstrip("+~") == "hardware" for override in HydraConfig.get().overrides.task)
    if named:
        return None
    choice = HydraConfig.get().runtime.choices.get("hardware")
    on_cpu = " (this run's trainer is on the CPU; the plan is for GPUs)" if cfg.trainer.get("accelerator") == "cpu" else ""
    return (f"hardware: none given, so planned for hardware={choice} ({cfg.hardware.name}), plan.yaml's default"
            f"{on_cpu}; choose with hardware=a100_40g|a100_80g|h100_80g|h200_141g")


main = hydra_command("plan", plan)

if __name__ == "__main__":
    main()
