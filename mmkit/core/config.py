"""Hydra config plumbing: where the config groups live, and early one-line checks of overrides."""
from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from typing import Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from mmkit.core.errors import ConfigError
from mmkit.core.registry import plugin_entry_points
from mmkit.core.schema import register as register_schema

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
register_schema()  # conf/config.yaml's defaults start with it, so it must exist before any compose


def plugin_config_dirs() -> list[Path]:
    """``<plugin package>/conf`` of every installed plugin that ships one (found without importing it)."""
    folders: list[Path] = []
    for ep in plugin_entry_points():
        package = ep.value.split(":")[0].split(".")[0]
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue  # reported when the plugin is loaded
        for location in (spec.submodule_search_locations or []) if spec else []:
            if (Path(location) / "conf").is_dir():
                folders.append(Path(location) / "conf")
    return folders


def group_options(group: str) -> list[str]:
    """Every option of a config group, from mmkit's conf/ and the plugins' conf folders."""
    options: set[str] = set()
    for root in [CONF_DIR, *plugin_config_dirs()]:
        options.update(path.stem for path in (root / group).glob("*.yaml"))
    return sorted(options)


def check_group_choices(overrides: list[str]) -> None:
    """Fail with one line when ``group=choice`` names a config file that does not exist."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return  # Hydra reports syntax errors itself
    groups = {path.name for path in CONF_DIR.iterdir() if path.is_dir()}
    for override in parsed:
        group = override.key_or_group
        if group not in groups or override.is_delete() or override.package:
            continue
        choices = group_options(group)
        for value in override.sweep_string_iterator() if override.is_sweep_override() else [override.get_value_element_as_str()]:
            if value in choices or value == "null":
                continue
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{group}={value}: no such {group} config; available: {', '.join(choices)}{hint}")


def _one_line(error: BaseException) -> str:
    """OmegaConf's and Hydra's multi-line messages as one line that starts with the key."""
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), None)
    message = lines[0] if lines else type(cause).__name__
    return f"{key}: {message}" if key else message


def compose(overrides: Sequence[str] = (), config_name: str = "config", return_hydra_config: bool = False,
            check_choices: bool = True) -> DictConfig:
    """The config ``python -m mmkit.<config_name> OVERRIDES`` would run, without running it: the one
    way every entry point that is not a Hydra app (export, data checks, cluster plans, benchmarks,
    tests) reads mmkit's configs. A bad group choice fails with one line first."""
    if check_choices:
        check_group_choices(list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


def check_composition(config_name: str, overrides: list[str]) -> None:
    """Compose ``config_name`` with ``overrides`` as Hydra will, failing with one line on a value
    of the wrong type or a key the config does not have. Sweeps are left to each job."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return  # Hydra reports syntax errors itself
    if any(override.is_sweep_override() for override in parsed):
        return
    kept = [o for o, p in zip(overrides, parsed) if not p.key_or_group.startswith(("hydra.", "hydra/"))]
    try:
        compose(kept, config_name, check_choices=False)
    except (HydraException, OmegaConfBaseException, ValueError) as error:  # ValueError: e.g. GROUP=null
        raise ConfigError(_one_line(error)) from None
