"""Shared fixtures: an isolated MMKIT_HOME, composed configs, tiny models built in the session."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

# Nothing in the tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# The real zoo pretraining code, at a scale that takes seconds (full-scale models are cached apart).
os.environ["MMKIT_ZOO_SCALE"] = "0.02"
# No .hypothesis/ in the checkout: no example database (the fuzz tests are seeded by their
# strategies), and Hypothesis' other files in a temporary folder.
os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = tempfile.mkdtemp(prefix="mmkit-hypothesis-")
settings.register_profile("mmkit", database=None)
settings.load_profile("mmkit")

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


CLI_CWD: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def cli_working_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where commands run unless a test says otherwise: Hydra's ``outputs/`` of a command run
    without ``hydra.run.dir`` lands here, never in the checkout."""
    CLI_CWD.append(tmp_path_factory.mktemp("cwd"))
    return CLI_CWD[0]


def compose(overrides: list[str] | None = None):
    """The config ``python -m mmkit.train OVERRIDES`` would run, without running it."""
    from mmkit.core.config import compose as mmkit_compose

    return mmkit_compose(overrides or [])


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
        [sys.executable, *args], cwd=cwd or CLI_CWD[0], capture_output=True, text=True, timeout=timeout,
        env=os.environ.copy()
    )


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of the default recipe at TINY_RUN's size, trained by the real CLI."""
    run_dir = tmp_path_factory.mktemp("run")
    result = run_cli(["-m", "mmkit.train", *[o for o in TINY_RUN if not o.startswith("evaluation.")], "evaluation=none",
                      f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def save_random_llama(folder: Path, **config) -> Path:
    """A seeded random Llama (2 x 64 unless ``config`` says otherwise) with the zoo tokenizer, saved
    as a model folder that ``decoder.path`` can point at."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmkit.models.decoders.hf_causal_lm import prepare_tokenizer

    tokenizer = prepare_tokenizer("zoo://tiny-tokenizer")
    torch.manual_seed(0)
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4, **config}
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **shape,
    )).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def lively_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of the default recipe over a random Llama with large weights: unlike the tiny
    zoo LM, its greedy replies differ from prompt to prompt, so generation tests can tell them apart."""
    from omegaconf import OmegaConf

    from mmkit.models.build import build_model
    from mmkit.models.checkpoint_io import save_stage_weights

    run = tmp_path_factory.mktemp("lively_run")
    save_random_llama(run / "lm", initializer_range=0.2)
    cfg = compose([f"decoder.path={run / 'lm'}"])
    model = build_model(cfg)
    names = {name for name in model.state_dict() if name.startswith("connector.")}
    save_stage_weights(model.state_dict(), names, run / "finetune", {"made_by": "tests"})
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return run


@pytest.fixture(scope="session")
def lively_model(lively_run: Path):
    """(cfg, model) loaded from ``lively_run``."""
    from mmkit.models.load import load_run

    return load_run(lively_run)
