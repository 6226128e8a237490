"""Registries: exact lookup, clear unknown-name errors, duplicate and base-class checks, plugins."""
from __future__ import annotations

import sys
import textwrap
import warnings
from importlib.metadata import EntryPoint

import pytest
from torch import nn

import mmkit.core.registry as registry_module
from mmkit.core.errors import ConfigError
from mmkit.core.registry import CONNECTORS, ENCODERS, Registry, load_components
from mmkit.models.connectors.connector import Connector

load_components()


def test_unknown_name_lists_choices_and_closest_match():
    with pytest.raises(ConfigError) as raised:
        CONNECTORS.get("mlp2x_gelo", key="connector.name")
    message = str(raised.value)
    assert message.startswith("connector.name='mlp2x_gelo': unknown connector")
    for choice in ("identity", "linear", "mlp{N}x_gelu"):
        assert choice in message
    assert "did you mean 'mlp2x_gelu'?" in message
    assert "\n" not in message


def test_lookup_is_exact_never_substring():
    assert "linear" in CONNECTORS
    for near in ("line", "linear2", "Linear", "mlp2x", "mlp2x_gelu_extra", "xmlp2x_gelu"):
        assert near not in CONNECTORS


def test_family_builds_any_depth():
    connector = CONNECTORS.get("mlp4x_gelu")(in_dim=8, out_dim=16)
    linears = [m for m in connector.modules() if isinstance(m, nn.Linear)]
    gelus = [m for m in connector.modules() if isinstance(m, nn.GELU)]
    assert len(linears) == 4 and len(gelus) == 3
    assert linears[0].in_features == 8 and linears[-1].out_features == 16
    with pytest.raises(ConfigError, match="depth >= 2"):
        CONNECTORS.get("mlp1x_gelu")(in_dim=8, out_dim=16)


def test_registering_twice_raises():
    with pytest.raises(ValueError, match="already registered"):
        CONNECTORS.register("linear")(type("Again", (Connector,), {}))


def test_registered_class_must_subclass_the_kind_base():
    with pytest.raises(TypeError, match="not a subclass of VisionEncoder"):
        ENCODERS.register("not_an_encoder")(type("NotAnEncoder", (nn.Module,), {}))
    assert "not_an_encoder" not in ENCODERS


def test_build_passes_config_keys_as_arguments():
    reg: Registry = Registry("widget")

    @reg.register("box")
    class Box:
        def __init__(self, width: int, height: int = 1) -> None:
            self.area = width * height

    assert reg.build({"name": "box", "width": 3}, "widget", height=4).area == 12
    with pytest.raises(ConfigError, match="widget: missing 'name'"):
        reg.build({"width": 3}, "widget")


def test_failing_plugin_is_reported_by_name_and_others_load(tmp_path, monkeypatch):
    (tmp_path / "good_plugin.py").write_text(
        textwrap.dedent(
            """
            from mmkit.models.connectors.linear import LinearConnector
            from mmkit.core.registry import CONNECTORS

            @CONNECTORS.register("good_plugin_linear")
            class GoodPluginLinear(LinearConnector):
                pass
            """
        )
    )
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('missing dependency foo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry_points = [
        EntryPoint(name="broken", value="broken_plugin", group=registry_module.PLUGIN_GROUP),
        EntryPoint(name="good", value="good_plugin", group=registry_module.PLUGIN_GROUP),
    ]
    monkeypatch.setattr(registry_module, "plugin_entry_points", lambda: entry_points)
    monkeypatch.setattr(registry_module, "_loaded", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_components()
    messages = [str(w.message) for w in caught]
    assert any("'broken'" in m and "missing dependency foo" in m for m in messages)
    assert "good_plugin_linear" in CONNECTORS
    CONNECTORS._entries.pop("good_plugin_linear")
    sys.modules.pop("good_plugin", None)
