"""Train a vision-language model with a recipe of stages.

    python -m mmkit.train                                   # the embedded default, on CPU
    python -m mmkit.train connector=linear encoder.layer=-1
    python -m mmkit.train recipe=no_stage1                  # ablation: skip feature alignment
    python -m mmkit.train -m connector=linear,mlp2x_gelu encoder.layer=-1,-2
    python -m mmkit.train experiment=llava_v1_5 trainer=fsdp
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mmkit.cli import hydra_command
from mmkit.core.errors import ConfigError
from mmkit.core.provenance import git_state, library_versions


def _check_launch(cfg: DictConfig) -> None:
    trainer = cfg.trainer
    multi_process = trainer.get("num_nodes", 1) > 1 or trainer.get("devices", 1) not in (1, "1")
    # A submitit launcher starts every rank as its own SLURM task, so nothing is re-launched.
    launched_per_rank = "submitit" in str(HydraConfig.get().launcher.get("_target_", ""))
    if HydraConfig.get().mode == RunMode.MULTIRUN and multi_process and not launched_per_rank:
        raise ConfigError(
            "trainer.devices/num_nodes > 1 with a Hydra multirun (-m) in one process: Lightning re-launches "
            "the script per rank and the sweep folders collide; sweep through a launcher "
            "(hydra/launcher=submitit_slurm) or run each job with torchrun"
        )


def train(cfg: DictConfig) -> dict:
    """Run the configured recipe in Hydra's output folder and write ``summary.json`` there."""
    # Deferred: these import Lightning (seconds); a refused command line is answered before.
    from mmkit.evaluation.run import check_evaluation, evaluate_model
    from mmkit.training.recipe import run_recipe
    from mmkit.training.resume import is_unfinished, prepare_run_dir, resolve_run_dir

    _check_launch(cfg)
    check_evaluation(cfg)
    own_dir = Path(HydraConfig.get().runtime.output_dir)
    config = OmegaConf.to_container(cfg, resolve=False)
    run_dir = resolve_run_dir(cfg.resume, own_dir, config)
    resuming = cfg.resume is not None and is_unfinished(run_dir)
    if resuming:
        elsewhere = f" (not this command's own folder {own_dir})" if run_dir != own_dir else ""
        print(f"resume: continuing the run in {run_dir}{elsewhere}", flush=True)
    elif cfg.resume is not None:
        print(f"resume={cfg.resume}: no interrupted run with this config; starting a new one in {run_dir}", flush=True)
    if _is_global_zero() and prepare_run_dir(run_dir, config, resuming):
        print(f"{run_dir} held an earlier run: its summary.json, stage.json files and checkpoints are removed, "
              "so that a later resume= cannot take them for this run's", flush=True)
    started = time.perf_counter()
    stages, model = run_recipe(cfg, run_dir, resume=resuming)
    evaluation = evaluate_model(cfg, model, run_dir / "eval") if _is_global_zero() else {}
    summary = {
        "stages": stages,
        "evaluation": evaluation,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "seed": cfg.seed,
        "git": git_state(Path(__file__).resolve().parent),
        "versions": library_versions(),
        "overrides": list(HydraConfig.get().overrides.task),
        "resumed": resuming,
    }
    if _is_global_zero():
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        _print_summary(run_dir, summary)
    return summary


def _is_global_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _print_summary(run_dir: Path, summary: dict) -> None:
    print(f"\nrun folder: {run_dir}")
    print(f"{'stage':<10} {'steps':>6} {'samples':>8} {'final loss':>11} {'trainable':>12} {'skipped':>8} {'time s':>8}")
    for name, stage in summary["stages"].items():
        loss = f"{stage['final_loss']:.4f}" if stage["final_loss"] is not None else "-"
        print(
            f"{name:<10} {stage['steps']:>6} {stage['samples']:>8} {loss:>11} "
            f"{stage['trainable_params']:>12,} {stage['skipped_samples']:>8} {stage['wall_time_s']:>8.1f}"
        )


main = hydra_command("config", train)


if __name__ == "__main__":
    main()
