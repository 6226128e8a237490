"""A tiny Llama, pretrained on the synthetic world's text (captions and image-free conversations
in the chat format), the way Vicuna knows language and chat before LLaVA's stages begin."""
from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mmkit.core.atomic_io import atomic_path
from mmkit.core.errors import ConfigError
from mmkit.data.templates.vicuna_v1 import VicunaV1Template
from mmkit.datagen.rules import QUESTION_KINDS
from mmkit.evaluation.synthetic import Question, ask_about, normalise
from mmkit.models.parameters import parameter_count
from mmkit.synth.world import captions, generate_scenes
from mmkit.training.optimizer import warmup_cosine
from mmkit.zoo.scale import pretraining_scale, scaled, write_quality
from mmkit.zoo.text import caption_questions, caption_statements, conversations_as_text


@dataclass(frozen=True)
class LlamaRecipe:
    """How a zoo Llama is pretrained. ``data``: ``conversations`` (the world's chat text, every
    token learned), ``qa`` (a placed caption then ``per_caption`` exact-answer questions, the
    replies learned), ``qa+statements`` (that, and as many captions followed by sentences that
    state each object's attributes, see ``mmkit.datagen.rules.statements``) or ``mix``
    (conversations and qa). ``curriculum``: steps over which the QA scenes grow from one object to
    four, so the lookup is learned where it is easy first. ``loss``: ``replies``
    (the QA answers only) or ``all`` (every QA token too: predicting a question's words from the
    caption it names is itself a lookup, many more tokens of it per sequence). ``init``: ``llama``
    (transformers' N(0, 0.02) for every weight, the output head tied to the embeddings) or
    ``torch`` (PyTorch's own module defaults: N(0, 1) embeddings, Kaiming-uniform linear layers,
    an untied output head), see ``initialise``."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    steps: int = 600
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.0
    data: str = "conversations"
    scenes: int = 4000
    per_caption: int = 1
    curriculum: int = 0
    loss: str = "replies"
    init: str = "llama"


INIT_SCHEMES = ("llama", "torch")
LLAMA_DATA = ("conversations", "qa", "qa+statements", "mix")


def initialise(model, scheme: str) -> None:
    """Re-initialise a freshly built ``LlamaForCausalLM`` by ``scheme`` (``LlamaRecipe.init``).

    Why ``torch``: with transformers' N(0, 0.02) the 2 x 128 Llama sat at chance on associative
    recall for 9500 steps, while the same model with PyTorch's defaults (the token's embedding
    then dominates the residual stream, so a key's identity survives the first layer) solved it
    within 1000 (experiments/lm_lookup.md, session 15). It needs an untied output head: tied to
    N(0, 1) embeddings the first logits are huge."""
    if scheme not in INIT_SCHEMES:
        raise ConfigError(f"LlamaRecipe.init={scheme!r}: choose one of {', '.join(INIT_SCHEMES)}")
    if scheme == "llama":
        return
    if model.config.tie_word_embeddings:
        raise ConfigError("LlamaRecipe.init='torch' needs an untied output head (tie_word_embeddings=False)")
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.reset_parameters()


# The default, and a larger one (about twice the parameters, as 13B is to 7B) for the model-size
# ablation.
RECIPES = {"tiny-llama": LlamaRecipe(), "tiny-llama-large": LlamaRecipe(width=160, layers=6, heads=5)}


def _encode_all(tokenizer, conversations: list[list[dict]], replies_only: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    template = VicunaV1Template()
    encoded = [template.encode(c, tokenizer, num_image_tokens=0) for c in conversations]
    return [(torch.tensor(e.input_ids), torch.tensor(e.labels if replies_only else e.input_ids)) for e in encoded]


def padded_batch(pairs: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, labels (-100 where not learned) and attention mask."""
    length = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), length), pad_id)
    labels = torch.full((len(pairs), length), -100)
    mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for row, (sequence, sequence_labels) in enumerate(pairs):
        ids[row, : len(sequence)] = sequence
        labels[row, : len(sequence)] = sequence_labels
        mask[row, : len(sequence)] = 1
    return ids, labels, mask


def training_pools(recipe: LlamaRecipe, tokenizer, split: str = "train") -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The encoded (ids, labels) pools sampled from as training goes: one pool without a
    curriculum, else pool k (k = 0..3) holds the captioned scenes (QA, statements) of at most k + 1
    objects (and all the chat text), each pool in turn for an equal share of ``recipe.curriculum`` steps."""
    if recipe.data not in LLAMA_DATA:
        raise ConfigError(f"LlamaRecipe.data={recipe.data!r}: choose {', '.join(LLAMA_DATA[:-1])} or {LLAMA_DATA[-1]}")
    if recipe.loss not in ("replies", "all"):
        raise ConfigError(f"LlamaRecipe.loss={recipe.loss!r}: choose replies or all")
    scenes = scaled(recipe.scenes)
    sized: list[tuple[int, tuple[torch.Tensor, torch.Tensor]]] = []
    if recipe.data in ("conversations", "mix"):
        chat = conversations_as_text(split, scenes, seed=11)
        sized += [(0, pair) for pair in _encode_all(tokenizer, chat, replies_only=False)]
    captioned = []  # (objects in the scene, conversation about its caption)
    if recipe.data in ("qa", "qa+statements", "mix"):
        captioned += caption_questions(split, scenes, seed=12, per_caption=recipe.per_caption)
    if recipe.data == "qa+statements":
        captioned += caption_statements(split, scenes, seed=13)
    encoded = _encode_all(tokenizer, [conversation for _, conversation in captioned], replies_only=recipe.loss == "replies")
    sized += zip([objects for objects, _ in captioned], encoded)
    if recipe.curriculum == 0:
        return [[pair for _, pair in sized]]
    return [[pair for objects, pair in sized if objects <= most] for most in range(1, 5)]


def optimizer_step(model, optimizer: torch.optim.Optimizer, ids: torch.Tensor, labels: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """One step on the causal-LM loss of a batch, gradients clipped to norm 1; the loss."""
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss


def fresh_llama(recipe: LlamaRecipe, tokenizer, seed: int = 0):
    """The untrained Llama of ``recipe``'s size, initialised from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.width, intermediate_size=int(2.75 * recipe.width),
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.heads,
        max_position_embeddings=1024, tie_word_embeddings=recipe.init == "llama", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    initialise(model, recipe.init)
    return model


def pretrain(recipe: LlamaRecipe, tokenizer, seed: int = 0, progress: str | None = None,
             every: int = 0, on_every: Callable[[int, float, Any], None] | None = None,
             checkpoint: Path | None = None, checkpoint_every: int = 250, device: str = "cpu"):
    """A Llama pretrained by ``recipe`` (at the zoo's scale); ``on_every(step, loss, model)`` is
    called every ``every`` steps and at the end, e.g. to measure the lookup as it forms.

    ``checkpoint``: a file the model, optimizer, schedule and random states are saved to every
    ``checkpoint_every`` steps (after that step's ``on_every``), and resumed from when it exists,
    so a pretraining run of hours that is killed loses minutes; the resumed run draws the same
    batches as an unbroken one and ends with the same weights. It also keeps the seconds trained
    up to its step (``checkpointed_seconds``), so a resumed build reports about the whole run's
    time (less the killed run's steps after its last save).

    ``device``: where to train (``cuda`` on a GPU). The model is initialised on the CPU either way,
    so a seed starts from the same weights on any device, and a checkpoint resumes on any."""
    if checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every={checkpoint_every}: save at least every step (1 or more)")
    pools = training_pools(recipe, tokenizer)
    steps, curriculum = scaled(recipe.steps), scaled(recipe.curriculum) if recipe.curriculum else 0
    model = fresh_llama(recipe, tokenizer, seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, min(recipe.warmup, steps), steps))
    rng = random.Random(seed)
    identity = {"recipe": dataclasses.asdict(recipe), "seed": seed, "scale": pretraining_scale(),
                "steps": steps, "vocabulary": len(tokenizer)}
    done, seconds_before = 0, 0.0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False, map_location="cpu")
        if state["identity"] != identity:
            raise ConfigError(f"checkpoint {checkpoint} is of another pretraining run ({state['identity']}, not "
                              f"{identity}); remove it to start afresh")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        rng.setstate(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        done, seconds_before = state["step"], state.get("seconds", 0.0)
        print(f"{progress or 'pretraining'}: resuming from step {done} of {steps} ({checkpoint})", file=sys.stderr, flush=True)
    started = time.perf_counter()
    for step in tqdm(range(done + 1, steps + 1), desc=progress, unit="step", disable=progress is None,
                     initial=done, total=steps):
        model.train()
        pool = pools[min(len(pools) - 1, (step - 1) * len(pools) // max(curriculum, 1))]
        ids, labels, mask = (tensor.to(device) for tensor in
                             padded_batch(rng.sample(pool, min(recipe.batch, len(pool))), tokenizer.pad_token_id))
        loss = optimizer_step(model, optimizer, ids, labels, mask)
        schedule.step()
        if on_every is not None and (step == steps or (every and step % every == 0)):
            model.eval()
            on_every(step, float(loss.detach()), model)
        if checkpoint is not None and (step % checkpoint_every == 0 or step == steps):
            with atomic_path(checkpoint) as temporary:
                torch.save({"identity": identity, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "schedule": schedule.state_dict(), "sampler": rng.getstate(),
                            "torch_rng": torch.get_rng_state(),
                            "seconds": seconds_before + time.perf_counter() - started}, temporary)
    model.eval()
    return model


def checkpointed_seconds(checkpoint: Path | None) -> float:
    """The seconds of pretraining that ``checkpoint`` holds (0 when there is none)."""
    if checkpoint is None or not checkpoint.is_file():
        return 0.0
    return float(torch.load(checkpoint, weights_only=False, map_location="cpu").get("seconds", 0.0))  # a GPU run's too


def _perplexity(model, sequences: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> float:
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(sequences), 64):
            ids, labels, mask = padded_batch(sequences[start : start + 64], pad_id)
            tokens = int((labels[:, 1:] != -100).sum())
            total_loss += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * tokens
            total_tokens += tokens
    return math.exp(total_loss / total_tokens)


def caption_qa_answers(model, tokenizer, count: int = 60) -> list[tuple[Question, bool]]:
    """(question, answered exactly) for the questions about ``count`` val scenes when the LM is
    given the scene's caption (with every object's place) as text in place of the image: can it
    look the answer up in its prompt? A VLM built on this LM can only do as well once image tokens
    stand in for the caption."""

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
    answers = [tokenizer.decode(row[length:], skip_special_tokens=True) for row in generated.cpu()]
    return [(question, normalise(answer) == normalise(question.answer)) for question, answer in zip(questions, answers)]


def percent_by(answered: list[tuple[Question, bool]], key: Callable[[Question], Any]) -> dict[Any, float]:
    """Exact-match % of ``answered`` per ``key(question)``."""
    hits: dict[Any, list[bool]] = {}
    for question, correct in answered:
        hits.setdefault(key(question), []).append(correct)
    return {group: round(100 * sum(found) / len(found), 1) for group, found in hits.items()}


def caption_qa_accuracy(model, tokenizer, count: int = 60) -> dict[str, float]:
    """Exact-match % per question type of ``caption_qa_answers``."""
    return percent_by(caption_qa_answers(model, tokenizer, count), lambda question: question.kind)


def build_tiny_llama(out: Path, tokenizer_folder: Path, size: str = "tiny-llama", checkpoint: Path | None = None) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    recipe = RECIPES[size]
    val = _encode_all(tokenizer, conversations_as_text("val", scaled(200), seed=11), replies_only=False)
    # A build resumed after a kill reports the killed part's time too.
    started = time.perf_counter() - checkpointed_seconds(checkpoint)
    model = pretrain(recipe, tokenizer, progress=f"zoo: {size} pretraining", checkpoint=checkpoint)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_quality(out, {
        "pretraining": f"causal LM, {scaled(recipe.steps)} steps x {recipe.batch} sequences ({recipe.data})",
        "recipe": dataclasses.asdict(recipe),
        "size": {"width": recipe.width, "layers": recipe.layers, "heads": recipe.heads,
                 "parameters": parameter_count(model)},
        "val_perplexity": round(_perplexity(model, val, tokenizer.pad_token_id), 3),
        "val_perplexity_untrained": round(_perplexity(fresh_llama(recipe, tokenizer).eval(), val, tokenizer.pad_token_id), 1),
        "val_caption_qa_exact_match": caption_qa_accuracy(model, tokenizer),
        "train_seconds": round(time.perf_counter() - started, 1),
    })
