"""Build a VisionLanguageModel from a composed config, validating every name first."""
from __future__ import annotations

from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from mmkit.core.registry import CONNECTORS, DECODERS, ENCODERS, load_components
from mmkit.models.vlm import VisionLanguageModel


def as_dict(node: Any) -> dict[str, Any]:
    """A plain dict of a config node (resolved), so components never see OmegaConf types."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)


def check_component_names(cfg: Mapping[str, Any]) -> None:
    """Fail on an unknown encoder/connector/decoder name before any weights are loaded."""
    load_components()
    for key, registry in (("encoder", ENCODERS), ("connector", CONNECTORS), ("decoder", DECODERS)):
        registry.get(cfg[key]["name"], key=f"{key}.name")


def build_model(cfg: Mapping[str, Any]) -> VisionLanguageModel:
    check_component_names(cfg)
    encoder = ENCODERS.build(as_dict(cfg["encoder"]), "encoder")
    decoder = DECODERS.build(as_dict(cfg["decoder"]), "decoder")
    connector = CONNECTORS.build(
        as_dict(cfg["connector"]), "connector", in_dim=encoder.hidden_size, out_dim=decoder.hidden_size
    )
    return VisionLanguageModel(encoder, connector, decoder)
