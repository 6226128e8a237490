"""Shared fixtures: an isolated MMKIT_HOME, composed configs, tiny models built in the session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Nothing in the tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# The real zoo pretraining code, at a scale that takes seconds (full-scale models are cached apart).
os.environ["MMKIT_ZOO_SCALE"] = "0.02"

REPO = Path(__file__).resolve().parent.parent

# Small data and one short epoch per stage: end-to-end runs in seconds, not minutes.
TINY_RUN = [
    "data.pretrain.count=96",
    "data.pretrain.samples_per_shard=24",
    "data.finetune.count=32",
    "data.finetune.samples_per_shard=24",
    "recipe.stages.pretrain.global_batch_size=16",
    "recipe.stages.pretrain.micro_batch_size=16",
    "recipe.stages.finetune.global_batch_size=16",
    "recipe.stages.finetune.micro_batch_size=8",
    "recipe.stages.finetune.epochs=1",
    "trainer.enable_progress_bar=false",
    "evaluation.tasks.synthetic.count=8",
]


@pytest.fixture(scope="session", autouse=True)
def mmkit_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the whole session: the zoo models and synthetic shards are built once."""
    home = tmp_path_factory.mktemp("mmkit_home")
    os.environ["MMKIT_HOME"] = str(home)
    return home


def compose(overrides: list[str] | None = None):
    """The config ``python -m mmkit.train OVERRIDES`` would run, without running it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mmkit.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [], return_hydra_config=False)


@pytest.fixture(scope="session")
def default_cfg():
    return compose()


@pytest.fixture(scope="session")
def tiny_model(default_cfg):
    """The embedded default's model (zoo tiny-clip + tiny-llama, mlp2x_gelu connector)."""
    from mmkit.models.build import build_model

    return build_model(default_cfg)


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` as a real subprocess with the test session's environment."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
    )


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of the default recipe at TINY_RUN's size, trained by the real CLI."""
    run_dir = tmp_path_factory.mktemp("run")
    result = run_cli(["-m", "mmkit.train", *[o for o in TINY_RUN if not o.startswith("evaluation.")], "evaluation=none",
                      f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir
