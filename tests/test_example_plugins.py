"""The example plugin packages under plugins/: really pip-installed (into a folder of their own,
put on the path only where the plugin should be installed), each trains a tiny run when chosen
by name, passes its own tests, and is an unknown name again without the install."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN, run_cli

PLUGINS = {"mmkit-dinov2": "encoder=dinov2_small", "mmkit-resampler": "connector=perceiver_resampler"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    # Built from copies: setuptools writes build/ and *.egg-info beside the sources it builds.
    sources = tmp_path_factory.mktemp("plugin-sources")
    for name in PLUGINS:
        shutil.copytree(REPO / "plugins" / name, sources / name, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target),
         *[str(sources / name) for name in PLUGINS]],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return target


def _with_plugins(installed: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.slow
@pytest.mark.parametrize("plugin", list(PLUGINS))
def test_each_plugin_trains_a_tiny_run_when_chosen_by_name(installed, monkeypatch, tmp_path, plugin):
    _with_plugins(installed, monkeypatch)
    run_dir = tmp_path / "run"
    # Stage 1 alone trains the connector through the plugin's encoder or connector, and is quick.
    result = run_cli(["-m", "mmkit.train", PLUGINS[plugin], "recipe=stage1_only",
                      *[o for o in TINY_RUN if "finetune" not in o], f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "pretrain" / "trainable.safetensors").is_file() and (run_dir / "summary.json").is_file()
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert {"mmkit-dinov2": "name: dinov2", "mmkit-resampler": "name: perceiver_resampler"}[plugin] in config


@pytest.mark.slow
@pytest.mark.parametrize("plugin", list(PLUGINS))
def test_each_plugin_passes_its_own_tests(installed, monkeypatch, plugin):
    _with_plugins(installed, monkeypatch)
    result = run_cli(["-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "plugins" / plugin / "tests")],
                     cwd=REPO / "plugins" / plugin)
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout


def test_without_the_install_the_names_are_unknown_again():
    encoder = run_cli(["-m", "mmkit.train", "encoder=dinov2_small"], timeout=120)
    assert encoder.returncode == 2 and "error: encoder=dinov2_small: no such encoder config; available:" in encoder.stderr
    connector = run_cli(["-m", "mmkit.train", "connector=perceiver_resampler"], timeout=120)
    assert connector.returncode == 2
    assert "error: connector=perceiver_resampler: no such connector config; available: identity, linear, mlp2x_gelu" in connector.stderr
