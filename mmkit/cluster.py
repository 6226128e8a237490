"""Check a cluster launch without a cluster: compose every job of a sweep and print its plan.

    python -m mmkit.cluster plan cluster=slurm experiment=llava_v1_5 trainer.num_nodes=2 \\
        hydra.launcher.partition=gpu 'recipe.stages.finetune.optimizer.lr=2e-5,1e-5'

Takes the overrides ``python -m mmkit.train -m`` would get. For each job of the sweep it composes
the config exactly as the launcher would and prints the SLURM request (nodes, tasks and GPUs per
node, CPUs, memory, time, partition), the trainer's strategy and world size, and each stage's
batch arithmetic (micro batch x ranks x gradient accumulation = global batch). Inconsistencies that
would only fail on the cluster (tasks per node != trainer.devices, a global batch the ranks cannot
split) are errors here. Nothing is submitted.
"""
from __future__ import annotations

import argparse
import itertools
import sys

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from mmkit.core.config import compose
from mmkit.core.errors import ConfigError, MmkitError

SLURM_LAUNCHER = "SlurmLauncher"


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The jobs of a Hydra sweep (comma-separated values, ranges, choices) as override lists."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    axes = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            axes.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            axes.append([override.input_line])
    return [list(job) for job in itertools.product(*axes)]


def compose_job(overrides: list[str]) -> DictConfig:
    return compose(overrides, return_hydra_config=True)


def job_plan(cfg: DictConfig) -> list[str]:
    """The lines that describe one job; raises ConfigError on what would fail on the cluster."""
    # Deferred: the recipe imports Lightning, which a refused plan never needs.
    from mmkit.training.recipe import accumulation_steps

    trainer = cfg.trainer
    launcher = cfg.hydra.launcher
    devices = trainer.get("devices", 1)
    nodes = int(trainer.get("num_nodes", 1))
    lines = []
    if str(launcher.get("_target_", "")).endswith(SLURM_LAUNCHER):
        if devices == "auto":
            raise ConfigError("trainer.devices=auto: on SLURM give the GPUs per node as a number (one task each)")
        if int(launcher.tasks_per_node) != int(devices) or int(launcher.nodes) != nodes:
            raise ConfigError(
                f"hydra.launcher: {launcher.nodes} node(s) x {launcher.tasks_per_node} task(s) but trainer.num_nodes="
                f"{nodes}, trainer.devices={devices}: Lightning needs one SLURM task per device"
            )
        lines.append(
            f"slurm: {launcher.nodes} node(s) x {launcher.tasks_per_node} task(s), {launcher.gpus_per_node} GPU(s)/node, "
            f"{launcher.cpus_per_task} CPU(s)/task, {launcher.mem_gb} GB/node, {launcher.timeout_min} min, "
            f"partition={launcher.partition}, account={launcher.account}, qos={launcher.qos}, "
            f"constraint={launcher.constraint}"
        )
        if launcher.get("setup"):
            lines.append(f"setup: {'; '.join(launcher.setup)}")
    else:
        lines.append(f"launcher: {str(launcher.get('_target_', 'basic')).rsplit('.', 1)[-1]} (this machine)")
    world_size = nodes * (int(devices) if str(devices).isdigit() else 1)
    strategy = trainer.get("strategy")
    strategy_name = strategy.get("name") if isinstance(strategy, DictConfig) else strategy
    lines.append(f"trainer: {trainer.get('accelerator')} x {devices} device(s) x {nodes} node(s) = world size "
                 f"{world_size}, strategy={strategy_name}, precision={trainer.get('precision')}")
    lines.append(f"model: encoder={cfg.encoder.get('path') or cfg.encoder.name} layer={cfg.encoder.get('layer')}, "
                 f"connector={cfg.connector.name}, decoder={cfg.decoder.get('path') or cfg.decoder.name}")
    for name, stage in cfg.recipe.stages.items():
        key = f"recipe.stages.{name}"
        accumulation = accumulation_steps(stage, key, world_size)
        lines.append(f"stage {name}: trains {', '.join(stage.train)}; {stage.epochs} epoch(s), lr {stage.optimizer.lr}; "
                     f"global batch {stage.global_batch_size} = micro {stage.micro_batch_size} x {world_size} rank(s) "
                     f"x accumulation {accumulation}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkit.cluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="print the launch plan of python -m mmkit.train -m OVERRIDES")
    plan.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        jobs = expand_sweep(args.overrides)
        print(f"launch plan: {len(jobs)} job(s); nothing is submitted")
        for index, overrides in enumerate(jobs):
            cfg = compose_job(overrides)
            OmegaConf.resolve(cfg.trainer)
            print(f"\njob {index}: {' '.join(overrides) or '(defaults)'}")
            for line in job_plan(cfg):
                print(f"  {line}")
    except MmkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # Hydra's own composition errors: one line, naming the override
        print(f"error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    print(f"\nto submit: python -m mmkit.train -m {' '.join(args.overrides)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
