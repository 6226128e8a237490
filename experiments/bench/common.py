"""What the benchmarks share: random-weight models of a chosen shape, LLaVA-like sample lengths,
and a timer that alternates the two sides of a comparison so machine noise hits both alike."""
from __future__ import annotations

import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from mmkit.data.samples import EncodedSample  # noqa: E402
from mmkit.data.templates.llava_tokenization import IGNORE_INDEX  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """A CLIP vision tower + Llama decoder shape. The default is tiny but not trivial: 64 image
    tokens (LLaVA-1.5's 576 / 9) and a 4-layer, 256-wide decoder with an 8K vocabulary."""

    image_size: int = 112
    patch_size: int = 14
    vision_width: int = 192
    vision_layers: int = 4
    width: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 688
    vocab: int = 8000

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_random_vlm(folder: Path, shape: Shape, attention: str = "packed_sdpa", overrides: list[str] | None = None):
    """(cfg, model): mmkit's model over a random CLIP tower and a random Llama saved in ``folder``."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from mmkit.core.config import compose
    from mmkit.models.build import build_model
    from mmkit.models.decoders.hf_causal_lm import prepare_tokenizer

    torch.manual_seed(0)
    vision = folder / "vision"
    CLIPVisionModel(
        CLIPVisionConfig(
            image_size=shape.image_size, patch_size=shape.patch_size, hidden_size=shape.vision_width,
            intermediate_size=4 * shape.vision_width, num_hidden_layers=shape.vision_layers,
            num_attention_heads=max(1, shape.vision_width // 64),
        )
    ).save_pretrained(vision)
    CLIPImageProcessor(size={"shortest_edge": shape.image_size}, crop_size=shape.image_size).save_pretrained(vision)
    language = folder / "language"
    tokenizer = prepare_tokenizer("zoo://tiny-tokenizer")
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=max(shape.vocab, len(tokenizer)), hidden_size=shape.width, intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    ).save_pretrained(language)
    tokenizer.save_pretrained(language)
    cfg = compose(["encoder=clip_vit_l14_336", f"encoder.path={vision}", f"decoder.path={language}",
                   f"decoder.attn_implementation={attention}", *(overrides or [])])
    return cfg, build_model(cfg)


def llava_instruct_lengths(
    count: int, image_tokens: int, text_scale: float = 1 / 9, text_only: float = 0.06, max_length: int = 2048, seed: int = 0
) -> list[tuple[int, bool]]:
    """(tokens, has image) per sample, shaped like LLaVA-1.5's 665K mix: most samples carry an
    image; turns per conversation are geometric (many short VQA turns, a few long ones); answers
    are log-normal with a heavy tail. ``text_scale`` shrinks the text as the image tokens were
    shrunk (576 -> 64 is 1/9), so text and image keep LLaVA-1.5's proportions."""
    rng = random.Random(seed)
    lengths = []
    for _ in range(count):
        has_image = rng.random() >= text_only
        turns = min(12, 1 + int(math.log(1 - rng.random()) / math.log(0.65)))
        text = 40  # system prompt and separators
        for _ in range(turns):
            text += rng.lognormvariate(math.log(18), 0.5) + rng.lognormvariate(math.log(45), 1.1)
        if not has_image:
            text *= 2.5  # the text-only (ShareGPT) part is long multi-turn chat
        tokens = max(8, int(text * text_scale)) + (image_tokens if has_image else 0)
        lengths.append((min(tokens, max_length), has_image))
    return lengths


def make_samples(lengths: list[tuple[int, bool]], model, seed: int = 0) -> list[EncodedSample]:
    """Random token ids of the given lengths, the image's tokens after the first one, loss on the
    second half of each sample (the replies), and a random image per image sample."""
    generator = torch.Generator().manual_seed(seed)
    size = model.encoder.image_stats.size
    image_token, image_tokens = model.image_token_id, model.num_image_tokens
    rows = model.decoder.model.get_input_embeddings().num_embeddings
    # A model built from its configs (build_model(cfg, weights="shapes")) has no tokenizer: every row is a token.
    vocab = rows if model.tokenizer is None else min(len(model.tokenizer), rows)
    samples = []
    for index, (length, has_image) in enumerate(lengths):
        text = length - (image_tokens if has_image else 0)
        ids = torch.randint(4, vocab, (text,), generator=generator)
        ids[ids == image_token] = 4
        if has_image:
            ids = torch.cat([ids[:1], torch.full((image_tokens,), image_token), ids[1:]])
        labels = ids.clone()
        labels[: len(ids) // 2] = IGNORE_INDEX
        pixels = torch.randn(3, size, size, generator=generator) if has_image else None
        samples.append(EncodedSample(f"{index:06d}", ids, labels, pixels))
    return samples


def alternate(sides: dict[str, Callable[[], None]], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds per call of each side, called in turn ``repeats`` times (order
    reversed every round). With one torch thread, CPU seconds are blind to waiting for a core
    that another job holds, so they are the steadier figure on a shared machine."""
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in sides}
    names = list(sides)
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            wall, cpu = time.perf_counter(), time.process_time()
            sides[name]()
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
