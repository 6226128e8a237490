"""The few collectives mmkit needs outside Lightning's hooks, valid with or without a process group, and
the launcher's rank for work done once per job before any process group exists."""
from __future__ import annotations

import atexit
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmkit.core.errors import DataError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order; every rank must call it at the same point."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


# Set by torchrun (RANK), SLURM's srun (SLURM_PROCID), or, alone, by launchers that start one
# process per device on a single node (LOCAL_RANK): readable before any process group exists.
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK")
WAIT_VARIABLE = "MMKIT_RANK0_WAIT_S"
DEFAULT_WAIT_S = 3 * 3600.0


def launcher_rank() -> int:
    """This process's rank as its launcher set it in the environment; 0 when none did."""
    for name in RANK_VARIABLES:
        if (value := os.environ.get(name, "").strip()).isdigit():
            return int(value)
    return 0


def wait_for_rank_zero(path: Path, what: str, timeout_s: float | None = None, poll_s: float = 0.5) -> None:
    """Wait until ``path`` exists, which rank 0 creates when it has done ``what``. ``timeout_s``
    defaults to ``$MMKIT_RANK0_WAIT_S`` or 3 hours; DataError when it passes."""
    if timeout_s is None:
        timeout_s = float(os.environ.get(WAIT_VARIABLE, DEFAULT_WAIT_S))
    rank = launcher_rank()
    print(f"rank {rank}: waiting up to {timeout_s:g} s for rank 0 to {what} ({path})", file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise DataError(
                f"rank {rank}: rank 0 did not {what} within {timeout_s:g} s ({path} is missing); see rank 0's log, "
                f"raise {WAIT_VARIABLE}, or prepare the data beforehand in one process"
            )
        time.sleep(poll_s)


def launched_world_size() -> int:
    """How many processes torchrun or ``accelerate launch`` started for this job (WORLD_SIZE); 1 alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_launched_group(device: torch.device) -> torch.device:
    """Join the process group of the job's launcher, if there is one and it is not joined yet (gloo
    on CPU, nccl on GPU), and give this rank's device: on GPU each rank takes cuda:LOCAL_RANK."""
    if launched_world_size() <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # nccl's collectives run on the current device
    if not is_distributed():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # A group still alive at interpreter exit can abort the process as its threads are torn
        # down ("terminate called without an active exception"), after all the work is done;
        # a harness such as lmms-eval that never leaves the group it was given would exit non-zero.
        atexit.register(leave_group)
    return device


def leave_group() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()
