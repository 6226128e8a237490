"""Generated tokens/s: mmkit's generation path vs transformers' ``generate()`` on the same weights.

    python experiments/bench/bench_generate.py                       # defaults: ~2-3 min on 2 busy cores
    python experiments/bench/bench_generate.py --new-tokens 4 --repeats 1 --json out.json   # smoke test

Builds a small random run folder (a CLIP vision tower, an mlp2x_gelu connector and a Llama decoder,
random large-ish init so greedy replies do not collapse onto one token), exports it with
``mmkit.interchange.hf_llava.export_run`` and loads both sides from disk:

* mmkit: ``load_run`` + ``build_generator`` (the ``AnswerGenerator`` every evaluator and the server
  use): ``_inputs`` (template + tokenisation + image processing) then ``_generate``
  (``VisionLanguageModel.generate``: embed, then the decoder's HF ``generate`` on ``inputs_embeds``);
  that is ``AnswerGenerator.replies`` without the final text decode.
* transformers: ``LlavaForConditionalGeneration.from_pretrained`` + the exported processor and chat
  template: ``apply_chat_template`` + ``processor(text, images)`` then ``model.generate(**inputs)``.

Same prompts and images, greedy, exactly ``--new-tokens`` new tokens per row on both sides
(``min_new_tokens = max_new_tokens`` with the same eos/pad ids, so EOS never ends a row early), at
each ``--batch-sizes``. One warm-up per side and batch size, then ``--repeats`` timed rounds whose
A/B order alternates (mmkit first on even rounds, transformers first on odd ones) so a burst of load
from other work on the machine does not land on one side only. A round is what a caller pays:
prompt + image preprocessing, then generation. tok/s = batch x new tokens / the best round's seconds
(other work on the machine only ever adds time); ``paired ratio`` is the median over rounds of
transformers' seconds / mmkit's seconds in the same round, the two runs being adjacent in time;
``CPU-time ratio`` is ``ratio`` from process CPU time, which does not count the time spent waiting
for a core (with one torch thread, the default, CPU time is close to the work done); ``prep ms`` is
the best preprocessing time alone. The prompt ids and the generated ids of the two
sides are compared (``ids equal``); the script exits 1 when they differ.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

QUESTIONS = [
    "What colour is the circle?",
    "How many objects are in the image?",
    "Describe the image in detail.",
    "Is there a square to the left of the triangle? Answer yes or no.",
    "What shape is in the top left corner of the picture?",
    "Where is the large blue object?",
    "What is the background colour?",
    "List every object you can see, from left to right, with its colour and size.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per row, exactly (EOS disabled)")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per batch size (after one warm-up)")
    parser.add_argument("--hidden", type=int, default=256, help="decoder hidden size")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--heads", type=int, default=4, help="decoder attention heads")
    parser.add_argument("--vision-hidden", type=int, default=128, help="CLIP vision tower hidden size")
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64, help="64 with patch 8: 64 image tokens per prompt")
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--init-range", type=float, default=0.1, help="decoder initializer_range (random weights)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default). 1 by default: on a small shared machine, OpenMP "
                             "threads waiting on each other made one generate call 5-30x slower and the timings useless")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=None, help="where the run and HF folders go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--profile", choices=["none", "mmkit", "hf"], default="none",
                        help="cProfile one generate round of this side at the largest batch size, print the top 25")
    return parser.parse_args(argv)


# --- building the model -------------------------------------------------------------------------

def build_run(root: Path, args: argparse.Namespace) -> Path:
    """A run folder of the default recipe (finetune stage only) over random towers of the given sizes."""
    from omegaconf import OmegaConf
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from mmkit.core.config import compose
    from mmkit.models.build import build_model
    from mmkit.models.checkpoint_io import save_stage_weights
    from mmkit.models.decoders.hf_causal_lm import prepare_tokenizer

    run = root / "run"
    torch.manual_seed(0)
    vision = root / "vision"
    vision_config = CLIPVisionConfig(
        hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden, num_hidden_layers=args.vision_layers,
        num_attention_heads=max(1, args.vision_hidden // 32), image_size=args.image_size, patch_size=args.patch_size,
    )
    CLIPVisionModel(vision_config).save_pretrained(vision)
    size = args.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(vision)

    tokenizer = prepare_tokenizer("zoo://tiny-tokenizer")
    lm = root / "lm"
    lm_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=(args.hidden * 11 // 4 + 63) // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=1024, initializer_range=args.init_range, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(lm_config).save_pretrained(lm)
    tokenizer.save_pretrained(lm)

    cfg = compose([f"encoder.path={vision}", f"decoder.path={lm}", "evaluation=none"])
    model = build_model(cfg)
    with torch.no_grad():
        for parameter in model.connector.parameters():
            parameter.normal_(std=0.3)
    names = {name for name in model.state_dict() if name.startswith("connector.")}
    save_stage_weights(model.state_dict(), names, run / "finetune", {"made_by": "bench_generate"})
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return run


def images(count: int, size: int):
    """Synthetic scenes rendered at the encoder's size (no resize, so both processors agree exactly)."""
    from mmkit.synth.world import generate_scenes, render

    return [render(scene, size) for scene in generate_scenes("test", count, seed=0)]


# --- the two sides ------------------------------------------------------------------------------

class MMKitSide:
    name = "mmkit"

    def __init__(self, run: Path, device: torch.device, new_tokens: int) -> None:
        from mmkit.inference.from_run import build_generator
        from mmkit.inference.generation import Sampling
        from mmkit.models.load import load_run

        cfg, model = load_run(run)
        self.generator = build_generator(cfg, model.to(device), batch_size=64, max_new_tokens=new_tokens)
        self.sampling = Sampling(max_new_tokens=new_tokens)
        self.new_tokens = new_tokens

    def prepare(self, questions: list[str], pictures: list) -> dict:
        from mmkit.inference.generation import Prompt

        prompts = [Prompt([{"from": "human", "value": f"<image>\n{q}"}], image) for q, image in zip(questions, pictures)]
        return self.generator._inputs(prompts, with_images=True)

    def generate(self, inputs: dict) -> torch.Tensor:
        # min_new_tokens: EOS is masked until new_tokens, so every row runs to exactly new_tokens.
        return self.generator._generate(inputs, self.sampling, min_new_tokens=self.new_tokens)

    @staticmethod
    def prompt_ids(inputs: dict) -> list[list[int]]:
        return _unpadded(inputs["input_ids"], inputs["attention_mask"])


class HFSide:
    name = "transformers"

    def __init__(self, hf_dir: Path, device: torch.device, new_tokens: int) -> None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.model = LlavaForConditionalGeneration.from_pretrained(hf_dir).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(hf_dir)
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        self.device = device
        self.kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
                       "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}

    def prepare(self, questions: list[str], pictures: list) -> dict:
        texts = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                add_generation_prompt=True, tokenize=False,
            )
            for q in questions
        ]
        return dict(self.processor(text=texts, images=pictures, return_tensors="pt", padding=True))

    def generate(self, inputs: dict) -> torch.Tensor:
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            out = self.model.generate(**inputs, **self.kwargs)
        return out[:, inputs["input_ids"].shape[1]:]

    @staticmethod
    def prompt_ids(inputs: dict) -> list[list[int]]:
        return _unpadded(inputs["input_ids"], inputs["attention_mask"])


def _unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(side, questions: list[str], pictures: list, device: torch.device) -> tuple[float, float, float, torch.Tensor]:
    """(wall seconds preparing, wall seconds generating, CPU seconds in all, new ids) for one batch, end to end."""
    _sync(device)
    cpu = time.process_time()
    start = time.perf_counter()
    inputs = side.prepare(questions, pictures)
    prepared = time.perf_counter()
    out = side.generate(inputs)
    _sync(device)
    return prepared - start, time.perf_counter() - prepared, time.process_time() - cpu, out.cpu()


# --- the benchmark ------------------------------------------------------------------------------

def bench_batch(sides: list, batch: int, pictures: list, args: argparse.Namespace, device: torch.device) -> dict:
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]
    pictures = [pictures[i % len(pictures)] for i in range(batch)]
    tokens = batch * args.new_tokens
    prep: dict[str, list[float]] = {s.name: [] for s in sides}
    gen: dict[str, list[float]] = {s.name: [] for s in sides}
    cpu: dict[str, list[float]] = {s.name: [] for s in sides}
    outputs: dict[str, torch.Tensor] = {}
    for side in sides:  # warm-up (first-call allocations, lazy imports, processor caches)
        outputs[side.name] = _timed_call(side, questions, pictures, device)[3]
    for round_ in range(args.repeats):
        for side in (sides if round_ % 2 == 0 else sides[::-1]):
            prep_s, gen_s, cpu_s, out = _timed_call(side, questions, pictures, device)
            prep[side.name].append(prep_s)
            gen[side.name].append(gen_s)
            cpu[side.name].append(cpu_s)
            assert torch.equal(out, outputs[side.name]), f"{side.name}: greedy output changed between rounds"
    mm, hf = sides
    shapes = {s.name: tuple(outputs[s.name].shape) for s in sides}
    prompts_equal = mm.prompt_ids(mm.prepare(questions, pictures)) == hf.prompt_ids(hf.prepare(questions, pictures))
    ids_equal = shapes[mm.name] == shapes[hf.name] == (batch, args.new_tokens) and torch.equal(
        outputs[mm.name], outputs[hf.name])
    total = {name: [p + g for p, g in zip(prep[name], gen[name])] for name in prep}
    result: dict[str, Any] = {"batch": batch, "new_tokens": args.new_tokens, "prompts_equal": prompts_equal,
                              "ids_equal": bool(ids_equal), "shapes": {k: list(v) for k, v in shapes.items()},
                              "distinct_tokens": len(set(outputs[mm.name].flatten().tolist()))}
    for name, prep_s in prep.items():
        result[f"prep_{name}_s"] = [round(v, 5) for v in prep_s]
        result[f"gen_{name}_s"] = [round(v, 5) for v in gen[name]]
        # The best round: other work on the machine only ever adds time.
        result[f"{name}_tok_s"] = tokens / min(total[name])
        result[f"{name}_median_tok_s"] = tokens / statistics.median(total[name])
        result[f"{name}_prep_ms"] = 1e3 * min(prep_s)
        result[f"cpu_{name}_s"] = [round(v, 5) for v in cpu[name]]
        result[f"{name}_cpu_tok_s"] = tokens / min(cpu[name])
    result["ratio"] = result["mmkit_tok_s"] / result["transformers_tok_s"]
    # Each round's two runs are adjacent in time, so they share the machine's load: their ratio is steadier.
    result["paired_ratio"] = statistics.median(h / m for m, h in zip(total[mm.name], total[hf.name]))
    # CPU time is blind to the time the process waits for a core, which wall time on a busy machine is not
    # (with one torch thread nothing runs in parallel, so CPU time ~ the work done).
    result["cpu_ratio"] = result["mmkit_cpu_tok_s"] / result["transformers_cpu_tok_s"]
    if not ids_equal:
        for name in shapes:
            print(f"  {name} batch {batch} row 0: {outputs[name][0].tolist()}", file=sys.stderr)
    return result


def profile(side, batch: int, pictures: list, args: argparse.Namespace) -> None:
    import cProfile
    import pstats

    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]
    pictures = [pictures[i % len(pictures)] for i in range(batch)]
    side.generate(side.prepare(questions, pictures))
    profiler = cProfile.Profile()
    profiler.enable()
    side.generate(side.prepare(questions, pictures))
    profiler.disable()
    print(f"\n=== cProfile: {side.name}, batch {batch}, {args.new_tokens} new tokens ===")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


def table(results: list[dict]) -> str:
    lines = [
        ("| batch | mmkit tok/s | transformers tok/s | ratio | paired ratio | CPU-time ratio "
         "| prep ms mmkit / transformers | ids equal |"),
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['batch']} | {r['mmkit_tok_s']:.1f} | {r['transformers_tok_s']:.1f} | {r['ratio']:.2f}x "
            f"| {r['paired_ratio']:.2f}x | {r['cpu_ratio']:.2f}x | {r['mmkit_prep_ms']:.1f} / {r['transformers_prep_ms']:.1f} "
            f"| {'yes' if r['ids_equal'] and r['prompts_equal'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        from mmkit.interchange.hf_llava import export_run

        run = build_run(root, args)
        hf_dir = export_run(run, root / "hf")
        sides = [MMKitSide(run, device, args.new_tokens), HFSide(hf_dir, device, args.new_tokens)]
        pictures = images(8, args.image_size)
        built = time.perf_counter() - started
        mm_model = sides[0].generator.model
        print(f"model: decoder {args.layers}x{args.hidden} ({sum(p.numel() for p in mm_model.decoder.parameters()) / 1e6:.2f}M), "
              f"vision {args.vision_layers}x{args.vision_hidden}, {mm_model.num_image_tokens} image tokens; "
              f"device {device}, torch threads {torch.get_num_threads()}; built in {built:.1f}s")
        print(f"{args.new_tokens} new tokens per row, {args.repeats} timed rounds (A/B order alternating)")
        results = []
        for batch in args.batch_sizes:
            result = bench_batch(sides, batch, pictures, args, device)
            results.append(result)
            print(f"batch {batch}: mmkit {result['mmkit_tok_s']:.1f} tok/s, transformers "
                  f"{result['transformers_tok_s']:.1f} tok/s ({result['ratio']:.2f}x, paired {result['paired_ratio']:.2f}x, CPU time {result['cpu_ratio']:.2f}x); ids equal: "
                  f"{result['ids_equal']}; {result['distinct_tokens']} distinct tokens generated", flush=True)
        if args.profile != "none":
            profile(sides[0] if args.profile == "mmkit" else sides[1], max(args.batch_sizes), pictures, args)
    print()
    print("tok/s = batch x new tokens / the best round's seconds (prompt + image preprocessing + generate);")
    print("paired ratio = median over rounds of transformers s / mmkit s in the same round; CPU-time ratio = the same")
    print("as ratio from process CPU time (blind to waiting for a core); prep = best preprocessing time.")
    print(table(results))
    print(f"total {time.perf_counter() - started:.1f}s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                          "results": results}, indent=2))
    ok = all(r["ids_equal"] and r["prompts_equal"] for r in results)
    if not ok:
        print("FAIL: the two sides did not read the same prompts or generate the same ids", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.exit(main())
