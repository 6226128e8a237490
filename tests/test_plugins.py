"""Third-party plugins: a distribution on sys.path with an ``mmkit.plugins`` entry point adds a
component *and* its config option, with no edit to mmkit (entry points are read from real
``.dist-info`` metadata, exactly as for a pip-installed package)."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from conftest import TINY_RUN, run_cli

PLUGIN_MODULE = textwrap.dedent(
    """
    import torch
    from mmkit.models.connectors.connector import Connector
    from mmkit.core.registry import CONNECTORS


    @CONNECTORS.register("scaled_linear")
    class ScaledLinear(Connector):
        def __init__(self, in_dim: int, out_dim: int, scale: float = 0.5) -> None:
            super().__init__(in_dim, out_dim)
            self.proj = torch.nn.Linear(in_dim, out_dim)
            self.scale = scale

        def forward(self, image_features):
            return self.proj(image_features) * self.scale
    """
)


def install_fake_distribution(root: Path, name: str, module_source: str, config: str | None) -> None:
    package = root / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(module_source)
    if config is not None:
        (package / "conf" / "connector").mkdir(parents=True)
        (package / "conf" / "connector" / f"{name}.yaml").write_text(config)
    dist_info = root / f"{name}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[mmkit.plugins]\n{name} = {name}\n")


@pytest.fixture
def plugin_path(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "site"
    install_fake_distribution(root, "scaled_plugin", PLUGIN_MODULE, "name: scaled_linear\nscale: 0.25\n")
    install_fake_distribution(root, "broken_plugin", "raise RuntimeError('this plugin is broken')\n", None)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    return root


def test_plugin_config_option_composes(plugin_path):
    result = run_cli(["-m", "mmkit.train", "connector=scaled_plugin", "--cfg", "job"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "name: scaled_linear" in result.stdout and "scale: 0.25" in result.stdout


@pytest.mark.slow
def test_plugin_component_trains_and_a_broken_plugin_only_warns(plugin_path, tmp_path):
    result = run_cli(
        ["-m", "mmkit.train", "connector=scaled_plugin", "recipe=stage1_only", f"hydra.run.dir={tmp_path / 'run'}"]
        + [o for o in TINY_RUN if "finetune" not in o]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mmkit plugin 'broken_plugin'" in result.stderr and "this plugin is broken" in result.stderr
    assert (tmp_path / "run" / "summary.json").is_file()


def test_without_the_plugin_its_name_is_unknown():
    result = run_cli(["-m", "mmkit.train", "connector=scaled_plugin"], timeout=120)
    assert result.returncode == 2
    assert "error: connector=scaled_plugin: no such connector config; available: identity, linear, mlp2x_gelu" in result.stderr
