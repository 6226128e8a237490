"""Scaling out: the SLURM configs compose, the launch plan is checked here, and the submitit
launcher path really runs (its local executor, on this machine)."""
from __future__ import annotations

import pytest
from conftest import TINY_RUN, run_cli

LLAVA_15_TWO_NODES = ["cluster=slurm", "experiment=llava_v1_5", "trainer.num_nodes=2", "hydra.launcher.partition=gpu",
                      "recipe.stages.pretrain.micro_batch_size=16", "recipe.stages.finetune.micro_batch_size=8"]


def test_the_launch_plan_of_llava_15_on_two_nodes_with_a_sweep():
    result = run_cli(["-m", "mmkit.cluster", "plan", *LLAVA_15_TWO_NODES,
                      "recipe.stages.finetune.optimizer.lr=2e-5,1e-5"], timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "launch plan: 2 job(s); nothing is submitted" in out
    assert out.count("slurm: 2 node(s) x 8 task(s), 8 GPU(s)/node") == 2 and "partition=gpu" in out
    assert "world size 16, strategy=fsdp, precision=bf16-mixed" in out
    assert "global batch 256 = micro 16 x 16 rank(s) x accumulation 1" in out
    assert "global batch 128 = micro 8 x 16 rank(s) x accumulation 1" in out
    assert "decoder=lmsys/vicuna-7b-v1.5" in out and "lr 1e-05" in out


def test_what_would_fail_on_the_cluster_fails_here_with_one_line():
    # LLaVA-1.5's stage-1 batch (256 = 32 x 8 GPUs) cannot be split over 16 ranks at micro batch 32.
    batch = run_cli(["-m", "mmkit.cluster", "plan", "cluster=slurm", "experiment=llava_v1_5", "trainer.num_nodes=2"],
                    timeout=120)
    assert batch.returncode == 2
    assert "error: recipe.stages.pretrain.global_batch_size=256 is not divisible by" in batch.stderr
    tasks = run_cli(["-m", "mmkit.cluster", "plan", *LLAVA_15_TWO_NODES, "hydra.launcher.tasks_per_node=4"], timeout=120)
    assert tasks.returncode == 2 and "Lightning needs one SLURM task per device" in tasks.stderr
    typo = run_cli(["-m", "mmkit.cluster", "plan", "cluster=slrum"], timeout=120)
    assert typo.returncode == 2 and "cluster=slrum" in typo.stderr


@pytest.mark.slow
def test_a_sweep_runs_through_the_submitit_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "mmkit.train", "-m", "hydra/launcher=submitit_local", "seed=0", "recipe=stage1_only",
                      *[o for o in TINY_RUN if "finetune" not in o], f"hydra.sweep.dir={sweep}",
                      "hydra.launcher.timeout_min=10"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (sweep / "0" / "summary.json").is_file()
