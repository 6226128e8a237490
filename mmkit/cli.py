"""The shared shape of mmkit's Hydra commands (train, evaluate): a bad group choice or any
MmkitError ends the command with one ``error:`` line on stderr and exit status 2, not a traceback,
and leaves no run folder behind."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mmkit.core.config import CONF_DIR, check_composition, check_group_choices
from mmkit.core.errors import ConfigError, MmkitError


# What a command writes into its folder before the config has passed every check: Hydra's own
# files, the command's log, and the run's saved config.
_SETUP_FILES = {".hydra", "run_config.yaml"}


def _fail(exc: MmkitError) -> None:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)


def _remove_setup_only_folder() -> None:
    """Hydra makes the run folder before mmkit has read the config; a command refused for it
    removes that folder again when it holds nothing but setup files, so a typo leaves no stub run
    behind (nor the folders of Hydra's ``outputs/`` tree it leaves empty)."""
    hydra_config = HydraConfig.get()
    folder = Path(hydra_config.runtime.output_dir)
    setup = _SETUP_FILES | {f"{hydra_config.job.name}.log"}
    if not folder.is_dir() or any(entry.name not in setup for entry in folder.iterdir()):
        return
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent
    while "outputs" in parent.parts and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        if parent.name == "outputs":
            break
        parent = parent.parent


def hydra_command(config_name: str, run: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """``main()`` for a command that runs ``run(cfg)`` on ``conf/<config_name>.yaml`` + overrides."""

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    def hydra_main(cfg: DictConfig) -> None:
        try:
            run(cfg)
        except MmkitError as exc:
            _remove_setup_only_folder()
            _fail(exc)

    def main() -> None:
        overrides = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
        try:
            check_group_choices(overrides)
            check_composition(config_name, overrides)
        except ConfigError as exc:
            _fail(exc)
        hydra_main()

    return main
