"""Crash-safe resumption: a real training process killed with SIGKILL mid-epoch, twice (once in the
connector-only stage 1, once in a LoRA stage 2), resumed each time, ends with the weights and the
sample order of an uninterrupted run with the same seed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_RUN, run_cli
from safetensors.torch import load_file

RUN = [o for o in TINY_RUN if not o.startswith("evaluation.")] + [
    "evaluation=none",
    "data.pretrain.count=320",  # 20 steps of 16: room to land a kill mid-epoch
    "data.finetune.count=64",  # 192 conversations: 24 micro-batches of 8, 12 steps of 16
    "decoder.lora.enabled=true",
    "decoder.lora.r=4",  # LoRA dropout 0.05: the resumed run must restore the RNG to match
    "checkpoint.every_n_steps=2",
    "checkpoint.keep_last=2",
    "log_sample_keys=true",
]
SAMPLES_PER_STEP = 16


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mmkit.train", *RUN, f"hydra.run.dir={run_dir}", *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy(),
    )


def kill_after_first_checkpoint(process: subprocess.Popen, stage_dir: Path) -> None:
    deadline = time.monotonic() + 300
    while not any((stage_dir / "checkpoints").glob("step-*.ckpt")):
        assert process.poll() is None, f"the run ended before it could be killed:\n{process.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def resumed_step(stage_dir: Path) -> int:
    resumed_from = json.loads((stage_dir / "stage.json").read_text())["resumed_from"]
    return int(resumed_from.rsplit("step-", 1)[1].split(".")[0])


@pytest.mark.slow
def test_sigkilled_runs_resume_mid_epoch_to_the_uninterrupted_weights(tmp_path):
    baseline = tmp_path / "baseline"
    result = run_cli(["-m", "mmkit.train", *RUN, f"hydra.run.dir={baseline}"])
    assert result.returncode == 0, result.stderr[-3000:]

    run = tmp_path / "run"
    # Kill 1: in stage 1, where only the connector trains.
    kill_after_first_checkpoint(start(run), run / "pretrain")
    logged_before_resume = lines(run / "pretrain" / "samples.rank0.txt")
    assert not (run / "pretrain" / "stage.json").exists()

    # Resume 1, from another invocation folder, as after a crash; kill 2: in the LoRA stage 2.
    process = start(tmp_path / "second", f"resume={run}")
    kill_after_first_checkpoint(process, run / "finetune")
    stage1_weights_written = (run / "pretrain" / "trainable.safetensors").stat().st_mtime_ns

    # Resume 2 with resume=auto from the run's own folder (a requeued job).
    result = run_cli(["-m", "mmkit.train", *RUN, f"hydra.run.dir={run}", "resume=auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage pretrain finished earlier" in result.stdout
    assert (run / "pretrain" / "trainable.safetensors").stat().st_mtime_ns == stage1_weights_written

    for stage in ("pretrain", "finetune"):
        expected = lines(baseline / stage / "samples.rank0.txt")
        trained = lines(run / stage / "samples.rank0.txt")
        step = resumed_step(run / stage)
        done_at_checkpoint = step * SAMPLES_PER_STEP
        # The resumed process trained exactly the samples after the checkpoint, in the same order,
        # none of them trained before it; the log of the killed run was cut back to the checkpoint.
        assert 0 < done_at_checkpoint < len(expected), stage
        assert trained == expected, stage
        assert set(trained[done_at_checkpoint:]).isdisjoint(trained[:done_at_checkpoint]), stage
        summary = json.loads((run / stage / "stage.json").read_text())
        print(f"{stage}: killed, resumed from step {step} of {summary['steps']}: {done_at_checkpoint} of "
              f"{len(expected)} samples were trained before the checkpoint, the other {len(expected) - done_at_checkpoint} after")
        assert summary["samples"] == len(expected) and summary["steps"] == json.loads(
            (baseline / stage / "stage.json").read_text())["steps"]
        want, got = load_file(str(baseline / stage / "trainable.safetensors")), load_file(str(run / stage / "trainable.safetensors"))
        assert want.keys() == got.keys() and any("lora_" in k for k in want) == (stage == "finetune")
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=f"{stage} {name}")
        largest = max((got[name] - want[name]).abs().max().item() for name in want)
        print(f"{stage}: {len(want)} tensors, largest difference from the uninterrupted run {largest:.2e}")
    assert len(logged_before_resume) >= resumed_step(run / "pretrain") * SAMPLES_PER_STEP
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed"] is True and summary["stages"]["finetune"]["resumed_from"].startswith("finetune/checkpoints/")
    assert not (run / "finetune" / "checkpoints").exists()  # checkpoint.keep_after_stage=false


def interrupted_run(folder: Path, config: dict, stamp: float) -> Path:
    """A run folder as a killed run leaves it: its config and one whole checkpoint."""
    from mmkit.training.resume import save_run_config

    checkpoint = folder / "pretrain" / "checkpoints" / "step-0000002.ckpt"
    checkpoint.mkdir(parents=True)
    for name in ("state.pt", "weights.safetensors"):
        (checkpoint / name).write_bytes(b"")
        os.utime(checkpoint / name, (stamp, stamp))
    save_run_config(folder, config)
    return folder


def test_resume_finds_the_run_to_continue_or_names_what_stands_in_the_way(tmp_path):
    from mmkit.core.errors import ConfigError
    from mmkit.training.resume import resolve_run_dir

    config = {"seed": 0, "connector": {"name": "mlp2x_gelu"}, "resume": None}
    other = {**config, "connector": {"name": "linear"}}
    day = tmp_path / "outputs" / "2026-11-27"
    older = interrupted_run(day / "10-00-00", config, stamp=1_000)
    newer = interrupted_run(tmp_path / "outputs" / "2026-11-28" / "09-00-00", config, stamp=2_000)
    interrupted_run(day / "11-00-00", other, stamp=3_000)  # newest, but another config
    new = day / "12-00-00"
    new.mkdir()

    assert resolve_run_dir(None, new, {**config, "resume": None}) == new
    assert resolve_run_dir("auto", new, {**config, "resume": "auto"}) == newer
    assert resolve_run_dir("auto", new, {**config, "seed": 1}) == new  # nothing like it: a fresh start
    assert resolve_run_dir(str(older), new, {**config, "resume": str(older)}) == older
    with pytest.raises(ConfigError, match=r"differs from the run's .* at connector\.name"):
        resolve_run_dir(str(older), new, other)
    (newer / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="that run finished"):
        resolve_run_dir(str(newer), new, config)
    with pytest.raises(ConfigError, match="no checkpoint or finished stage"):
        resolve_run_dir(str(new), new, config)


def test_resume_with_another_config_is_refused_in_one_line(tmp_path):
    run = interrupted_run(tmp_path / "run", {"connector": {"name": "linear"}}, stamp=1_000)
    result = run_cli(["-m", "mmkit.train", f"resume={run}", f"hydra.run.dir={tmp_path / 'new'}"], timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: resume={run}: this config differs") and "connector.name" in last, last


class NotPlainData:
    def __reduce__(self):  # what a malicious pickle does: run something when it is read
        return (print, ("this ran while loading",))


def test_a_checkpoint_round_trips_and_one_holding_code_is_not_unpickled(tmp_path, capsys):
    from mmkit.core.errors import ConfigError
    from mmkit.training.resume import SafeCheckpointIO

    io = SafeCheckpointIO()
    path = tmp_path / "step-0000002.ckpt"
    io.save_checkpoint({"state_dict": {"model.w": torch.ones(2)}, "global_step": 2, "loops": {"a": [1, 2]}}, path)
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 2 and loaded["loops"] == {"a": [1, 2]}
    torch.testing.assert_close(loaded["state_dict"]["model.w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000002.ckpt"]  # no partial left behind

    torch.save({"global_step": 2, "payload": NotPlainData()}, path / "state.pt")
    with pytest.raises(ConfigError, match="not read"):
        io.load_checkpoint(path)
    assert "this ran while loading" not in capsys.readouterr().out
