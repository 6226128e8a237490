"""Encoders, connectors, decoder set-up, and the VLM's placement of image embeddings."""
from __future__ import annotations

from operator import attrgetter

import pytest
import timm
import torch
from conftest import compose
from safetensors.torch import save_file

from mmkit.core.errors import ConfigError, DataError
from mmkit.core.interfaces import IMAGE_TOKEN
from mmkit.core.registry import CONNECTORS, DECODERS, ENCODERS, load_components
from mmkit.models.build import build_model
from mmkit.models.hub import resolve_model_path

load_components()


def images(count: int, size: int = 64) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(count))


@pytest.mark.parametrize("layer", [-1, -2, 0, 2])
def test_hf_clip_returns_the_requested_hidden_state(layer):
    path = resolve_model_path("zoo://tiny-clip")  # a local folder, loaded with from_pretrained
    encoder = ENCODERS.get("hf_clip")(path=path, layer=layer)
    pixels = images(2)
    reference = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
    features = encoder(pixels)
    assert features.shape == (2, 4, 128) == (2, encoder.num_tokens, encoder.hidden_size)  # 2x2 patches
    assert torch.equal(features, reference[:, 1:])  # CLS dropped
    assert not any(p.requires_grad for p in encoder.parameters())  # frozen by default


def test_hf_clip_cls_patch_keeps_cls():
    encoder = ENCODERS.get("hf_clip")(path="zoo://tiny-clip", select="cls_patch")
    assert encoder(images(1)).shape == (1, 5, 128) and encoder.num_tokens == 5


@pytest.mark.parametrize("layer", [99, -6, 5])
def test_out_of_range_layer_is_a_config_error(layer):
    with pytest.raises(ConfigError, match=rf"encoder.layer={layer} is out of range.*use -5..4"):
        ENCODERS.get("hf_clip")(path="zoo://tiny-clip", layer=layer)


def test_bad_select_is_a_config_error():
    with pytest.raises(ConfigError, match="encoder.select='all'"):
        ENCODERS.get("hf_clip")(path="zoo://tiny-clip", select="all")


TIMM_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 3}


@pytest.mark.parametrize("layer, block", [(-1, 2), (-2, 1), (1, 0)])
def test_timm_vit_layer_semantics_match_timm_intermediates(layer, block):
    encoder = ENCODERS.get("timm_vit")(model_name="vit_tiny_patch16_224", layer=layer, model_kwargs=TIMM_KWARGS)
    pixels = images(2, size=32)
    intermediates = encoder.model.forward_intermediates(
        pixels, indices=[block], norm=False, output_fmt="NLC", intermediates_only=True
    )
    assert torch.allclose(encoder(pixels), intermediates[0], atol=1e-6)
    assert encoder.num_tokens == 16
    assert encoder.image_stats.size == 32  # the size it was built for, not timm's pretrained 224


def test_timm_vit_loads_a_local_checkpoint(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TIMM_KWARGS)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    encoder = ENCODERS.get("timm_vit")(
        model_name="vit_tiny_patch16_224", checkpoint_file=str(tmp_path / "vit.safetensors"), model_kwargs=TIMM_KWARGS
    )
    for name, tensor in source.state_dict().items():
        assert torch.equal(encoder.model.state_dict()[name], tensor), name


def test_timm_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="encoder.model_name='vit_nonexistent'"):
        ENCODERS.get("timm_vit")(model_name="vit_nonexistent")


@pytest.mark.parametrize("name, parameters", [("linear", 8 * 16 + 16), ("mlp2x_gelu", 8 * 16 + 16 + 16 * 16 + 16)])
def test_connectors_map_widths(name, parameters):
    connector = CONNECTORS.get(name)(in_dim=8, out_dim=16)
    assert connector(torch.randn(2, 5, 8)).shape == (2, 5, 16)
    assert sum(p.numel() for p in connector.parameters()) == parameters


def test_identity_connector_requires_equal_widths():
    assert CONNECTORS.get("identity")(in_dim=8, out_dim=8)(torch.ones(1, 2, 8)).sum() == 16
    with pytest.raises(ConfigError, match="connector.name='identity' needs equal widths"):
        CONNECTORS.get("identity")(in_dim=8, out_dim=16)


def test_decoder_adds_image_and_pad_tokens_and_resizes():
    decoder = DECODERS.get("hf_causal_lm")(path="zoo://tiny-llama")
    tokenizer = decoder.tokenizer
    assert IMAGE_TOKEN in tokenizer.get_vocab() and tokenizer.pad_token is not None
    assert decoder.model.get_input_embeddings().num_embeddings == len(tokenizer)
    # <image> is one token, never split into pieces.
    assert tokenizer.encode("a <image> b", add_special_tokens=False).count(decoder.image_token_id) == 1


def test_lora_decoder_trains_adapters_only():
    decoder = DECODERS.get("hf_causal_lm")(path="zoo://tiny-llama", lora={"enabled": True, "r": 4, "alpha": 8})
    names = decoder.lora_parameter_names()
    assert names and all("lora_" in n for n in names)
    with pytest.raises(ConfigError, match="decoder.lora.target_modules"):
        DECODERS.get("hf_causal_lm")(path="zoo://tiny-llama", lora={"enabled": True, "target_modules": ["nope"]})


def test_image_embeddings_land_exactly_at_image_token_positions(tiny_model):
    model = tiny_model
    n = model.num_image_tokens
    image_id = model.image_token_id
    # Sample 0 has its image after 3 text tokens, sample 1 after 9: images fill positions in order.
    row0 = [1, 5, 6] + [image_id] * n + [7, 8, 9, 10, 11, 12]
    row1 = [1, 5, 6, 7, 8, 9, 10, 11, 12] + [image_id] * n
    input_ids = torch.tensor([row0, row1])
    pixels = images(2)
    embeds = model.embed(input_ids, pixels)
    expected_images = model.connector(model.encoder(pixels))
    text_embeds = model.decoder.embed_tokens(input_ids)
    for row, start in ((0, 3), (1, 9)):
        assert torch.equal(embeds[row, start : start + n], expected_images[row])
        mask = input_ids[row] != image_id
        assert torch.equal(embeds[row][mask], text_embeds[row][mask])


def test_image_token_count_mismatch_is_a_data_error(tiny_model):
    input_ids = torch.tensor([[1, tiny_model.image_token_id, 5]])
    with pytest.raises(DataError, match="1 image-token positions but 1 images x 4 tokens"):
        tiny_model.embed(input_ids, images(1))


def test_generate_with_kv_cache_matches_a_greedy_loop_without_cache(tiny_model):
    model = tiny_model.eval()
    n = model.num_image_tokens
    input_ids = torch.tensor([[1] + [model.image_token_id] * n + [20, 21, 22]])
    attention = torch.ones_like(input_ids)
    pixels = images(1)
    generated = model.generate(input_ids, attention, pixels, max_new_tokens=6, do_sample=False)
    # Reference: recompute the whole sequence at every step, no cache.
    ids = input_ids
    reference = []
    with torch.no_grad():
        for _ in range(generated.shape[1]):
            logits = model(ids, torch.ones_like(ids), pixels).logits
            token = int(logits[0, -1].argmax())
            reference.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert generated[0].tolist() == reference


def _shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    # The vocabulary aside: a model built from its config has no tokenizer, only <image>'s extra row.
    return {name: p.shape for name, p in model.named_parameters() if "embed_tokens" not in name and "lm_head" not in name}


def test_fresh_weights_build_the_loaded_architecture(default_cfg, tiny_model):
    fresh = build_model(default_cfg, weights="none")
    assert all(p.is_meta for p in fresh.parameters())  # nothing was allocated
    assert _shapes(fresh) == _shapes(tiny_model)
    for name in ("num_image_tokens", "encoder.hidden_state_index", "encoder.image_stats", "decoder.hidden_size"):
        assert attrgetter(name)(fresh) == attrgetter(name)(tiny_model), name
    assert fresh.decoder.tokenizer is None
    assert fresh.image_token_id == fresh.decoder.model.get_input_embeddings().num_embeddings - 1
    with torch.device("meta"):  # "shapes" builds on the default device
        assert all(p.is_meta for p in build_model(default_cfg, weights="shapes").parameters())


def test_fresh_weights_take_hf_config_overrides_and_the_registrys_key_check(default_cfg):
    model = build_model(default_cfg, "none", encoder_overrides={"num_hidden_layers": 2},
                        decoder_overrides={"num_hidden_layers": 1})
    assert model.encoder.num_blocks == 2 and model.decoder.model.config.num_hidden_layers == 1
    with pytest.raises(ConfigError, match="decoder: 'hf_causal_lm' takes no option.s. nope; it takes: path, dtype"):
        build_model(compose(["+decoder.nope=1"]), weights="none")
    with pytest.raises(ValueError, match="pretrained weights fix"):
        build_model(default_cfg, decoder_overrides={"num_hidden_layers": 1})


def test_a_timm_encoder_is_built_with_fresh_weights_by_its_own_keys():
    model = build_model(compose(["encoder=timm_vit_tiny", "encoder.pretrained=true"]), weights="none")
    assert next(model.encoder.parameters()).is_meta  # pretrained=true was not followed: nothing to read
    assert model.encoder.image_stats.size == 64 and model.num_image_tokens == 64
