"""The cache's build_once: built once into a temporary folder, renamed when done, and nothing
left behind by a build that failed or was killed; the same for a single file written atomically."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmkit.core.atomic_io import write_text_atomically
from mmkit.core.cache import build_once


def write_marker(folder: Path) -> None:
    folder.mkdir()
    (folder / "built").write_text("yes")


def test_a_finished_build_is_reused_and_nothing_else_is_left(tmp_path):
    calls = []
    target = tmp_path / "model"
    for _ in range(2):
        build_once(target, lambda folder: (calls.append(folder), write_marker(folder)))
    assert len(calls) == 1 and (target / "built").read_text() == "yes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_build_leaves_nothing(tmp_path):
    def fail(folder: Path) -> None:
        write_marker(folder)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_once(tmp_path / "model", fail)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_build_on_this_host_is_cleared_by_the_next_one(tmp_path):
    host = socket.gethostname()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        leftovers = {
            "killed here": tmp_path / f"model.tmp-{host}-{dead_pid}",
            "running here": tmp_path / f"model.tmp-{host}-{running.pid}",
            "on another host": tmp_path / f"model.tmp-other-{dead_pid}",
        }
        for folder in leftovers.values():
            folder.mkdir()
        build_once(tmp_path / "model", write_marker)
        assert not leftovers["killed here"].exists()
        assert leftovers["running here"].exists() and leftovers["on another host"].exists()
        assert (tmp_path / "model" / "built").exists()
    finally:
        running.kill()
        running.wait()


def test_a_file_write_killed_mid_save_leaves_a_partial_that_a_later_process_removes(tmp_path):
    target = tmp_path / "run.pt"
    killed_writer = ("import os, signal, sys\nfrom pathlib import Path\nfrom mmkit.core.atomic_io import atomic_path\n"
                     "with atomic_path(Path(sys.argv[1])) as temporary:\n"
                     "    temporary.write_text('half a checkpoint')\n"
                     "    os.kill(os.getpid(), signal.SIGKILL)\n")
    for _ in range(2):
        assert subprocess.run([sys.executable, "-c", killed_writer, str(target)]).returncode == -9
    killed_long_ago, killed_just_now = sorted(tmp_path.glob(".run.pt.partial-*"))
    twenty_minutes_ago = time.time() - 1200
    os.utime(killed_long_ago, (twenty_minutes_ago, twenty_minutes_ago))
    host = socket.gethostname()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        kept = {
            "a live writer's": tmp_path / f".run.pt.partial-{host}-{running.pid}-1",
            # A host named like this one plus "-12": its pid 4242 means nothing here.
            "another host's": tmp_path / f".run.pt.partial-{host}-12-4242-1",
        }
        for path in kept.values():
            path.write_text("being written")
            os.utime(path, (twenty_minutes_ago, twenty_minutes_ago))
        write_text_atomically(target, "whole")
        assert not killed_long_ago.exists()
        # Dead but fresh: possibly a live writer in a container that shares this host's name.
        assert killed_just_now.exists()
        assert all(path.exists() for path in kept.values())
        assert target.read_text() == "whole"
    finally:
        running.kill()
        running.wait()
