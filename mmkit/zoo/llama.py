"""A tiny Llama, pretrained on the synthetic world's text (captions and image-free conversations
in the chat format), the way Vicuna knows language and chat before LLaVA's stages begin."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mmkit.data.templates.vicuna_v1 import VicunaV1Template
from mmkit.datagen.rules import QUESTION_KINDS
from mmkit.evaluation.synthetic import ask_about, normalise
from mmkit.models.parameters import parameter_count
from mmkit.synth.world import captions, generate_scenes
from mmkit.training.optimizer import warmup_cosine
from mmkit.zoo.scale import scaled, write_quality
from mmkit.zoo.text import conversations_as_text

# (width, layers, heads): the default, and a larger one (about twice the parameters, as 13B is to
# 7B) for the model-size ablation.
SIZES = {"tiny-llama": (128, 4, 4), "tiny-llama-large": (160, 6, 5)}
STEPS, BATCH, LR, WARMUP = 600, 32, 2e-3, 50


def _encode_all(tokenizer, conversations: list[list[dict]]) -> list[torch.Tensor]:
    template = VicunaV1Template()
    return [torch.tensor(template.encode(c, tokenizer, num_image_tokens=0).input_ids) for c in conversations]


def _batch(sequences: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id)
    labels = torch.full((len(sequences), length), -100)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        labels[row, : len(sequence)] = sequence
    return ids, labels


def _perplexity(model, sequences: list[torch.Tensor], pad_id: int) -> float:
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(sequences), 64):
            ids, labels = _batch(sequences[start : start + 64], pad_id)
            tokens = int((labels[:, 1:] != -100).sum())
            total_loss += float(model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss) * tokens
            total_tokens += tokens
    return math.exp(total_loss / total_tokens)


def _caption_qa_accuracy(model, tokenizer, count: int = 60) -> dict[str, float]:
    """Exact-match accuracy per question type when the LM is given a val scene's caption (with
    every object's place) as text in place of the image: can it look the answer up in its prompt?
    A VLM built on this LM can only do as well once image tokens stand in for the caption."""

    template = VicunaV1Template()
    rng = random.Random(0)
    questions = ask_about(generate_scenes("val", count, seed=3), QUESTION_KINDS, seed=3)
    prompts = []
    for question in questions:
        caption = next(c for c in captions(question.scene, rng) if " in the " in c)
        turn = {"from": "human", "value": f"{caption}\n{question.question}"}
        prompts.append(template.encode([turn], tokenizer, num_image_tokens=0, for_generation=True).input_ids)
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), tokenizer.pad_token_id)
    attention_mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, length - len(prompt) :] = 1
    with torch.no_grad():
        generated = model.generate(
            ids.to(model.device), attention_mask=attention_mask.to(model.device), max_new_tokens=12, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    hits: dict[str, list[bool]] = {}
    for question, row in zip(questions, generated.cpu()):
        answer = tokenizer.decode(row[length:], skip_special_tokens=True)
        hits.setdefault(question.kind, []).append(normalise(answer) == normalise(question.answer))
    return {kind: round(100 * sum(found) / len(found), 1) for kind, found in hits.items()}


def build_tiny_llama(out: Path, tokenizer_folder: Path, size: str = "tiny-llama") -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    train = _encode_all(tokenizer, conversations_as_text("train", scaled(4000), seed=11))
    val = _encode_all(tokenizer, conversations_as_text("val", scaled(200), seed=11))
    steps = scaled(STEPS)
    width, layers, heads = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=int(2.75 * width), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    initial_perplexity = _perplexity(model, val, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, min(WARMUP, steps), steps))
    rng = random.Random(0)
    started = time.perf_counter()
    model.train()
    for _ in tqdm(range(steps), desc="zoo: tiny-llama pretraining", unit="step"):
        ids, labels = _batch(rng.sample(train, min(BATCH, len(train))), tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_quality(out, {
        "pretraining": f"causal LM, {steps} steps x {BATCH} conversations of the world's text",
        "size": {"width": width, "layers": layers, "heads": heads,
                 "parameters": parameter_count(model)},
        "val_perplexity": round(_perplexity(model, val, tokenizer.pad_token_id), 3),
        "val_perplexity_untrained": round(initial_perplexity, 1),
        "val_caption_qa_exact_match": _caption_qa_accuracy(model, tokenizer),
        "train_seconds": round(time.perf_counter() - started, 1),
    })
