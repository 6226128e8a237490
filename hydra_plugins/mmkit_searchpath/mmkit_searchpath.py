"""Adds the config folders of installed mmkit plugins to Hydra's search path.

mmkit ships this one SearchPathPlugin so that plugins need not ship a ``hydra_plugins``
namespace package of their own (editable installs hide those from Hydra's discovery).
"""
from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class MmkitPluginSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from mmkit.core.config import plugin_config_dirs

        for folder in plugin_config_dirs():
            search_path.append(provider="mmkit-plugin", path=f"file://{folder}")
