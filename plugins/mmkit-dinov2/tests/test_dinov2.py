import pytest
import torch

from mmkit.core.errors import ConfigError
from mmkit.core.registry import ENCODERS, load_components


@pytest.fixture(scope="module")
def dinov2():
    load_components()
    return ENCODERS.get("dinov2")


@pytest.mark.parametrize("select, tokens", [("patch", 16), ("cls_patch", 17)])
def test_registers_never_reach_the_connector(dinov2, select, tokens):
    encoder = dinov2(img_size=56, select=select, layer=-1)
    pixels = torch.randn(2, 3, 56, 56)
    features = encoder(pixels)
    assert features.shape == (2, tokens, 384) and encoder.num_tokens == tokens
    vit = encoder.model
    hidden = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixels))))
    for block in vit.blocks:
        hidden = block(hidden)
    assert torch.allclose(features[:, -16:], hidden[:, 5:], atol=1e-5)  # CLS + 4 registers come first
    assert encoder.image_stats.size == 56


def test_bad_options_name_their_key(dinov2):
    with pytest.raises(ConfigError, match="encoder.size='huge'"):
        dinov2(size="huge")
    with pytest.raises(ConfigError, match="encoder.img_size=64"):
        dinov2(img_size=64)
