"""Build a VisionLanguageModel from a composed config, validating every name first: the one place
an encoder, a connector and a decoder are put together."""
from __future__ import annotations

import contextlib
from typing import Any, Literal, Mapping, get_args

import torch
from omegaconf import DictConfig, OmegaConf

from mmkit.core.errors import ConfigError
from mmkit.core.registry import CONNECTORS, DECODERS, ENCODERS, Registry, check_arguments, load_components
from mmkit.models.decoders.language_decoder import LanguageDecoder
from mmkit.models.encoders.vision_encoder import VisionEncoder
from mmkit.models.vlm import VisionLanguageModel

Weights = Literal["pretrained", "shapes", "none"]


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


def build_model(
    cfg: Mapping[str, Any],
    weights: Weights = "pretrained",
    encoder_overrides: dict[str, Any] | None = None,
    decoder_overrides: dict[str, Any] | None = None,
) -> VisionLanguageModel:
    """``cfg``'s encoder -> connector -> decoder, each built by its registered name from its config keys.

    ``weights``:

    - ``"pretrained"``: the encoder and decoder load their weights (``from_pretrained``); the
      connector starts fresh, as it always does.
    - ``"shapes"``: the real architectures with fresh weights, on the current default device
      (``torch.device("meta")`` to count, a ``FakeTensorMode`` to trace a step, a GPU to measure
      one); no weights and no tokenizer are read. HF models' configs come from the model's folder
      (a ``SCHEME://NAME`` location resolved, and so built, as for loading) or, for hub ids, from
      the copies shipped in ``conf/hf_config``; the decoder's vocabulary gets one row for
      ``<image>``, its last id. Components build this way through their ``with_fresh_weights``
      (hf_clip, timm_vit and its subclasses, hf_causal_lm).
    - ``"none"``: as ``"shapes"``, on the meta device whatever the default device: shapes, dtypes
      and every count, no storage at all.

    ``encoder_overrides`` and ``decoder_overrides`` change fields of the HF configs of a model
    built with fresh weights (``num_hidden_layers``: a reduced-depth model).
    """
    if weights not in get_args(Weights):
        raise ValueError(f"weights={weights!r}: choose one of {', '.join(get_args(Weights))}")
    if weights == "pretrained" and (encoder_overrides or decoder_overrides):
        raise ValueError("config overrides change the architecture, which pretrained weights fix: "
                         "use them with weights='shapes' or 'none'")
    check_component_names(cfg)
    with torch.device("meta") if weights == "none" else contextlib.nullcontext():
        if weights == "pretrained":
            encoder = ENCODERS.build(as_dict(cfg["encoder"]), "encoder")
            decoder = DECODERS.build(as_dict(cfg["decoder"]), "decoder")
        else:
            encoder = _with_fresh_weights(ENCODERS, as_dict(cfg["encoder"]), "encoder", encoder_overrides)
            decoder = _with_fresh_weights(DECODERS, as_dict(cfg["decoder"]), "decoder", decoder_overrides)
        connector = CONNECTORS.build(
            as_dict(cfg["connector"]), "connector", in_dim=encoder.hidden_size, out_dim=decoder.hidden_size
        )
    return VisionLanguageModel(encoder, connector, decoder)


def _with_fresh_weights(registry: Registry, node: dict[str, Any], key: str,
                        config_overrides: dict[str, Any] | None) -> VisionEncoder | LanguageDecoder:
    """The component ``node`` names, built by its class's ``with_fresh_weights`` from the same
    config keys its registered constructor takes (and checked as the registry checks them)."""
    name = node["name"]
    options = {k: v for k, v in node.items() if k != "name"}
    constructor = registry.get(name, key=f"{key}.name")
    check_arguments(constructor, options, key, name)
    # The registered constructor is the class itself or one of its classmethods (from_pretrained).
    owner = constructor if isinstance(constructor, type) else getattr(constructor, "__self__", None)
    if not isinstance(owner, type):
        raise ConfigError(f"{key}.name={name!r}: this {registry.kind} is registered as a function, so mmkit cannot "
                          "build it with fresh weights (weights='shapes' or 'none'); register its class or a "
                          "classmethod of it, and give the class a with_fresh_weights")
    return owner.with_fresh_weights(config_overrides, **options)
