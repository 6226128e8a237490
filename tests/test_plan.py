"""Planning a real run: the real architectures built on the meta device, offline, from the configs
shipped in conf/hf_config."""
from __future__ import annotations

import pytest

from conftest import compose
from mmkit.errors import ConfigError
import torch

from mmkit.planning.meta import parameter_count, shapes_only_model
from mmkit.registry import load_components

load_components()


@pytest.mark.parametrize("overrides,encoder,decoder,total,image_tokens", [
    # Published sizes: CLIP ViT-L/14-336's vision tower ~304M, Vicuna-7B ~6.74B, LLaVA-1.5-7B ~7.06B,
    # Vicuna-13B ~13.0B, LLaVA-1.5-13B ~13.35B; 576 image tokens at 336 px. LLaVA (v1): the 224 px
    # tower (256 tokens) and a linear projection in front of the 13B decoder.
    (["experiment=llava_v1_5"], 304e6, 6.74e9, 7.06e9, 576),
    (["experiment=llava_v1_5", "decoder=vicuna_13b"], 304e6, 13.0e9, 13.35e9, 576),
    (["experiment=llava_v1"], 304e6, 13.0e9, 13.32e9, 256),
])
def test_meta_models_have_the_published_sizes(overrides, encoder, decoder, total, image_tokens):
    with torch.device("meta"):
        model = shapes_only_model(compose(overrides))
    # The decoder holds one more embedding row than the published model: mmkit's <image> token.
    assert parameter_count(model.encoder) == pytest.approx(encoder, rel=0.005)
    assert parameter_count(model.decoder) == pytest.approx(decoder, rel=0.005)
    assert parameter_count(model) == pytest.approx(total, rel=0.005)
    assert model.num_image_tokens == image_tokens
    assert all(p.is_meta for p in model.decoder.parameters())  # no weights were made or read


def test_a_model_with_no_config_here_is_named():
    with pytest.raises(ConfigError, match=r"decoder.path=some/unknown-model: no config.json there and no shipped config"):
        shapes_only_model(compose(["experiment=llava_v1_5", "decoder.path=some/unknown-model"]))
