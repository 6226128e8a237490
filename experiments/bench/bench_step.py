"""Training-step throughput: mmkit against transformers' LlavaForConditionalGeneration, and padded
against length-grouped against packed batches, on LLaVA-Instruct-like sample lengths.

    python experiments/bench/bench_step.py                  # about 5 minutes on 2 CPU cores
    python experiments/bench/bench_step.py --json out.json  # the figures, for RESULTS.md

Both sides of every comparison run in this one process, on one torch thread, on the same samples,
alternating; rates are per CPU second of that thread (wall-clock rates beside them). Each side is a
plain loop of forward, backward and AdamW step over the connector and the LM (the stage-2 set;
the vision tower is frozen). Rates count real tokens only: padding is not work anyone wanted.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Shape, alternate, build_random_vlm, llava_instruct_lengths, make_samples, markdown_table, median  # noqa: E402

from mmkit.data.collate import Collator, length_grouped  # noqa: E402
from mmkit.interchange.hf_llava import to_hf_llava  # noqa: E402

MIXES = {
    # LLaVA-1.5's proportions (576 image tokens + text) scaled by 1/9: 64 image tokens + text / 9.
    "llava_1_5": {"text_scale": 1 / 9, "text_only": 0.06},
    # Text-heavier: the same conversations at a third of their length, a fifth of them text-only.
    "text_heavy": {"text_scale": 1 / 3, "text_only": 0.2},
}


def training_step(model: torch.nn.Module, forward: Callable[[dict], torch.Tensor]) -> Callable[[dict], None]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def step(batch: dict) -> None:
        forward(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def mmkit_forward(model) -> Callable[[dict], torch.Tensor]:
    return lambda batch: model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
        labels=batch["labels"], position_ids=batch["position_ids"], sample_lengths=batch["sample_lengths"],
    ).loss


def hf_forward(llava) -> Callable[[dict], torch.Tensor]:
    return lambda batch: llava(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
        labels=batch["labels"],
    ).loss


def epoch(step: Callable[[dict], None], batches: list[dict]) -> Callable[[], None]:
    def run() -> None:
        for batch in batches:
            step(batch)

    return run


def real_share(batches: list[dict]) -> float:
    return sum(b["num_real_tokens"] for b in batches) / sum(b["num_tokens"] for b in batches)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64, help="samples per mix")
    parser.add_argument("--batch", type=int, default=8, help="samples per micro-batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per side (median reported)")
    parser.add_argument("--layers", type=int, default=Shape.layers)
    parser.add_argument("--width", type=int, default=Shape.width)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 keeps a shared machine's other jobs from stalling torch's thread pool")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = Shape(layers=args.layers, width=args.width, intermediate=int(args.width * 2.6875))
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "threads": torch.get_num_threads()}

    with tempfile.TemporaryDirectory() as folder:
        cfg, model = build_random_vlm(Path(folder), shape)
    model.decoder.requires_grad_(True)  # stage 2: connector + LM; the tower stays frozen
    model.train()
    llava = to_hf_llava(cfg, model)
    llava.set_attn_implementation("sdpa")
    llava.model.vision_tower.requires_grad_(False)
    llava.train()
    pad_token = model.tokenizer.pad_token_id
    padder, packer = Collator(pad_token, "pad"), Collator(pad_token, "pack")
    mmkit_step = training_step(model, mmkit_forward(model))

    print(f"model: {shape}; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
          f"{args.samples} samples per mix, micro-batch {args.batch}, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for mix, settings in MIXES.items():
        lengths = llava_instruct_lengths(args.samples, shape.image_tokens, seed=1, **settings)
        samples = make_samples(lengths, model)
        random_batches = [samples[i : i + args.batch] for i in range(0, len(samples), args.batch)]
        batchings = {
            "padded": [padder(b) for b in random_batches],
            # LLaVA-1.5's group_by_modality_length over the whole set, as one megabatch
            "grouped": [padder(b) for b in length_grouped(samples, args.batch, random.Random(0))],
            "packed": [packer(b) for b in random_batches],
        }
        real_tokens = sum(len(s.input_ids) for s in samples)
        sides = {name: epoch(mmkit_step, batches) for name, batches in batchings.items()}
        if mix == "llava_1_5":  # the same padded batches through transformers' Llava
            sides["transformers"] = epoch(training_step(llava, hf_forward(llava)), batchings["padded"])
        for run in sides.values():  # warm-up: allocator, kernels, optimizer state
            run()
        times = alternate(sides, args.repeats)
        rate = {name: real_tokens / median(seconds["cpu"]) for name, seconds in times.items()}
        wall_rate = {name: real_tokens / median(seconds["wall"]) for name, seconds in times.items()}
        share = {name: real_share(batches) for name, batches in batchings.items()}
        ideal = 1 / share["padded"]
        entry = {
            "real_tokens": real_tokens,
            "mean_length": real_tokens / len(samples),
            "max_length": max(length for length, _ in lengths),
            "real_token_share": share,
            "real_tokens_per_s": rate,  # per CPU second (one thread)
            "real_tokens_per_wall_s": wall_rate,
            "ideal_speedup": ideal,
            "speedup": {name: rate[name] / rate["padded"] for name in batchings},
        }
        entry["share_of_ideal"] = {name: (entry["speedup"][name] - 1) / (ideal - 1) if ideal > 1 else None
                                   for name in ("grouped", "packed")}
        entry["packed_speedup_over_ideal"] = entry["speedup"]["packed"] / ideal
        if "transformers" in rate:
            entry["mmkit_over_transformers"] = rate["padded"] / rate["transformers"]
        results[mix] = entry
        for name in sides:
            rows.append([
                mix, name, f"{share.get(name, share['padded']):.1%}", f"{rate[name]:,.0f}", f"{wall_rate[name]:,.0f}",
                f"{rate[name] / rate['padded']:.2f}x" if name in batchings else f"mmkit {entry['mmkit_over_transformers']:.2f}x",
            ])
        print(f"{mix}: mean length {entry['mean_length']:.0f}, max {entry['max_length']}; padded real-token share "
              f"{share['padded']:.1%} -> ideal speed-up {ideal:.2f}x; packed reaches {entry['speedup']['packed']:.2f}x "
              f"({entry['packed_speedup_over_ideal']:.0%} of ideal); grouped {entry['speedup']['grouped']:.2f}x", flush=True)
    print()
    print(markdown_table(["mix", "side", "real-token share", "real tokens/CPU-s", "real tokens/wall-s", "vs padded mmkit"], rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
