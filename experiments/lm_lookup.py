"""Does the zoo's tiny Llama learn to look answers up in its prompt, and after how many steps?

    python experiments/lm_lookup.py --steps 3000 --width 128 --layers 4 --data conversations
    python experiments/lm_lookup.py --device cuda --steps 20000 --width 256 --data qa --out curve.jsonl
    python experiments/lm_lookup.py --data qa --per-caption 6 --curriculum 3000 --loss replies --threads 1

Pretrains an LM like ``mmkit.zoo.llama`` does, with the size, schedule and corpus as options,
and every ``--eval-every`` steps measures ``val_caption_qa_exact_match`` (answers to val questions
with the scene given as a caption in the prompt). A VLM built on the LM cannot do better than
this from image tokens, so it is the first figure to move. Corpora: ``conversations`` (the zoo's
own: LLaVA conversations with the image replaced by a caption most of the time), ``qa`` (a caption
and ``--per-caption`` exact-answer questions per conversation, every question type) or ``mix``
(both). ``--curriculum`` grows the scenes from one object to four over its steps.
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from mmkit.datagen.rules import QUESTION_KINDS, ask
from mmkit.synth.world import captions, generate_scenes
from mmkit.training.optimizer import warmup_cosine
from mmkit.zoo import ensure_model
from mmkit.zoo.llama import _caption_qa_accuracy
from mmkit.zoo.text import conversations_as_text


def caption_questions(split: str, count: int, seed: int, per_caption: int = 1) -> list[list[dict]]:
    """Conversations of a placed caption followed by ``per_caption`` questions (each with its
    answer) about the scene; with 1, one conversation per (scene, question type). Several
    questions per caption give the lookup several supervised answers per sequence."""
    rng = random.Random(seed)
    conversations = []
    for scene in generate_scenes(split, count, seed):
        placed = [c for c in captions(scene, rng) if " in the " in c]
        asked = [qa for qa in (ask(kind, scene.objects, rng) for kind in QUESTION_KINDS * per_caption) if qa is not None]
        rng.shuffle(asked)
        for start in range(0, len(asked), per_caption):
            conversation = []
            for turn, qa in enumerate(asked[start : start + per_caption]):
                question = f"{rng.choice(placed)}\n{qa.question}" if turn == 0 else qa.question
                conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": qa.answer}]
            conversations.append((len(scene.objects), conversation))
    rng.shuffle(conversations)
    return conversations


def encode(tokenizer, conversations: list[list[dict]], replies_only: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from mmkit.data.templates.vicuna_v1 import VicunaV1Template

    template = VicunaV1Template()
    encoded = [template.encode(c, tokenizer, num_image_tokens=0) for c in conversations]
    return [(torch.tensor(e.input_ids), torch.tensor(e.labels if replies_only else e.input_ids)) for e in encoded]


def batch(pairs: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), length), pad_id)
    labels = torch.full((len(pairs), length), -100)
    mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for row, (sequence, sequence_labels) in enumerate(pairs):
        ids[row, : len(sequence)] = sequence
        labels[row, : len(sequence)] = sequence_labels
        mask[row, : len(sequence)] = 1
    return ids, labels, mask


def corpus(name: str, scenes: int, per_caption: int) -> list[tuple[int, list[dict]]]:
    """(objects in the scene, conversation) pairs; the zoo's conversations count as 0 objects,
    so a curriculum never holds them back."""
    if name == "conversations":
        return [(0, c) for c in conversations_as_text("train", scenes, seed=11)]
    if name == "qa":
        return caption_questions("train", scenes, seed=11, per_caption=per_caption)
    if name == "mix":
        return [(0, c) for c in conversations_as_text("train", scenes, seed=11)] + caption_questions(
            "train", scenes, seed=12, per_caption=per_caption)
    raise SystemExit(f"--data {name!r}: choose conversations, qa or mix")


def curriculum_pools(train: list[tuple[int, tuple]], steps: int) -> list[list[tuple]]:
    """The pools sampled from as training goes: pool k holds scenes of at most k + 1 objects, each
    pool in turn for an equal share of ``steps``; with ``steps`` 0, one pool of everything."""
    if steps == 0:
        return [[pair for _, pair in train]]
    return [[pair for objects, pair in train if objects <= most] for most in range(1, 5)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="conversations")
    parser.add_argument("--scenes", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--per-caption", type=int, default=1, help="questions asked after each caption (qa data)")
    parser.add_argument("--curriculum", type=int, default=0,
                        help="steps over which the scenes grow from 1 object to 4 (0: all sizes from the start)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-scenes", type=int, default=100)
    parser.add_argument("--loss", default="all", choices=("all", "replies"), help="train on every token or the replies only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="append one JSON line per evaluation here")
    args = parser.parse_args()

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(ensure_model("tiny-tokenizer"))
    conversations = corpus(args.data, args.scenes, args.per_caption)
    encoded = encode(tokenizer, [c for _, c in conversations], replies_only=args.loss == "replies")
    pools = curriculum_pools([(objects, pair) for (objects, _), pair in zip(conversations, encoded)], args.curriculum)
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.width, intermediate_size=int(2.75 * args.width),
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, args.warmup, args.steps))
    rng = random.Random(args.seed)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        model.train()
        pool = pools[min(len(pools) - 1, (step - 1) * len(pools) // max(args.curriculum, 1))]
        ids, labels, mask = (t.to(args.device) for t in batch(rng.sample(pool, args.batch), tokenizer.pad_token_id))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            accuracy = _caption_qa_accuracy(model, tokenizer, count=args.eval_scenes)
            record = {"step": step, "loss": round(float(loss.detach()), 4), "seconds": round(time.perf_counter() - started, 1),
                      "caption_qa": accuracy, "overall": round(sum(accuracy.values()) / len(accuracy), 1),
                      "config": vars(args)}
            print(json.dumps({k: record[k] for k in ("step", "loss", "seconds", "overall", "caption_qa")}), flush=True)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
