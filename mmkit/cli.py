"""The shared shape of mmkit's Hydra commands (train, evaluate): a bad group choice or any
MmkitError ends the command with one ``error:`` line on stderr and exit status 2, not a traceback."""
from __future__ import annotations

import sys
from typing import Any, Callable

import hydra
from omegaconf import DictConfig

from mmkit.core.config import CONF_DIR, check_composition, check_group_choices
from mmkit.core.errors import ConfigError, MmkitError


def _fail(exc: MmkitError) -> None:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)


def hydra_command(config_name: str, run: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """``main()`` for a command that runs ``run(cfg)`` on ``conf/<config_name>.yaml`` + overrides."""

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    def hydra_main(cfg: DictConfig) -> None:
        try:
            run(cfg)
        except MmkitError as exc:
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
