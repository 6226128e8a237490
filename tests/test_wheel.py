"""mmkit as a user installs it from a wheel, not from this checkout: built from a copy of the
sources, installed into a folder of its own with a plugin's wheel beside it, and run from a
folder outside the repository. The configs, the search-path plugin and the entry points must all
travel inside the wheels."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN

PLUGIN = "mmkit-resampler"


def _pip(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args, "--quiet", "--no-deps"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _wheel(distribution: str, source: Path, sources: list[str], out: Path) -> Path:
    """Build a wheel from a copy of ``sources`` (setuptools writes build/ beside them, not here)."""
    copy = out.parent / f"src-{distribution}"
    for name in sources:
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
        if (source / name).is_dir():
            shutil.copytree(source / name, copy / name, ignore=ignore)
        else:
            shutil.copy2(source / name, copy / name)
    _pip("wheel", "--no-build-isolation", "-w", str(out), str(copy))
    return next(out.glob(f"{distribution.replace('-', '_')}-*.whl"))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheels")
    wheels = [
        _wheel("mmkit", REPO, ["mmkit", "hydra_plugins", "pyproject.toml", "README.md"], root / "dist"),
        _wheel(PLUGIN, REPO / "plugins" / PLUGIN, ["mmkit_resampler", "pyproject.toml", "README.md"], root / "dist"),
    ]
    _pip("install", "--no-build-isolation", "--target", str(root / "site"), *map(str, wheels))
    return root / "site"


def _run(site: Path, cwd: Path, *args: str, **env_vars: str) -> subprocess.CompletedProcess:
    # The wheels' folder goes first on the path, so it shadows this checkout's editable install.
    env = {**os.environ, "PYTHONPATH": str(site), **env_vars}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_wheel_install_composes_trains_and_takes_a_plugins_config_option(site, tmp_path):
    where = _run(site, tmp_path, "-c", "import mmkit, mmkit_resampler; print(mmkit.__file__, mmkit_resampler.__file__)")
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(Path(path).is_relative_to(site) for path in where.stdout.split())

    job = _run(site, tmp_path, "-m", "mmkit.train", "--cfg", "job")
    assert job.returncode == 0, job.stderr[-2000:]
    assert "name: hf_clip" in job.stdout and "name: mlp2x_gelu" in job.stdout

    run_dir = tmp_path / "run"
    stage1 = [o for o in TINY_RUN if "finetune" not in o]
    trained = _run(site, tmp_path, "-m", "mmkit.train", "connector=perceiver_resampler", "recipe=stage1_only",
                   *stage1, f"hydra.run.dir={run_dir}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (run_dir / "pretrain" / "trainable.safetensors").is_file() and (run_dir / "summary.json").is_file()
    assert "name: perceiver_resampler" in (run_dir / ".hydra" / "config.yaml").read_text()


@pytest.mark.slow
def test_the_wheel_ships_the_zoo_models_and_loads_them_after_their_hash_check(site, tmp_path):
    shipped = sorted(path.name for path in (REPO / "mmkit" / "zoo" / "shipped").iterdir() if path.is_dir())
    assert shipped, "the package ships no zoo model"
    # At full scale, as a user runs: the suite's small-scale builds never use shipped models.
    listing = _run(site, tmp_path, "-m", "mmkit.zoo", "list", MMKIT_ZOO_SCALE="1", MMKIT_HOME=str(tmp_path / "home"))
    assert listing.returncode == 0, listing.stderr[-2000:]
    for folder in shipped:
        name = folder.rsplit("-v", 1)[0]
        line = next(line for line in listing.stdout.splitlines() if line.startswith(f"{name} "))
        assert " shipped " in line and str(site / "mmkit" / "zoo" / "shipped" / folder) in line
