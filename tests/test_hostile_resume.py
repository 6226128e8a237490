"""Resumption when things went wrong beyond a clean kill: a newest checkpoint cut short (its
weights or its ``state.pt``) or without its manifest is skipped for the one before it, and the run
still ends with the weights of an uninterrupted one; ``resume=auto`` continues an interrupted re-run
in a folder whose first run finished, and never a run outside the folders it is documented to look in."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_RUN, run_cli
from safetensors.torch import load_file

from mmkit.training.resume import (
    MANIFEST_FILE,
    SafeCheckpointIO,
    checkpoint_damage,
    is_unfinished,
    latest_checkpoint,
    resolve_run_dir,
    save_run_config,
)

# Two stages of 6 optimizer steps; stage 2 trains the connector and the whole LLM.
RUN = [o for o in TINY_RUN if not o.startswith("evaluation.")] + [
    "evaluation=none",
    "checkpoint.every_n_steps=2",
    "checkpoint.keep_last=3",  # step 2, 4 and 6 of each stage
    "checkpoint.keep_after_stage=true",  # so the uninterrupted run's checkpoints can stand in for a killed run's
]
TRAINED = "trainable.safetensors"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli(["-m", "mmkit.train", *RUN, f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def killed_in_finetune_after(uninterrupted: Path, step: int, run_dir: Path) -> Path:
    """The folder a run killed in stage 2 just after its checkpoint at ``step`` leaves. Training is
    deterministic, so the uninterrupted run's checkpoints are the ones the killed run wrote."""
    shutil.copytree(uninterrupted, run_dir)
    for name in ("summary.json", "finetune/stage.json", f"finetune/{TRAINED}"):
        (run_dir / name).unlink()
    for checkpoint in (run_dir / "finetune" / "checkpoints").glob("step-*"):
        if int(checkpoint.name.removeprefix("step-").removesuffix(".ckpt")) > step:
            shutil.rmtree(checkpoint)
    return run_dir


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def assert_same_weights(run_dir: Path, uninterrupted: Path, stage: str) -> None:
    want, got = load_file(str(uninterrupted / stage / TRAINED)), load_file(str(run_dir / stage / TRAINED))
    assert want.keys() == got.keys()
    assert [name for name in want if not torch.equal(got[name], want[name])] == [], stage


@pytest.mark.slow
@pytest.mark.parametrize("damaged_file", ["weights.safetensors", "state.pt"])
def test_a_truncated_newest_checkpoint_is_skipped_and_the_run_ends_as_an_uninterrupted_one(
    uninterrupted, tmp_path, damaged_file
):
    run_dir = killed_in_finetune_after(uninterrupted, 4, tmp_path / "run")
    newest = run_dir / "finetune" / "checkpoints" / "step-0000004.ckpt"
    size = (newest / damaged_file).stat().st_size
    truncate(newest / damaged_file)

    result = run_cli(["-m", "mmkit.train", *RUN, f"hydra.run.dir={run_dir}", "resume=auto"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    damage = (f"resume: stage finetune: checkpoint step-0000004.ckpt is damaged ({damaged_file} has {size // 2:,} "
              f"bytes, its manifest says {size:,}); resuming from step-0000002.ckpt")
    assert damage in result.stdout.splitlines(), result.stdout[-3000:]
    stage = json.loads((run_dir / "finetune" / "stage.json").read_text())
    assert stage["resumed_from"] == "finetune/checkpoints/step-0000002.ckpt" and stage["steps"] == 6
    assert_same_weights(run_dir, uninterrupted, "finetune")
    assert checkpoint_damage(newest) is None  # the resumed run wrote step 4 again, whole


def written_since(checkpoints: Path, since_ns: int) -> bool:
    for manifest in checkpoints.glob(f"step-*/{MANIFEST_FILE}"):
        try:
            if manifest.stat().st_mtime_ns > since_ns:
                return True
        except FileNotFoundError:  # a copied one, removed meanwhile by the re-run's fresh start
            pass
    return False


@pytest.mark.slow
def test_resume_auto_continues_an_interrupted_rerun_in_the_folder_of_a_finished_run(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)  # a finished run: summary.json and every stage.json
    started = time.time_ns()
    rerun = subprocess.Popen(
        [sys.executable, "-m", "mmkit.train", *RUN, f"hydra.run.dir={run_dir}", "resume=auto"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy(),
    )
    deadline = time.monotonic() + 300
    # Killed once it wrote a checkpoint of stage 2 (the copied ones are older than it).
    while not written_since(run_dir / "finetune" / "checkpoints", started):
        assert rerun.poll() is None, f"the re-run ended before it could be killed:\n{rerun.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    rerun.send_signal(signal.SIGKILL)
    output = rerun.communicate()[0]
    assert "resume=auto: no interrupted run with this config; starting a new one" in output
    assert not (run_dir / "summary.json").exists() and not (run_dir / "finetune" / "stage.json").exists()

    result = run_cli(["-m", "mmkit.train", *RUN, f"hydra.run.dir={run_dir}", "resume=auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resume: continuing the run in {run_dir}" in result.stdout.splitlines()
    assert "stage pretrain finished earlier" in result.stdout
    stage = json.loads((run_dir / "finetune" / "stage.json").read_text())
    assert stage["resumed_from"].startswith("finetune/checkpoints/step-")
    assert json.loads((run_dir / "summary.json").read_text())["resumed"] is True
    for name in ("pretrain", "finetune"):
        assert_same_weights(run_dir, uninterrupted, name)


def save(io: SafeCheckpointIO, stage_dir: Path, step: int) -> Path:
    path = stage_dir / "checkpoints" / f"step-{step:07d}.ckpt"
    io.save_checkpoint({"state_dict": {"model.w": torch.full((4,), float(step))}, "global_step": step}, path)
    return path


def test_a_checkpoint_without_its_manifest_is_skipped_and_with_none_intact_the_stage_starts_over(tmp_path, capsys):
    stage_dir, io = tmp_path / "finetune", SafeCheckpointIO()
    older, newest = save(io, stage_dir, 2), save(io, stage_dir, 4)
    assert latest_checkpoint(stage_dir) == newest and capsys.readouterr().out == ""

    (newest / MANIFEST_FILE).unlink()  # as a save cut off before its last file leaves it
    assert latest_checkpoint(stage_dir) == older
    no_manifest = (f"checkpoint step-0000004.ckpt is damaged (it has no {MANIFEST_FILE}: its save did not finish, "
                   "or an mmkit older than manifests wrote it)")
    assert capsys.readouterr().out.splitlines() == [f"resume: stage finetune: {no_manifest}; resuming from step-0000002.ckpt"]
    assert io.load_checkpoint(older)["global_step"] == 2

    state = (older / "state.pt").read_bytes()
    (older / "state.pt").write_bytes(state[:-1] + bytes([state[-1] ^ 1]))  # same size, one bit flipped
    assert latest_checkpoint(stage_dir) is None
    flipped = "checkpoint step-0000002.ckpt is damaged (state.pt does not match the sha256 in its manifest)"
    restart = "no intact checkpoint is left, so the stage starts again from its beginning"
    assert capsys.readouterr().out.splitlines() == [f"resume: stage finetune: {no_manifest}; {flipped}; {restart}"]


def interrupted_run(folder: Path, config: dict) -> Path:
    """A run folder as a killed run leaves it: its config and one whole checkpoint."""
    save(SafeCheckpointIO(), folder / "pretrain", 2)
    save_run_config(folder, config)
    return folder


def test_an_old_summary_does_not_hide_the_interrupted_rerun_written_after_it(tmp_path):
    config = {"seed": 0, "resume": "auto"}
    run_dir = tmp_path / "runs" / "a"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text("{}")
    os.utime(run_dir / "summary.json", (1_000, 1_000))  # the first run finished long ago
    assert not is_unfinished(run_dir)
    interrupted_run(run_dir, config)  # then a re-run in the same folder was killed
    assert is_unfinished(run_dir)
    assert resolve_run_dir("auto", run_dir, config) == run_dir
    assert resolve_run_dir(str(run_dir), tmp_path / "new", config) == run_dir

    (run_dir / "summary.json").write_text("{}")  # ... and a resumption finished it
    assert not is_unfinished(run_dir)


def test_resume_auto_looks_beside_the_run_folder_only(tmp_path):
    config = {"seed": 0, "resume": "auto"}
    fresh = tmp_path / "runs" / "b"
    fresh.mkdir(parents=True)
    # Same config and interrupted, but not beside runs/b: the old search (parent/../*/*) took it.
    elsewhere = interrupted_run(tmp_path / "other" / "a", config)
    assert resolve_run_dir("auto", fresh, config) == fresh
    assert is_unfinished(elsewhere)

    beside = interrupted_run(tmp_path / "runs" / "a", config)
    assert resolve_run_dir("auto", fresh, config) == beside

    # Hydra's outputs/DATE/TIME: yesterday's interrupted run is found, an undated folder is not.
    today = tmp_path / "outputs" / "2026-11-28" / "09-00-00"
    today.mkdir(parents=True)
    interrupted_run(tmp_path / "outputs" / "old-runs" / "x", config)
    assert resolve_run_dir("auto", today, config) == today
    yesterday = interrupted_run(tmp_path / "outputs" / "2026-11-27" / "23-50-00", config)
    assert resolve_run_dir("auto", today, config) == yesterday
