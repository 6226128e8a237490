"""Every rank takes part in every step's gradient reduction, shown first on one model, then with
two processes on CPU (gloo), launched by torchrun as real subprocesses: the whole recipe under
DDP and FSDP with a rank whose micro-batches hold no image and a rank whose first micro-batch was
skipped whole, compared with one process over the same global batches; killed DDP and FSDP runs
resumed to the uninterrupted runs' weights (FSDP killed in each stage).

The data decides what each rank reads: with ``data.shuffle_buffer=0`` rank r reads shards r, r+2,
r+4, ... in order, and with two samples a shard and ``micro_batch_size=2`` each micro-batch is
one shard. Rank 0's shards are text-only; rank 1's first holds only samples that are skipped,
its others hold images.

Why one process matches two: LLaVA averages the loss over the labelled tokens of each micro-batch.
Under DDP each rank's gradient is its micro-batch's, and the all-reduce averages the two. One
process with the same micro-batches and ``accumulate_grad_batches=2`` (global batch 4 = 2 x 2)
reads shards 2k and 2k+1 for step k, as the two ranks do, and Lightning divides each
micro-batch's loss by 2 before adding up the gradients: the same mean of two per-micro-batch
means. (One process with ``micro_batch_size=4`` would average over the tokens of all four
samples instead, which weighs the two halves differently.) A micro-batch skipped whole adds
nothing in both: no backward alone, a zero gradient under DDP.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from conftest import CLI_CWD, compose
from PIL import Image
from safetensors.torch import load_file

from mmkit.data.shards import convert_llava_json
from mmkit.models.build import build_model
from mmkit.training.module import LitVLM
from mmkit.training.stages import configure_trainable

STAGES = ("pretrain", "finetune")
SHARDS = 8  # of two samples: four micro-batches per rank and epoch
RUN = [
    "recipe.stages.pretrain.global_batch_size=4",
    "recipe.stages.pretrain.micro_batch_size=2",
    "recipe.stages.finetune.global_batch_size=4",
    "recipe.stages.finetune.micro_batch_size=2",
    "recipe.stages.finetune.epochs=1",
    # AdamW moves a weight by up to lr whatever its gradient's size, so a last-bit difference in a
    # near-zero gradient (the sums run in another order) moves it by a fraction of lr: 2e-3 gave 9e-6.
    "recipe.stages.pretrain.optimizer.lr=1e-3",
    "data.shuffle_buffer=0",
    "data.num_workers=0",
    "data.batching=group",  # LLaVA-1.5's modality grouping, which makes text-only micro-batches
    "data.group_batches=1",
    "checkpoint.every_n_steps=2",
    "log_sample_keys=true",
    "sample_answers.count=0",
    "evaluation=none",
    "trainer.enable_progress_bar=false",
]
CPU_PROCESSES = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
DDP = ["trainer=ddp", *CPU_PROCESSES, "trainer.strategy={name: ddp, process_group_backend: gloo}"]
FSDP = ["trainer=fsdp", *CPU_PROCESSES, "trainer.strategy.activation_checkpointing=[]"]
TIMEOUT_S = 600


def _conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _records(images: Path) -> list[dict]:
    """Shard by shard (two records each): even shards text-only (rank 0), shard 1 only samples the
    encoder skips (rank 1's first micro-batch), the other odd shards with an image (rank 1)."""
    records: list[dict] = []
    for shard in range(SHARDS):
        for index in range(2):
            n = 2 * shard + index
            if shard % 2 == 0:
                records.append({"id": f"text{n}", "conversations": _conversation(f"What is {n} plus {n}?", f"{2 * n}.")})
            elif shard == 1:
                records.append({"id": f"broken{n}", "image": "img0.png",
                                "conversations": [{"from": "human", "value": "<image>\nNo reply follows."}]})
            else:
                Image.new("RGB", (40, 30), (n * 15, 100, 50)).save(images / f"img{n}.png")
                records.append({"id": f"image{n}", "image": f"img{n}.png",
                                "conversations": _conversation("<image>\nWhat colour dominates?", f"Colour {n}.")})
    Image.new("RGB", (40, 30), (0, 0, 0)).save(images / "img0.png")
    return records


@pytest.fixture(scope="module")
def stage2_model():
    """The default model as stage 2 trains it: connector and decoder, the encoder frozen."""
    model = build_model(compose())
    configure_trainable(model, ["connector", "decoder"], key="recipe.stages.finetune.train")
    return model.train()


def _zero_gradients_everywhere(model: torch.nn.Module, loss: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    loss.backward()
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trained and not [name for name, p in trained.items() if p.grad is None]
    assert not [name for name, p in trained.items() if name.startswith("connector.") and p.grad.any()]


def test_a_text_only_training_batch_reaches_the_connector_through_a_zero_image(stage2_model):
    input_ids = torch.tensor([[1, 5, 6, 7, 8]])
    outputs = stage2_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids)
    _zero_gradients_everywhere(stage2_model, outputs.loss)


def test_a_batch_skipped_whole_gives_a_zero_loss_that_reaches_every_trained_weight(stage2_model):
    from types import SimpleNamespace

    lit = LitVLM(stage2_model, {"lr": 1e-3}, {})
    strategy = SimpleNamespace(reduce_boolean_decision=lambda flag, all: flag)
    batch = {"keys": [], "skipped": [("broken0", "no assistant reply")], "truncated": 0}
    lit._trainer = SimpleNamespace(world_size=1, strategy=strategy)
    assert lit.training_step(batch, 0) is None  # alone, the batch is skipped whole
    lit._trainer = SimpleNamespace(world_size=2, strategy=strategy)
    loss = lit.training_step(batch, 1)
    assert loss.item() == 0
    _zero_gradients_everywhere(stage2_model, loss)
    assert lit.skipped == [("broken0", "no assistant reply")] * 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("multiprocess_data")
    (folder / "images").mkdir()
    (folder / "data.json").write_text(json.dumps(_records(folder / "images")))
    convert_llava_json(folder / "data.json", folder / "images", folder / "shards", samples_per_shard=2, progress=False)
    return folder / "shards"


def _data(shards: Path) -> list[str]:
    return [f"{override}" for stage in STAGES
            for override in (f"~data.{stage}", f"+data.{stage}={{name: shards, path: {shards}}}")]


def _command(run_dir: Path, shards: Path, trainer: list[str], processes: int, extra: Sequence[str] = ()) -> list[str]:
    launch = [sys.executable, "-m", "mmkit.train"]
    if processes > 1:
        # --standalone: a free rendezvous port, so runs of other sessions on this machine do not collide.
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                  "-m", "mmkit.train"]
    return [*launch, *RUN, *_data(shards), *trainer, *extra, f"hydra.run.dir={run_dir}"]


def _train(run_dir: Path, shards: Path, trainer: list[str], processes: int, extra: Sequence[str] = ()) -> Path:
    result = subprocess.run(_command(run_dir, shards, trainer, processes, extra), cwd=CLI_CWD[0], capture_output=True,
                            text=True, timeout=TIMEOUT_S, env=os.environ.copy(), check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return run_dir


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {f"{stage}/{name}": tensor for stage in STAGES
            for name, tensor in load_file(str(run_dir / stage / "trainable.safetensors")).items()}


def _assert_same_weights(run: Path, reference: Path) -> None:
    ours, theirs = _weights(run), _weights(reference)
    assert ours.keys() == theirs.keys()
    differences = {name: (ours[name] - theirs[name]).abs().max().item() for name in ours}
    assert max(differences.values()) <= 1e-5, sorted(differences.items(), key=lambda item: -item[1])[:5]


def _stage(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "stage.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> Path:
    return _train(tmp_path_factory.mktemp("one_process"), shards, ["trainer=cpu"], processes=1)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> Path:
    return _train(tmp_path_factory.mktemp("ddp"), shards, DDP, processes=2)


@pytest.mark.slow
def test_ddp_with_a_text_only_rank_trains_both_stages_as_one_process_does(ddp: Path, one_process: Path):
    for stage in STAGES:
        assert _stage(ddp, stage)["world_size"] == 2 and _stage(one_process, stage)["world_size"] == 1
        assert _stage(ddp, stage)["steps"] == _stage(one_process, stage)["steps"] > 0
        rank0 = (ddp / stage / "samples.rank0.txt").read_text().split()
        rank1 = (ddp / stage / "samples.rank1.txt").read_text().split()
        assert rank0 and all(key.startswith("text") for key in rank0)  # not one image on rank 0
        assert rank1 and all(key.startswith("image") for key in rank1)
    _assert_same_weights(ddp, one_process)


@pytest.mark.slow
def test_under_ddp_a_rank_whose_micro_batch_was_all_skipped_keeps_in_step(ddp: Path, one_process: Path):
    for stage in STAGES:
        summary = _stage(ddp, stage)
        assert summary["skipped_samples"] == 2  # shard 1's
        assert summary["samples"] == _stage(one_process, stage)["samples"]
        skipped = (ddp / stage / "skipped.jsonl").read_text().splitlines()
        assert {json.loads(line)["key"] for line in skipped} == {"broken2", "broken3"}
    _assert_same_weights(ddp, one_process)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> Path:
    return _train(tmp_path_factory.mktemp("fsdp"), shards, FSDP, processes=2)


@pytest.mark.slow
def test_fsdp_with_a_text_only_rank_trains_both_stages_as_one_process_does(fsdp: Path, one_process: Path):
    for stage in STAGES:
        assert _stage(fsdp, stage)["world_size"] == 2
        assert _stage(fsdp, stage)["steps"] == _stage(one_process, stage)["steps"]
        assert _stage(fsdp, stage)["skipped_samples"] == 2
    _assert_same_weights(fsdp, one_process)


def _kill_with_its_workers(launcher: subprocess.Popen) -> None:
    """SIGKILL torchrun and its ranks at once, as a lost node ends them. torchrun starts each rank
    in a session of its own, so killing the launcher's process group alone would leave them running."""
    tasks = Path(f"/proc/{launcher.pid}/task").iterdir()
    ranks = [int(pid) for task in tasks for pid in (task / "children").read_text().split()]
    for pid in [*ranks, launcher.pid]:
        os.killpg(pid, signal.SIGKILL)
    launcher.wait()


def _kill_after_first_checkpoint(run_dir: Path, shards: Path, trainer: list[str], stage: str = "pretrain") -> None:
    launcher = subprocess.Popen(_command(run_dir, shards, trainer, processes=2), cwd=CLI_CWD[0], env=os.environ.copy(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        # The stage's first checkpoint (step 2), complete once its manifest is written (last).
        while not list(run_dir.glob(f"{stage}/checkpoints/step-*/manifest.json")):
            assert launcher.poll() is None, f"the run ended (exit {launcher.returncode}) before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
    finally:
        _kill_with_its_workers(launcher)
    assert not (run_dir / stage / "stage.json").exists(), "the kill came after the stage had finished"


@pytest.mark.slow
def test_a_killed_ddp_run_resumes_to_the_weights_of_the_uninterrupted_one(tmp_path: Path, shards: Path, ddp: Path):
    run_dir = tmp_path / "killed"
    _kill_after_first_checkpoint(run_dir, shards, DDP)
    _train(tmp_path / "resumed", shards, DDP, processes=2, extra=[f"resume={run_dir}"])
    assert _stage(run_dir, "pretrain")["resumed_from"]
    _assert_same_weights(run_dir, ddp)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_a_killed_fsdp_run_resumes_to_the_weights_of_the_uninterrupted_one(tmp_path: Path, shards: Path, fsdp: Path,
                                                                          stage: str):
    run_dir = tmp_path / "killed"
    _kill_after_first_checkpoint(run_dir, shards, FSDP, stage)
    _train(tmp_path / "resumed", shards, FSDP, processes=2, extra=[f"resume={run_dir}"])
    assert _stage(run_dir, stage)["resumed_from"]
    _assert_same_weights(run_dir, fsdp)
