import pytest
import torch

from mmkit.core.errors import ConfigError
from mmkit.core.registry import CONNECTORS, load_components


@pytest.fixture(scope="module")
def resampler():
    load_components()
    return CONNECTORS.get("perceiver_resampler")


def test_a_fixed_number_of_tokens_whatever_the_encoder_gives(resampler):
    connector = resampler(in_dim=24, out_dim=32, num_latents=5, heads=4)
    for num_tokens in (4, 64, 577):
        assert connector(torch.randn(3, num_tokens, 24)).shape == (3, 5, 32)
    assert connector.num_output_tokens(577) == 5


def test_the_image_features_are_read_as_a_set_and_gradients_reach_every_part(resampler):
    connector = resampler(in_dim=24, out_dim=32, num_latents=5, heads=4)
    features = torch.randn(2, 10, 24, requires_grad=True)
    output = connector(features)
    shuffled = connector(features[:, torch.randperm(10)])
    assert torch.allclose(output, shuffled, atol=1e-5)
    output.sum().backward()
    assert features.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.parameters())


def test_heads_must_divide_the_width(resampler):
    with pytest.raises(ConfigError, match="connector.heads=3"):
        resampler(in_dim=24, out_dim=32, heads=3)
