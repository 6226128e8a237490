"""A minimal lookup testbed: does a tiny Llama learn to bind an attribute to the object a question
names, and how many steps does it take? Screens levers for issue 23 in minutes, not hours.

    python experiments/lookup_toy.py --format placed --steps 6000                 # the zoo LM's task, word-level
    python experiments/lookup_toy.py --format keyfirst --direct --steps 6000      # the easiest form: an induction head
    python experiments/lookup_toy.py --recall 8000 --steps 8000 --lr 3e-3         # associative recall, outside the world

Word-level tokens (31 words, plus 512 recall tokens) and sequences of 20-85 tokens, so a step
costs a fraction of ``lm_lookup.py``'s; the model and its optimizer step are the zoo's
(``LlamaForCausalLM``, tied embeddings). Tasks:

- the world: 1-4 objects (size, colour, shape; each in its own quadrant) in a caption, then
  ``--per`` questions (the colour of the shape, the place or size of the colour and shape), the
  answers learned. ``--format placed``: ``a small red circle in the top left`` and ``in the top
  left there is a small red circle``, as the world's placed captions (the attribute is read from
  before or after the named object); ``keyfirst``: ``circle red small top left`` (a shape's colour
  right after it). ``--direct``: the answer follows the question's last word, with no ``? a :``
  between them; with ``keyfirst``, a colour question then ends on the shape whose colour comes
  next in the caption, the form one induction head answers (position and size questions name
  the object by two words and read an answer further on).
- ``--recall N``: the first N steps are multi-query associative recall: 8 key-value pairs of 256
  keys and 256 values, then every key again, each followed by its value (learned). Chance, for a
  model that only knows which values are in the context and not yet asked, is about 34%.

Each evaluation (``--every``) prints one JSON line: exact match per question type on 400
answers about scenes of two or more objects (where only binding answers; one object needs none;
about 60 colour, 170 position and 170 size answers) and the recall accuracy on 200 sequences.
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from mmkit.zoo.llama import INIT_SCHEMES, initialise, optimizer_step, padded_batch

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
QUADRANTS = (("top", "left"), ("top", "right"), ("bottom", "left"), ("bottom", "right"))
RECALL_PAIRS, RECALL_SYMBOLS = 8, 256
WORDS = (["<pad>", "<eos>", "a", "is", "in", "the", "there", ",", ".", "q", ":", "?", "what", "colour", "where", "or"]
         + list(COLOURS) + list(SHAPES) + list(SIZES) + ["top", "bottom", "left", "right"]
         + [f"k{i}" for i in range(RECALL_SYMBOLS)] + [f"v{i}" for i in range(RECALL_SYMBOLS)])
TOKEN = {word: index for index, word in enumerate(WORDS)}
PAD, EOS = TOKEN["<pad>"], TOKEN["<eos>"]

Example = tuple[list[int], list[int]]  # token ids, labels (-100 where not learned)


def tokens(text: str) -> list[int]:
    return [TOKEN[word] for word in text.split()]


def random_scene(rng: random.Random, most: int = 4) -> list[tuple[str, str, str, tuple[str, str]]]:
    """(size, colour, shape, quadrant) of 1 to ``most`` objects, each in its own quadrant."""
    return [(rng.choice(SIZES), rng.choice(COLOURS), rng.choice(SHAPES), quadrant)
            for quadrant in rng.sample(QUADRANTS, rng.randint(1, most))]


def caption(scene, form: str, rng: random.Random) -> str:
    parts = []
    for size, colour, shape, (row, column) in scene:
        if form == "keyfirst":
            parts.append(f"{shape} {colour} {size} {row} {column}")
        elif rng.random() < 0.5:
            parts.append(f"a {size} {colour} {shape} in the {row} {column}")
        else:
            parts.append(f"in the {row} {column} there is a {size} {colour} {shape}")
    return " , ".join(parts) + " ."


def questions(scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(type, question, answer) for every object the question's words single out."""
    asked = []
    for size, colour, shape, (row, column) in scene:
        if sum(other[2] == shape for other in scene) == 1:
            asked.append(("colour", f"what colour is the {shape}", colour))
        if sum(other[1:3] == (colour, shape) for other in scene) == 1:
            asked.append(("position", f"where is the {colour} {shape}", f"{row} {column}"))
            asked.append(("size", f"is the {colour} {shape} small or large", size))
    rng.shuffle(asked)
    return asked


def prompt(question: str, direct: bool) -> str:
    return f"q : {question}" if direct else f"q : {question} ? a :"


def world_example(rng: random.Random, args: argparse.Namespace) -> Example:
    scene = random_scene(rng)
    ids = tokens(caption(scene, args.format, rng))
    labels = [-100] * len(ids)
    for _, question, answer in questions(scene, rng)[: args.per]:
        direct = args.direct or (args.direct_share > 0 and rng.random() < args.direct_share)
        asked, answered = tokens(prompt(question, direct)), tokens(answer) + [EOS]
        ids += asked + answered
        labels += [-100] * len(asked) + answered
    return ids, labels


def recall_example(rng: random.Random) -> Example:
    keys = rng.sample(range(RECALL_SYMBOLS), RECALL_PAIRS)
    values = [rng.randrange(RECALL_SYMBOLS) for _ in keys]
    ids = [TOKEN[f"{kind}{symbol}"] for pair in zip(keys, values) for kind, symbol in zip("kv", pair)] + [TOKEN["."]]
    labels = [-100] * len(ids)
    for index in rng.sample(range(RECALL_PAIRS), RECALL_PAIRS):
        ids += [TOKEN[f"k{keys[index]}"], TOKEN[f"v{values[index]}"]]
        labels += [-100, TOKEN[f"v{values[index]}"]]
    return ids, labels


def batch(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return padded_batch([(torch.tensor(ids), torch.tensor(labels)) for ids, labels in examples], PAD)


@torch.no_grad()
def world_accuracy(model, args: argparse.Namespace, answers: int = 400) -> dict[str, float]:
    """Exact match per type on scenes of 2+ objects. Greedy decoding answers exactly when every
    answer token (and the end) is the argmax given the right prefix, so one forward pass tells."""
    rng = random.Random(123)
    rows = []
    while len(rows) < answers:
        scene = random_scene(rng)
        if len(scene) < 2:
            continue
        context = caption(scene, args.format, rng)
        for kind, question, answer in questions(scene, rng)[:2]:
            asked = tokens(f"{context} {prompt(question, args.direct)}")
            rows.append((kind, asked + tokens(answer) + [EOS], len(asked)))
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(rows), 128):
        chunk = rows[start : start + 128]
        ids, _, mask = batch([(sequence, sequence) for _, sequence, _ in chunk])
        predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        for row, (kind, sequence, asked) in enumerate(chunk):
            correct = all(int(predicted[row, at - 1]) == sequence[at] for at in range(asked, len(sequence)))
            hits.setdefault(kind, []).append(correct)
    return {kind: round(100 * sum(found) / len(found), 1) for kind, found in sorted(hits.items())}


@torch.no_grad()
def recall_accuracy(model, sequences: int = 200) -> float:
    rng = random.Random(5)
    ids, labels, mask = batch([recall_example(rng) for _ in range(sequences)])
    predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)[:, :-1]
    learned = labels[:, 1:] != -100
    return round(100 * float((predicted == labels[:, 1:])[learned].float().mean()), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--init", type=float, default=0.02, help="std of the weights' initialisation (LlamaConfig.initializer_range)")
    parser.add_argument("--init-scheme", choices=INIT_SCHEMES, default="llama",
                        help="llama: N(0, --init) weights, tied head; torch: PyTorch's defaults, untied head (LlamaRecipe.init)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--per", type=int, default=3, help="questions per caption")
    parser.add_argument("--format", choices=("placed", "keyfirst"), default="placed")
    parser.add_argument("--direct", action="store_true", help="the answer right after the question's last word")
    parser.add_argument("--direct-share", type=float, default=0.0,
                        help="without --direct: the share of training questions asked in the direct form (evaluated without it)")
    parser.add_argument("--recall", type=int, default=0, help="steps of associative recall before the world's questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="append one JSON line per evaluation here")
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(WORDS), hidden_size=args.width, intermediate_size=int(2.75 * args.width),
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=256, tie_word_embeddings=args.init_scheme == "llama", initializer_range=args.init,
        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
    ))
    initialise(model, args.init_scheme)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 200))
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        examples = [recall_example(rng) if step <= args.recall else world_example(rng, args) for _ in range(args.batch)]
        loss = optimizer_step(model, optimizer, *batch(examples))
        warmup.step()
        if step % args.every == 0 or step == args.steps:
            model.eval()
            record = {"step": step, "loss": round(float(loss.detach()), 3), "seconds": round(time.perf_counter() - started),
                      "world": world_accuracy(model, args), "recall": recall_accuracy(model), "options": vars(args)}
            model.train()
            print(json.dumps({key: record[key] for key in ("step", "loss", "seconds", "world", "recall")}), flush=True)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
