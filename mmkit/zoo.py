"""mmkit's own small models, built on first use and cached in HF format under ``$MMKIT_HOME/zoo``.

    python -m mmkit.zoo list
    python -m mmkit.zoo build tiny-clip tiny-llama

They use the real architectures (a CLIP vision tower, a Llama decoder with a BPE tokenizer
trained here with ``tokenizers``), so the embedded default loads them through exactly the
``from_pretrained`` path that loads openai/clip-vit-large-patch14 or lmsys/vicuna-7b-v1.5.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

from mmkit.data.datasets.base import build_once, mmkit_home
from mmkit.errors import ConfigError

# Bump a model's version when its recipe changes, so stale caches are rebuilt.
ZOO_VERSIONS = {"tiny-clip": 1, "tiny-llama": 1}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_tiny_clip(out: Path) -> None:
    """A 4-layer CLIP vision tower for 64x64 images, 8x8 patches (64 image tokens)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        image_size=64, patch_size=8, projection_dim=128,
    )
    CLIPVisionModel(config).save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)
    ).save_pretrained(out)


def train_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (every string encodable) with Llama-style special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=1024,
    )


def build_tiny_llama(out: Path) -> None:
    """A 4-layer Llama decoder (width 128) with a tokenizer trained on the synthetic world's text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmkit.data.templates.base import LLAVA_SYSTEM
    from mmkit.synth.llava_data import write_text_corpus

    corpus = write_text_corpus(count=3000, seed=0) + [LLAVA_SYSTEM, "USER: ASSISTANT: ###Human: ###Assistant:"]
    tokenizer = train_tokenizer(corpus, vocab_size=768)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


BUILDERS: dict[str, Callable[[Path], None]] = {"tiny-clip": build_tiny_clip, "tiny-llama": build_tiny_llama}


def model_folder(name: str) -> Path:
    return mmkit_home() / "zoo" / f"{name}-v{ZOO_VERSIONS[name]}"


def ensure_model(name: str) -> Path:
    """The cached folder of zoo model ``name``, built first if it is not there yet."""
    if name not in BUILDERS:
        raise ConfigError(f"zoo://{name}: unknown zoo model; available: {', '.join(sorted(BUILDERS))}")
    return build_once(model_folder(name), BUILDERS[name])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkit.zoo", description="mmkit's small built-in models")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show each model and whether it is cached")
    build = sub.add_parser("build", help="build (if missing) and cache models")
    build.add_argument("names", nargs="*", default=sorted(BUILDERS))
    args = parser.parse_args(argv)
    if args.command == "list":
        for name in sorted(BUILDERS):
            folder = model_folder(name)
            print(f"{name:<12} {'cached' if folder.is_dir() else 'not built':<10} {folder}")
        return 0
    for name in args.names:
        print(f"{name}: {ensure_model(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
