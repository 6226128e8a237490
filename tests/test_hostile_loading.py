"""Code that is not the user's runs only when the user says so: a run folder's own Python files
(an ``auto_map`` in its LM's config) only with ``trust_remote_code`` on the command line, whatever
its saved config says; and a plugin that raises or exits as it loads is named and left out."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import CLI_CWD, compose, run_cli, save_random_llama
from omegaconf import OmegaConf

from mmkit.core import registry
from mmkit.core.errors import ConfigError
from mmkit.export import main as export_main
from mmkit.models.load import load_run

WARNING = "decoder.trust_remote_code=true was ignored"


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny run folder (its LM inside it, one finished stage), built once and copied per test."""
    from mmkit.models.build import build_model
    from mmkit.models.checkpoint_io import save_stage_weights

    run = tmp_path_factory.mktemp("plain_run")
    save_random_llama(run / "lm")
    cfg = compose([f"decoder.path={run / 'lm'}"])
    model = build_model(cfg)
    save_stage_weights(model.state_dict(), {n for n in model.state_dict() if n.startswith("connector.")},
                       run / "finetune", {"made_by": "tests"})
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return run


def hostile_copy(plain_run: Path, root: Path, model_type: str | None = None) -> tuple[Path, Path]:
    """``plain_run`` copied to ``root/run``, made hostile: its saved config sets
    ``decoder.trust_remote_code: true``, and its LM's config.json and tokenizer_config.json map the
    Auto classes to ``hostile.py`` in the LM folder, which writes the returned marker file when
    imported. ``model_type`` replaces the LM's own, so that only its code could load it."""
    run, marker = root / "run", root / "MARKER"
    shutil.copytree(plain_run, run)
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    cfg.decoder.path = str(run / "lm")
    cfg.decoder.trust_remote_code = True
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    (run / "lm" / "hostile.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    _edit_json(run / "lm" / "config.json", auto_map={"AutoConfig": "hostile.HostileConfig",
                                                     "AutoModelForCausalLM": "hostile.HostileModel"},
               **({"model_type": model_type} if model_type else {}))
    _edit_json(run / "lm" / "tokenizer_config.json", auto_map={"AutoTokenizer": ["hostile.HostileTokenizer", None]})
    return run, marker


def _edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_load_run_ignores_the_folders_trust_remote_code_and_says_so_in_one_line(plain_run, tmp_path, capsys):
    run, marker = hostile_copy(plain_run, tmp_path)
    cfg, model = load_run(run)
    assert not marker.exists()
    assert cfg.decoder.trust_remote_code is False
    assert type(model.decoder.model).__name__ == "LlamaForCausalLM"  # transformers' own class, not the folder's
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and WARNING in warnings[0] and "trust_remote_code=true to the command" in warnings[0]


def test_a_model_that_loads_only_through_its_own_code_is_refused_in_one_line(plain_run, tmp_path, capsys):
    run, marker = hostile_copy(plain_run, tmp_path, model_type="hostile")
    with pytest.raises(ConfigError, match=r"decoder.path=.*: this model loads only by running Python files of its "
                                          r"own \(its auto_map\); if you trust them, allow them with "
                                          r"trust_remote_code=true") as refused:
        load_run(run)
    assert "\n" not in str(refused.value)
    assert not marker.exists()


def test_only_true_or_false_allows_code(plain_run):
    with pytest.raises(ConfigError, match="trust_remote_code='off': give true or false"):
        load_run(plain_run, trust_remote_code="off")


def test_export_to_hf_runs_none_of_the_folders_code_without_its_flag(plain_run, tmp_path, capsys):
    run, marker = hostile_copy(plain_run, tmp_path)
    assert export_main(["to-hf", str(run), str(tmp_path / "hf")]) == 0
    assert not marker.exists()
    assert WARNING in capsys.readouterr().err


def _chat(run: Path, args: list[str], modules: Path) -> subprocess.CompletedProcess:
    # transformers copies a folder's code into HF_MODULES_CACHE before importing it: a temporary one.
    return subprocess.run([sys.executable, "-m", "mmkit.chat", f"model={run}", "max_new_tokens=4", *args],
                          input="What colour is the circle?\n", capture_output=True, text=True, cwd=CLI_CWD[0],
                          timeout=300, env={**os.environ, "HF_MODULES_CACHE": str(modules)}, check=False)


@pytest.mark.slow
def test_the_chat_command_runs_the_folders_code_only_when_its_command_line_says_so(plain_run, tmp_path):
    run, marker = hostile_copy(plain_run, tmp_path)
    untrusted = _chat(run, [], tmp_path / "modules")
    assert untrusted.returncode == 0, untrusted.stderr[-3000:]
    assert "ASSISTANT:" in untrusted.stdout
    assert WARNING in untrusted.stderr
    assert not marker.exists()

    # The test would catch the code running: allowed, it runs (and then fails, being no model).
    trusted = _chat(run, ["trust_remote_code=true"], tmp_path / "modules")
    assert marker.read_text() == "ran"
    assert trusted.returncode != 0 and WARNING not in trusted.stderr


def install_plugin(root: Path, name: str, source: str) -> None:
    """A distribution ``name`` on ``root`` (to put on PYTHONPATH) whose ``mmkit.plugins`` entry point
    is its package, as pip would install it."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(textwrap.dedent(source))
    dist_info = root / f"{name}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[mmkit.plugins]\n{name} = {name}\n")


@pytest.mark.slow
def test_a_plugin_that_exits_or_raises_is_named_and_the_command_goes_on(tmp_path, monkeypatch):
    root = tmp_path / "site"
    # Plugins load in name order: the failing ones come before the one that works.
    install_plugin(root, "a_exiting_plugin", "import sys\nsys.exit(3)\n")
    install_plugin(root, "b_raising_plugin", "raise RuntimeError('this plugin is broken')\n")
    install_plugin(root, "c_clashing_plugin", """
        from mmkit.core.registry import CONNECTORS

        @CONNECTORS.register("linear")  # mmkit's own name: registering it raises
        def linear(in_dim, out_dim):
            raise AssertionError("never built")
    """)
    install_plugin(root, "d_working_plugin", """
        from mmkit.core.registry import CONNECTORS
        from mmkit.models.connectors.linear import LinearConnector

        CONNECTORS.register("working_linear")(LinearConnector)
    """)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    result = run_cli(["-m", "mmkit.components"], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mmkit plugin 'a_exiting_plugin' (a_exiting_plugin) failed to load and was skipped: SystemExit: 3" in result.stderr
    assert "mmkit plugin 'b_raising_plugin'" in result.stderr and "RuntimeError: this plugin is broken" in result.stderr
    assert "mmkit plugin 'c_clashing_plugin'" in result.stderr and "'linear' is already registered" in result.stderr
    connectors = next(line for line in result.stdout.splitlines() if line.startswith("connector:"))
    assert connectors == "connector: identity, linear, working_linear, mlp{N}x_gelu"


class _InterruptedEntryPoint:
    name, value = "slow_plugin", "slow_plugin"

    def load(self) -> None:
        raise KeyboardInterrupt


def test_ctrl_c_while_a_plugin_loads_still_stops_the_command(monkeypatch):
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "plugin_entry_points", lambda: [_InterruptedEntryPoint()])
    with pytest.raises(KeyboardInterrupt):
        registry.load_components()


def test_a_package_path_finds_a_subpackage_folder_without_running_its_parent(tmp_path, monkeypatch):
    """``decoder.path: package://evilrun.lm`` in a run folder's config, with a folder named evilrun
    where the command starts: its ``__init__.py`` must not run (find_spec("a.b") imports a)."""
    from mmkit.models.hub import package_folder

    marker = tmp_path / "MARKER"
    (tmp_path / "evilrun" / "lm").mkdir(parents=True)
    (tmp_path / "evilrun" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert package_folder("evilrun.lm") == tmp_path / "evilrun" / "lm"
    assert not marker.exists()
    with pytest.raises(ConfigError, match=r"package://evilrun.nothing: the Python package evilrun.nothing is not"):
        package_folder("evilrun.nothing")
    assert not marker.exists()
