"""Packing and length grouping: no wasted tokens, and not a digit of the maths changed."""
from __future__ import annotations

import pytest
import torch
from conftest import compose, save_random_llama
from torch.utils.flop_counter import FlopCounterMode

from mmkit.core.errors import ConfigError
from mmkit.data.collate import Collator, first_fit_decreasing
from mmkit.data.samples import EncodedSample, SkippedSample
from mmkit.data.templates.llava_tokenization import IGNORE_INDEX
from mmkit.models.decoders.packed_attention import sample_lengths
from mmkit.training.throughput import FlopModel

LENGTHS = [23, 5, 61, 14, 40, 9, 33]


@pytest.fixture(scope="module")
def gqa_lm(tmp_path_factory):
    """A random Llama with grouped-query attention (2 key/value heads for 4 query heads)."""
    return save_random_llama(
        tmp_path_factory.mktemp("gqa_lm"), intermediate_size=96, num_key_value_heads=2, initializer_range=0.1
    )


def build(lm_folder, attention: str, *overrides: str):
    from mmkit.models.build import build_model

    torch.manual_seed(1)
    model = build_model(compose([f"decoder.path={lm_folder}", f"decoder.attn_implementation={attention}", *overrides]))
    model.decoder.requires_grad_(True)
    return model.float()


def samples(model, lengths=LENGTHS) -> list[EncodedSample]:
    generator = torch.Generator().manual_seed(2)
    size = model.encoder.image_stats.size
    result = []
    for index, length in enumerate(lengths):
        with_image = index % 3 != 1
        text = length - (model.num_image_tokens if with_image else 0)
        ids = torch.randint(5, model.image_token_id, (max(text, 2),), generator=generator)
        if with_image:
            image = torch.full((model.num_image_tokens,), model.image_token_id)
            ids = torch.cat([ids[:1], image, ids[1:]])
        labels = ids.clone()
        labels[: len(ids) // 2] = IGNORE_INDEX  # the prompt; the reply is the rest
        pixels = torch.randn(3, size, size, generator=generator) if with_image else None
        result.append(EncodedSample(f"s{index}", ids, labels, pixels))
    return result


def loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
        labels=batch["labels"], position_ids=batch["position_ids"], sample_lengths=batch["sample_lengths"],
    ).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["packed_sdpa", "packed_sdpa/positions only", "sdpa"])
@pytest.mark.parametrize("pack_length", [None, 96])
def test_packed_loss_and_gradients_equal_the_padded_ones(gqa_lm, attention, pack_length):
    """packed_sdpa with the collator's lengths or from position ids alone; transformers' sdpa
    with its block-diagonal mask."""
    model = build(gqa_lm, attention.split("/")[0])
    items = samples(model)
    pad_token = model.tokenizer.pad_token_id
    padded = Collator(pad_token, "pad")(items)
    packed = Collator(pad_token, "pack", pack_length)(items)
    if attention.endswith("positions only"):
        packed["sample_lengths"] = None
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    padded_loss, padded_grads = loss_and_grads(model, padded)
    packed_loss, packed_grads = loss_and_grads(model, packed)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-6)
    assert padded_grads.keys() == packed_grads.keys() and any(n.startswith("connector.") for n in padded_grads)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_packed_sdpa_equals_sdpa_where_nothing_is_packed(gqa_lm):
    """Padded batches (and generation) take transformers' own sdpa path unchanged."""
    items = samples(build(gqa_lm, "sdpa"))
    batch = Collator(0, "pad")(items)
    logits = {}
    for attention in ("sdpa", "packed_sdpa"):
        model = build(gqa_lm, attention).eval()
        with torch.no_grad():
            logits[attention] = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(logits["packed_sdpa"][mask], logits["sdpa"][mask], rtol=0, atol=1e-5)


def test_packing_lays_samples_end_to_end():
    items = [EncodedSample(f"k{i}", torch.arange(1, n + 1), torch.arange(1, n + 1), None) for i, n in enumerate([5, 3, 4])]
    items.append(SkippedSample("bad", "undecodable image"))
    batch = Collator(0, "pack")(items)
    assert batch["input_ids"].shape == (1, 12) and batch["attention_mask"] is None
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    # Each sample's first label is ignored: the previous sample's last token must not predict it.
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, 4, 5, IGNORE_INDEX, 2, 3, IGNORE_INDEX, 2, 3, 4]]
    assert batch["keys"] == ["k0", "k1", "k2"] and batch["skipped"] == [("bad", "undecodable image")]
    assert (batch["num_real_tokens"], batch["num_tokens"], batch["sum_squared_lengths"]) == (12, 12, 50)
    rows = Collator(0, "pack", pack_length=8)(items[:3])
    assert rows["input_ids"].shape == (2, 8) and rows["num_tokens"] == 16
    assert rows["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert sample_lengths(rows["position_ids"]) == rows["sample_lengths"] == [5, 3, 4, 4]
    assert batch["sample_lengths"] == [5, 3, 4]


def test_first_fit_decreasing_and_bad_settings():
    assert first_fit_decreasing([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    assert first_fit_decreasing([5, 3], None) == [[0, 1]]
    with pytest.raises(ConfigError, match="data.batching='padded'"):
        Collator(0, "padded")
    with pytest.raises(ConfigError, match="data.pack_length=0"):
        Collator(0, "pack", 0)


@pytest.mark.parametrize("frozen_decoder", [False, True])
def test_flop_model_matches_torch_flop_counter(gqa_lm, frozen_decoder):
    """The analytic FLOPs of a training step against torch's own count of the same step. Eager
    attention, whose matmuls torch can see, over equal lengths, so padding adds nothing."""
    model = build(gqa_lm, "eager")
    model.encoder.requires_grad_(False)  # as in training: a frozen tower, forward only
    model.decoder.requires_grad_(not frozen_decoder)  # stage 1: activation gradients only
    batch = Collator(model.tokenizer.pad_token_id, "pad")(samples(model, [40] * 4))
    with FlopCounterMode(display=False) as counter:
        loss_and_grads(model, batch)
    predicted = FlopModel.of(model).step_flops(batch["num_images"], batch["num_real_tokens"], batch["sum_squared_lengths"])
    # The encoder's attention runs through CPU SDPA, which torch's counter does not see.
    encoder = model.encoder
    unseen = 4 * encoder.num_blocks * encoder.hidden_size * (encoder.num_patches + 1) ** 2 * batch["num_images"]
    assert predicted - unseen == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_uint8_images_are_normalised_by_the_model_as_by_the_processor(gqa_lm):
    """The data pipeline ships uint8 pixels (a quarter of the bytes); the model normalises them."""
    from mmkit.data.images import ImageProcessor

    model = build(gqa_lm, "packed_sdpa").eval()
    size = model.encoder.image_stats.size
    pixels = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    processor = ImageProcessor(model.encoder.image_stats)
    normalised = torch.stack([processor.preprocess(image) for image in pixels])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(pixels), model.encode_images(normalised), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen flash-attention kernel runs on CUDA only")
@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_packed_sdpa_on_cuda_takes_the_varlen_kernel_with_the_same_results(gqa_lm, monkeypatch, precision):
    """bf16 on a GPU: one varlen call per layer gives the loss and gradients of one SDPA call per
    sample (bf16 tolerances: the kernels sum in different orders). Under bf16-mixed the queries
    arrive in fp32 (the rotary embedding promotes them), and must still take the varlen kernel."""
    from mmkit.models.decoders import packed_attention

    if packed_attention.varlen_attn is None:
        pytest.skip("this PyTorch has no torch.nn.attention.varlen")
    model = build(gqa_lm, "packed_sdpa").cuda()
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    batch = Collator(model.tokenizer.pad_token_id, "pack", 96)(samples(model))
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
    calls = []
    real_varlen = packed_attention.varlen_attn
    monkeypatch.setattr(packed_attention, "varlen_attn", lambda *a, **k: calls.append(1) or real_varlen(*a, **k))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with autocast:
        varlen_loss, varlen_grads = loss_and_grads(model, batch)
    assert len(calls) == model.decoder.model.config.num_hidden_layers
    monkeypatch.setattr(packed_attention, "varlen_attn", None)
    with autocast:
        per_sample_loss, per_sample_grads = loss_and_grads(model, batch)
    assert varlen_loss == pytest.approx(per_sample_loss, rel=2e-2)
    for name, grad in per_sample_grads.items():
        difference = (varlen_grads[name].float() - grad.float()).norm() / grad.float().norm().clamp_min(1e-12)
        assert difference < 5e-2, name


def compiled_frames() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_compiled_decoder_layers_keep_the_maths_and_stop_compiling(gqa_lm):
    """decoder.compile=true: packed batches of other row counts, row lengths and samples give the
    eager model's loss and gradients. The row count and the row length each cost one recompile, at
    their first change (then they are dynamic); after that nothing compiles again, because the
    samples' lengths reach the layers as tensors, never as a list compiled code would specialise on."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = build(gqa_lm, "packed_sdpa")
    compiled = build(gqa_lm, "packed_sdpa", "decoder.compile=true")
    compiled.load_state_dict(eager.state_dict())
    items = samples(eager, [23, 5, 61, 14, 40, 9, 33, 17, 50, 8, 29, 12, 70, 44])
    collate = Collator(eager.tokenizer.pad_token_id, "pack", 96)
    batches = [collate(items[:7]), collate(items[7:]), collate(items[2:9]), collate(items[3:]), collate(items[:4])]
    shapes = [tuple(batch["input_ids"].shape) for batch in batches]
    assert len(set(shapes)) == len(shapes), shapes
    frames_after = []
    for batch in batches:
        eager_loss, eager_grads = loss_and_grads(eager, batch)
        compiled_loss, compiled_grads = loss_and_grads(compiled, batch)
        frames_after.append(compiled_frames())
        assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
        assert compiled_grads.keys() == eager_grads.keys()
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert frames_after[0] > 0, "nothing was compiled"
    assert frames_after[-1] == frames_after[-2] == frames_after[-3], f"compiled again on new shapes: {frames_after}, {shapes}"


@pytest.mark.slow
def test_generating_with_compiled_layers_compiles_nothing(gqa_lm):
    """Decoding (sample answers mid-run, evaluation) runs the compiled layers eagerly: its ever new
    shapes would otherwise use up torch.compile's recompile limit, and training batches after it
    would run uncompiled. The answers equal the eager model's."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = build(gqa_lm, "packed_sdpa").eval()
    compiled = build(gqa_lm, "packed_sdpa", "decoder.compile=true")
    compiled.load_state_dict(eager.state_dict())
    loss_and_grads(compiled, Collator(eager.tokenizer.pad_token_id, "pack", 96)(samples(eager)))
    trained_frames = compiled_frames()
    assert trained_frames > 0
    prompts = torch.randint(5, eager.image_token_id, (3, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompts)
    answers = [model.eval().generate(prompts, mask, None, max_new_tokens=20, do_sample=False) for model in (eager, compiled)]
    assert torch.equal(answers[0], answers[1])
    assert compiled_frames() == trained_frames


def test_compile_names_the_key_when_the_model_has_no_layers_to_compile():
    from mmkit.models.decoders.hf_causal_lm import compile_decoder_layers

    with pytest.raises(ConfigError, match="decoder.compile"):
        compile_decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen flash-attention kernel runs on CUDA only")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_on_cuda_trace_the_varlen_kernel(gqa_lm, checkpointing):
    """On a GPU in bf16 the whole layer compiles, attention included (with checkpointing too,
    which compiles only what traces without a break), with the eager loss and gradients."""
    from mmkit.models.decoders import packed_attention

    if packed_attention.varlen_attn is None:
        pytest.skip("this PyTorch has no torch.nn.attention.varlen")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    overrides = [f"decoder.gradient_checkpointing={str(checkpointing).lower()}"]
    eager = build(gqa_lm, "packed_sdpa", *overrides).cuda().to(torch.bfloat16).train()
    compiled = build(gqa_lm, "packed_sdpa", "decoder.compile=true", *overrides).cuda().to(torch.bfloat16).train()
    compiled.load_state_dict(eager.state_dict())
    batch = Collator(eager.tokenizer.pad_token_id, "pack", 96)(samples(eager))
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    eager_loss, eager_grads = loss_and_grads(eager, batch)
    compiled_loss, compiled_grads = loss_and_grads(compiled, batch)
    assert compiled_frames() > 0
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert compiled_loss == pytest.approx(eager_loss, rel=2e-2)
    for name, grad in eager_grads.items():
        difference = (compiled_grads[name].float() - grad.float()).norm() / grad.float().norm().clamp_min(1e-12)
        assert difference < 5e-2, name
