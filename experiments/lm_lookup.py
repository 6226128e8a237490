"""Does the zoo's tiny Llama learn to look answers up in its prompt, and after how many steps?

    python experiments/lm_lookup.py --steps 3000 --width 128 --layers 4 --data conversations
    python experiments/lm_lookup.py --data qa --per-caption 6 --curriculum 3000 --threads 1 --out curve.jsonl \
        --checkpoint run.pt --save lm/    # a run of hours: killed, the same command goes on from run.pt
    python experiments/lm_lookup.py --data qa --steps 60000 --device cuda --checkpoint run.pt   # on a GPU; resumes on any device

Pretrains an LM with ``mmkit.zoo.llama``'s own ``pretrain``, each field of its ``LlamaRecipe`` an
option (the defaults are the shipped tiny-llama's), and every ``--eval-every`` steps measures ``val_caption_qa_exact_match`` (answers to val questions
with the scene given as a caption in the prompt). A VLM built on the LM cannot do better than
this from image tokens, so it is the first figure to move. ``--data``: ``conversations`` (LLaVA
conversations with the image replaced by a caption most of the time, every token learned),
``qa`` (a caption and ``--per-caption`` exact-answer questions, the replies learned) or ``mix``
(both). ``--curriculum`` grows the QA scenes from one object to four over its steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from mmkit.zoo import ensure_model
from mmkit.zoo.llama import RECIPES, LlamaRecipe, caption_qa_answers, percent_by, pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(LlamaRecipe):
        default = getattr(RECIPES["tiny-llama"], field.name)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-scenes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="where to train: cpu, or cuda on a GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="append one JSON line per evaluation here")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="save progress here every 250 steps and resume from it when it exists")
    parser.add_argument("--save", type=Path, default=None, help="save the pretrained LM (HF folder) here at the end")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = LlamaRecipe(**{field.name: getattr(args, field.name) for field in dataclasses.fields(LlamaRecipe)})
    tokenizer = AutoTokenizer.from_pretrained(ensure_model("tiny-tokenizer"))
    started = time.perf_counter()

    def measure(step: int, loss: float, model) -> None:
        answered = caption_qa_answers(model, tokenizer, count=args.eval_scenes)
        accuracy = percent_by(answered, lambda question: question.kind)
        # One object needs no binding (any attribute in the caption is its); from two on, an
        # answer must come from the object the question names: the lookup this script watches for.
        by_objects = percent_by(answered, lambda question: len(question.scene.objects))
        record = {"step": step, "loss": round(loss, 4), "seconds": round(time.perf_counter() - started, 1),
                  "caption_qa": accuracy, "overall": round(sum(accuracy.values()) / len(accuracy), 1),
                  "by_objects": dict(sorted(by_objects.items())), "recipe": dataclasses.asdict(recipe), "seed": args.seed}
        print(json.dumps({k: record[k] for k in ("step", "loss", "seconds", "overall", "caption_qa", "by_objects")}), flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    model = pretrain(recipe, tokenizer, seed=args.seed, every=args.eval_every, on_every=measure, checkpoint=args.checkpoint,
                    device=args.device)
    if args.save:
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)


if __name__ == "__main__":
    main()
