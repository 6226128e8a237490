"""LLaVA-1.5-7B's two training stages on one GPU: real tokens/s, step time, peak memory, model
FLOPs per step and MFU, for mmkit's own model at 7B's shapes with random weights.

    python experiments/bench/bench_gpu.py                        # a CUDA machine: expected 2-4 minutes on one H100
    python experiments/bench/bench_gpu.py --profile --json out.json
    python experiments/bench/bench_gpu.py --cpu-smoke --json out.json   # the whole code path, tiny, on CPU

The model is mmkit's ``VisionLanguageModel`` (its encoder, connector and decoder classes, their
forward passes) over a CLIP ViT-L/14-336 tower (576 image tokens, features from layer -2), the
``mlp2x_gelu`` connector and a Llama decoder with Llama-2-7B's layer shapes (hidden 4096, MLP 11008,
32 heads, vocabulary 32000). The towers are built in place on the GPU from their configs (no
checkpoint is written or read). A 7B model does not train on one 80 GB card with fp32 AdamW
states, so the decoder gets as many of its 32 layers as fit: ``--layers``, or an estimate from two
small probes, then one layer fewer after each out-of-memory error.

Stage 1 trains the connector only (the LM is frozen, but the gradient flows back through it);
stage 2 trains the connector and the whole LM; the vision tower is frozen in both. Each step is
forward, backward, gradient clipping at norm 1 and AdamW, as ``trainer=gpu`` runs it
(``--precision bf16-mixed``: fp32 weights, gradients and AdamW states, bf16 autocast, like
Lightning's ``precision="bf16-mixed"``; ``bf16-true``: bf16 weights and states, no fp32 master copy).
Samples follow LLaVA-1.5's 665K mix (576 image tokens + text, at most 2048 tokens), packed into
rows of ``--pack-length`` tokens with attention kept inside each sample (``packed_sdpa``, or
``flash_attention_2`` where the flash_attn package imports). Rates count real tokens only, and
MFU is the model FLOPs of :class:`mmkit.training.throughput.FlopModel` per second over the card's
dense bf16 peak.
"""
from __future__ import annotations

import os

# Fewer fragments: the layer search runs close to the card's capacity. Set before CUDA starts.
if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
from transformers import CLIPVisionConfig, LlamaConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Shape, llava_instruct_lengths, make_samples, markdown_table  # noqa: E402

from mmkit.data.collate import Collator  # noqa: E402
from mmkit.models import build as mmkit_build  # noqa: E402
from mmkit.models.decoders.hf_causal_lm import prepare_tokenizer  # noqa: E402
from mmkit.models.parameters import parameter_count  # noqa: E402
from mmkit.models.vlm import VisionLanguageModel  # noqa: E402
from mmkit.training.optimizer import build_adamw  # noqa: E402
from mmkit.training.throughput import FlopModel, device_peak_tflops  # noqa: E402

SKIP_LINE = "bench_gpu: no CUDA device; skipped"
LLAMA2_7B_LAYERS = 32
# CLIP ViT-L/14-336 + Llama-2-7B's layers; ``layers`` is filled in per attempt.
FULL = Shape(image_size=336, patch_size=14, vision_width=1024, vision_layers=24, width=4096, layers=LLAMA2_7B_LAYERS,
             heads=32, kv_heads=32, intermediate=11008, vocab=32000)
# The same code path at a size two CPU cores finish in seconds.
SMOKE = Shape(image_size=56, patch_size=14, vision_width=64, vision_layers=2, width=128, layers=2,
              heads=4, kv_heads=4, intermediate=344, vocab=1000)
STAGES = {"stage1": "connector", "stage2": "connector+LM"}
# Kernel (GPU) or operator (CPU) names by what they do, for the profile's breakdown; first match wins.
KERNEL_KINDS = [
    ("attention", r"flash|fmha|attention|sdpa"),
    ("optimizer+clip", r"multi_tensor|adam|foreach|_norm_"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|wgmma|sm90_|sm80_|aten::(mm|addmm|bmm|matmul|linear)\b"),
    ("copy/cast", r"copy|(?<!no)cast|convert|memcpy|memset|aten::to\b|aten::_to_copy"),
    ("norm/softmax/loss", r"norm|softmax|cross_entropy|nll|reduce"),
    ("other elementwise", r"elementwise|triton_|CatArray|Functor"),  # eager ops, and --compile's fused kernels
]


def write_tokenizer(folder: Path, vocab: int) -> str:
    """A word-level tokenizer of ``vocab - 1`` entries (``<image>`` makes ``vocab``): the benchmark
    feeds token ids, never text, so only the size and the special tokens matter."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "<pad>", "</s>"]
    words = specials + [f"w{index}" for index in range(len(specials), vocab - 1)]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    ).save_pretrained(folder)
    return str(folder)


def write_configs(folder: Path, shape: Shape, tokenizer_path: str) -> dict[str, Any]:
    """HF config folders of the shape's CLIP tower and Llama under ``folder`` (configs only, no
    weights), and the model config that names them: the ``hf_clip`` encoder at layer -2, the
    ``mlp2x_gelu`` connector, the ``hf_causal_lm`` decoder."""
    CLIPVisionConfig(
        image_size=shape.image_size, patch_size=shape.patch_size, hidden_size=shape.vision_width,
        intermediate_size=4 * shape.vision_width, num_hidden_layers=shape.vision_layers,
        num_attention_heads=max(1, shape.vision_width // 64),
    ).save_pretrained(folder / "vision")
    tokenizer = prepare_tokenizer(tokenizer_path)
    LlamaConfig(
        # A model built from its config gets one more row, <image>'s, which is the tokenizer's last id.
        vocab_size=max(shape.vocab, len(tokenizer)) - 1, hidden_size=shape.width,
        intermediate_size=shape.intermediate, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ).save_pretrained(folder / "language")
    return {
        "encoder": {"name": "hf_clip", "path": str(folder / "vision"), "layer": -2, "select": "patch", "frozen": True},
        "connector": {"name": "mlp2x_gelu"},
        "decoder": {"name": "hf_causal_lm", "path": str(folder / "language")},
    }


def build_model(shape: Shape, device: torch.device, tokenizer_path: str, attention: str, checkpointing: bool,
                precision: str, compile: bool = False) -> VisionLanguageModel:
    """mmkit's model of ``shape`` with random weights, built in place on ``device`` from its HF
    configs (``build_model(cfg, weights="shapes")``): no checkpoint is written or read."""
    with tempfile.TemporaryDirectory() as folder:
        cfg = write_configs(Path(folder), shape, tokenizer_path)
        cfg["decoder"].update(attn_implementation=attention, gradient_checkpointing=checkpointing, compile=compile)
        with torch.device(device):
            model = mmkit_build.build_model(cfg, weights="shapes")
    if precision == "bf16-true":
        model.to(torch.bfloat16)
    return model


def set_stage(model: VisionLanguageModel, stage: str) -> None:
    """stage1: the connector trains; stage2: the connector and the LM. The tower never does."""
    model.requires_grad_(False)
    model.connector.requires_grad_(True)
    if stage == "stage2":
        model.decoder.requires_grad_(True)
    model.train()


def billions(count: float) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.2f}M"


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_step(model: VisionLanguageModel, precision: str, device: torch.device,
              foreach_adamw: bool = False) -> Callable[[dict], float]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The stages' AdamW (fused on a GPU unless --foreach-adamw).
    optimizer = build_adamw(trainable, {"lr": 2e-5, "weight_decay": 0.0, "fused": False if foreach_adamw else None})

    def autocast():
        if precision == "bf16-mixed":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(batch: dict) -> torch.Tensor:
        with autocast():
            loss = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"], labels=batch["labels"], position_ids=batch["position_ids"],
                sample_lengths=batch["sample_lengths"],
            ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # trainer.gradient_clip_val: 1.0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def is_out_of_memory(error: BaseException) -> bool:
    """The allocator's error, or cuBLAS/cuDNN failing to get workspace for the same reason."""
    message = str(error)
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in message or "ALLOC_FAILED" in message))


def layers_that_fit(probe_peaks: dict[int, float], capacity: float, most: int) -> int:
    """Layers whose peak memory, extrapolated linearly from two probes (``{layers: peak bytes}``),
    stays under ``capacity``; at least 1, at most ``most``."""
    (small, small_peak), (large, large_peak) = sorted(probe_peaks.items())
    per_layer = max((large_peak - small_peak) / (large - small), 1.0)
    fixed = small_peak - small * per_layer
    return max(1, min(most, math.floor((capacity - fixed) / per_layer)))


class Bench:
    def __init__(self, args: argparse.Namespace, device: torch.device, shape: Shape, tokenizer_path: str,
                 batches: list[dict]) -> None:
        self.args, self.device, self.shape, self.tokenizer_path = args, device, shape, tokenizer_path
        # The heaviest batch goes first, so a configuration that runs out of memory does so at once.
        heaviest = max(range(len(batches)), key=lambda i: batches[i]["num_tokens"])
        self.batches = [batches[heaviest]] + batches[:heaviest] + batches[heaviest + 1:]

    def build(self, layers: int, stage: str) -> VisionLanguageModel:
        shape = Shape(**{**self.shape.__dict__, "layers": layers})
        model = build_model(shape, self.device, self.tokenizer_path, self.args.attention,
                            self.args.gradient_checkpointing, self.args.precision, self.args.compile)
        set_stage(model, stage)
        if self.args.frozen_bf16:  # a weight that never trains needs no fp32 master copy
            for part in (model.encoder, model.connector, model.decoder):
                if not any(p.requires_grad for p in part.parameters()):
                    part.to(torch.bfloat16)
        return model

    def oom(self, layers: int) -> None:
        """``--simulate-oom-above``: CI's way to walk the out-of-memory search on a CPU."""
        if self.args.simulate_oom_above is not None and layers > self.args.simulate_oom_above:
            raise torch.OutOfMemoryError(f"simulated: {layers} layers > {self.args.simulate_oom_above}")

    def probe(self, stage: str, layers: int) -> float:
        """Peak bytes of two steps on the heaviest batch (the second holds the AdamW states)."""
        model = self.build(layers, stage)
        step = make_step(model, self.args.precision, self.device, self.args.foreach_adamw)
        batch = to_device(self.batches[0], self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        for _ in range(2):
            step(batch)
        synchronize(self.device)
        return float(torch.cuda.max_memory_allocated(self.device))

    def estimate_layers(self, stage: str) -> tuple[int, dict[str, Any]]:
        free, total = torch.cuda.mem_get_info(self.device)
        capacity = free * self.args.memory_fraction
        peaks, gib = {}, 2**30
        for layers in (2, 4):
            failed = False
            try:
                peaks[layers] = self.probe(stage, layers)
            except RuntimeError as error:  # torch.OutOfMemoryError is one
                if not is_out_of_memory(error):
                    raise
                failed = True
            free_memory(self.device)
            if failed:  # too big for an estimate: search down from just below the probe that failed
                print(f"  {stage}: the {layers}-layer probe ran out of memory; try {max(1, layers - 1)} layers", flush=True)
                return max(1, layers - 1), {"probe_out_of_memory": layers, "capacity_gib": round(capacity / gib, 2)}
        fit = layers_that_fit(peaks, capacity, self.args.max_layers)
        info = {"probe_peak_gib": {k: round(v / gib, 2) for k, v in peaks.items()},
                "per_layer_gib": round((peaks[4] - peaks[2]) / 2 / gib, 3), "capacity_gib": round(capacity / gib, 2),
                "free_gib": round(free / gib, 2), "total_gib": round(total / gib, 2), "estimate": fit}
        print(f"  {stage}: probes {info['probe_peak_gib']} GiB -> {info['per_layer_gib']} GiB per layer; "
              f"{info['capacity_gib']} GiB usable -> try {fit} layers", flush=True)
        return fit, info

    def run_stage(self, stage: str) -> dict[str, Any]:
        args, cuda = self.args, self.device.type == "cuda"
        search: dict[str, Any] = {}
        if args.layers:
            start = args.layers
        elif cuda:
            start, search = self.estimate_layers(stage)
        else:
            start = self.shape.layers
        out_of_memory = []
        for layers in range(start, 0, -1):
            failed = False
            try:
                result = self.measure(stage, layers)
            except RuntimeError as error:  # torch.OutOfMemoryError is one
                if not is_out_of_memory(error):
                    raise
                failed = True
                print(f"  {stage}: {layers} layers ran out of memory ({str(error).splitlines()[0][:120]}); "
                      f"trying {layers - 1}", flush=True)
            if failed:  # outside the except block, so the traceback's frames (and tensors) are gone
                out_of_memory.append(layers)
                free_memory(self.device)
                continue
            result["layer_search"] = {**search, "start": start, "out_of_memory": out_of_memory}
            free_memory(self.device)
            return result
        raise SystemExit(f"bench_gpu: {stage} does not fit even with one decoder layer; try a smaller --micro-batch")

    def measure(self, stage: str, layers: int) -> dict[str, Any]:
        args, device = self.args, self.device
        started = time.perf_counter()
        model = self.build(layers, stage)
        flop_model = FlopModel.of(model)
        step = make_step(model, args.precision, device, args.foreach_adamw)
        batches = [to_device(b, device) for b in self.batches]
        synchronize(device)
        build_s = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        losses = []
        warmup_started = time.perf_counter()
        for index, batch in enumerate(batches[: args.warmup]):
            losses.append(step(batch))
            if index == 0:
                self.oom(layers)  # where a real one would strike: with the model, states and a step in memory
        synchronize(device)
        warmup_s = time.perf_counter() - warmup_started  # holds --compile's compilation
        seconds = []
        timed = batches[args.warmup: args.warmup + args.steps]
        for batch in timed:
            begin = time.perf_counter()
            losses.append(step(batch))
            synchronize(device)
            seconds.append(time.perf_counter() - begin)
        total_s = sum(seconds)
        real = sum(b["num_real_tokens"] for b in timed)
        tokens = sum(b["num_tokens"] for b in timed)
        flops = sum(flop_model.step_flops(b["num_images"], b["num_real_tokens"], b["sum_squared_lengths"]) for b in timed)
        peak = args.peak_tflops or device_peak_tflops(device)
        result: dict[str, Any] = {
            "trains": STAGES[stage],
            "layers": layers,
            "layers_of_7b": layers / LLAMA2_7B_LAYERS,
            "parameters": parameter_count(model),
            "trainable_parameters": parameter_count(model, trainable=True),
            "build_s": round(build_s, 2),
            "warmup_steps": args.warmup,
            "warmup_s": round(warmup_s, 2),
            "steps": len(timed),
            "step_s": [round(s, 4) for s in seconds],
            "step_s_median": statistics.median(seconds),
            "step_s_mean": total_s / len(seconds),
            "real_tokens_per_step": real / len(timed),
            "real_tokens_per_s": real / total_s,
            "tokens_per_s": tokens / total_s,
            "real_token_share": real / tokens,
            "images_per_s": sum(b["num_images"] for b in timed) / total_s,
            "samples_per_s": sum(len(b["keys"]) for b in timed) / total_s,
            "model_flops_per_step": flops / len(timed),
            "model_tflops_per_s": flops / total_s / 1e12,
            "peak_tflops": peak,
            "mfu": flops / total_s / (peak * 1e12) if peak else None,
            "losses": [round(float(loss), 4) for loss in losses],
        }
        if device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        else:
            result["peak_memory_gib"] = None
            result["peak_reserved_gib"] = None
        # The same batches once more: on the H100, bf16-mixed stage 2 ran batches it had seen 4x faster
        # than new ones (RESULTS.md), so both are reported, and the profile looks at unseen batches.
        replayed = timed[: args.profile_steps]
        begin = time.perf_counter()
        for batch in replayed:
            step(batch)
        synchronize(device)
        result["replayed_step_s_mean"] = (time.perf_counter() - begin) / max(1, len(replayed))
        unseen = batches[args.warmup + args.steps:]
        result["profile"] = self.profile(step, unseen) if args.profile else None
        return result

    def profile(self, step: Callable[[dict], torch.Tensor], batches: list[dict]) -> dict[str, Any]:
        """Top kernels (operators on a CPU) by self time over a few steps, grouped by kind, and how
        much of the wall time the GPU was busy at all (the rest is host overhead and syncs)."""
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        synchronize(self.device)
        with profile(activities=activities) as prof:
            begin = time.perf_counter()
            for batch in batches:
                step(batch)
            synchronize(self.device)
            wall_us = (time.perf_counter() - begin) * 1e6
        averages = prof.key_averages()
        if cuda:
            events = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
            time_of = lambda e: e.self_device_time_total  # noqa: E731
        else:
            events = [e for e in averages if e.self_cpu_time_total > 0]
            time_of = lambda e: e.self_cpu_time_total  # noqa: E731
        busy_us = sum(time_of(e) for e in events)
        kinds: dict[str, float] = {}
        for event in events:
            kind = next((k for k, pattern in KERNEL_KINDS if re.search(pattern, event.key, re.IGNORECASE)), "other")
            kinds[kind] = kinds.get(kind, 0.0) + time_of(event)
        syncs = sum(e.count for e in averages if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                            "cudaEventSynchronize"))
        top = sorted(events, key=time_of, reverse=True)[: self.args.profile_top]
        steps = max(1, len(batches))
        return {
            "what": "CUDA kernels" if cuda else "CPU operators",
            "steps": len(batches),
            "wall_ms_per_step": wall_us / 1e3 / steps,
            "busy_ms_per_step": busy_us / 1e3 / steps,
            "busy_share": busy_us / wall_us if cuda else None,
            "syncs_per_step": syncs / steps if cuda else None,
            "by_kind_share": {k: v / busy_us for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])} if busy_us else {},
            "top": [{"name": e.key[:160], "ms_per_step": time_of(e) / 1e3 / steps, "calls_per_step": e.count / steps,
                     "share": time_of(e) / busy_us} for e in top],
        }


def print_profile(stage: str, report: dict[str, Any]) -> None:
    busy = "" if report["busy_share"] is None else (
        f"; GPU busy {report['busy_share']:.0%} of the wall time, {report['syncs_per_step']:.0f} host syncs per step")
    print(f"\n{stage} profile ({report['what']}, {report['steps']} steps): {report['wall_ms_per_step']:.1f} ms per step"
          f"{busy}")
    print("by kind: " + ", ".join(f"{k} {v:.0%}" for k, v in report["by_kind_share"].items()))
    print(markdown_table(["kernel" if report["what"] == "CUDA kernels" else "operator", "ms/step", "calls/step", "share"],
                         [[e["name"][:90], f"{e['ms_per_step']:.2f}", f"{e['calls_per_step']:.0f}", f"{e['share']:.1%}"]
                          for e in report["top"]]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the whole code path on the CPU at a tiny shape in fp32 (for CI); no MFU")
    parser.add_argument("--stages", default="stage1,stage2", help="comma-separated: stage1, stage2")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers to try first (one fewer after each out-of-memory error); "
                             "default: estimated from two small probes, at most --max-layers")
    parser.add_argument("--max-layers", type=int, default=LLAMA2_7B_LAYERS)
    parser.add_argument("--memory-fraction", type=float, default=0.92,
                        help="share of the free GPU memory the layer estimate may plan for")
    parser.add_argument("--micro-batch", type=int, default=8, help="samples per step (LLaVA-1.5: 16 per GPU in stage 2)")
    parser.add_argument("--batching", choices=("pack", "pad"), default="pack")
    parser.add_argument("--pack-length", type=int, default=2048, help="tokens per packed row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (the heaviest batch first)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--precision", choices=("bf16-mixed", "bf16-true", "32-true"), default=None,
                        help="default bf16-mixed (fp32 weights and AdamW states, bf16 autocast); 32-true with --cpu-smoke")
    parser.add_argument("--attention", default=None,
                        help="decoder attn_implementation; default flash_attention_2 where flash_attn imports, "
                             "else packed_sdpa (sdpa for --batching pad)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint the decoder's layers")
    parser.add_argument("--compile", action="store_true",
                        help="decoder.compile=true: torch.compile each decoder layer")
    parser.add_argument("--foreach-adamw", action="store_true",
                        help="AdamW's multi-tensor (foreach) implementation instead of the fused kernel mmkit picks on a GPU")
    parser.add_argument("--frozen-bf16", action="store_true",
                        help="keep frozen parts' weights in bf16 (the tower; the LM too in stage 1), as LLaVA's "
                             "DeepSpeed runs and decoder.dtype=bfloat16 do; trainable parts keep fp32 weights and states")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the card's dense bf16 peak; default from its name (989 for H100/H200 SXM)")
    parser.add_argument("--profile", action="store_true", help="also profile a few steps per stage: top kernels by time")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--profile-top", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 with --cpu-smoke)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write everything reported here")
    parser.add_argument("--simulate-oom-above", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown or not args.stages:
        parser.error(f"--stages: unknown {unknown}; choose from {', '.join(STAGES)}")
    if args.precision is None:
        args.precision = "32-true" if args.cpu_smoke else "bf16-mixed"
    if args.attention is None:
        if args.batching == "pad":
            args.attention = "sdpa"
        elif not args.cpu_smoke and importlib.util.find_spec("flash_attn") is not None:
            args.attention = "flash_attention_2"
        else:
            args.attention = "packed_sdpa"
    if args.cpu_smoke:
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
        args.micro_batch = min(args.micro_batch, 4)
        args.pack_length = min(args.pack_length, 256)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(SKIP_LINE, flush=True)
        if args.json:
            args.json.write_text(json.dumps({"skipped": "no CUDA device"}, indent=1))
        return {"skipped": "no CUDA device"}
    import transformers

    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", torch.cuda.current_device())
    torch.set_num_threads(args.threads or (1 if args.cpu_smoke else torch.get_num_threads()))
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (none in bf16-mixed's hot path)
    shape = SMOKE if args.cpu_smoke else FULL
    count = (args.warmup + args.steps + (args.profile_steps if args.profile else 0)) * args.micro_batch
    if args.cpu_smoke:  # text shrunk as the image tokens were (576 -> 16), rows of 256
        lengths = llava_instruct_lengths(count, shape.image_tokens, text_scale=1 / 36, max_length=256, seed=args.seed)
    else:
        lengths = llava_instruct_lengths(count, shape.image_tokens, text_scale=1.0, max_length=2048, seed=args.seed)

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_smoke": args.cpu_smoke,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": {**shape.__dict__, "layers": "per stage", "image_tokens": shape.image_tokens},
        "precision": args.precision,
        "attention": args.attention,
        "gradient_checkpointing": args.gradient_checkpointing,
        "compile": args.compile,
        "frozen_bf16": args.frozen_bf16,
        "adamw": "foreach" if args.foreach_adamw else "fused on CUDA",
        "micro_batch": args.micro_batch,
        "batching": args.batching,
        "pack_length": args.pack_length if args.batching == "pack" else None,
        "data": {
            "samples": len(lengths),
            "mean_length": statistics.mean(n for n, _ in lengths),
            "max_length": max(n for n, _ in lengths),
            "text_only_share": sum(1 for _, has_image in lengths if not has_image) / len(lengths),
        },
        "args": {k: str(v) for k, v in vars(args).items()},
        "stages": {},
    }
    print(f"bench_gpu on {results['device']}: {shape.image_tokens} image tokens, decoder {shape.width} wide, "
          f"precision {args.precision}{' (frozen weights bf16)' if args.frozen_bf16 else ''}, attention {args.attention}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, compile {'on' if args.compile else 'off'}, AdamW {results['adamw']}, micro-batch {args.micro_batch} ({args.batching}), "
          f"mean sample {results['data']['mean_length']:.0f} tokens", flush=True)

    with tempfile.TemporaryDirectory() as folder:
        tokenizer_path = write_tokenizer(Path(folder), shape.vocab)
        # Samples need only the vocabulary, <image>'s id and the image geometry: the model on the meta device.
        template = build_model(shape, torch.device("meta"), tokenizer_path, "sdpa", False, "32-true")
        assert template.num_image_tokens == shape.image_tokens
        samples = make_samples(lengths, template, seed=args.seed)
        collate = Collator(prepare_tokenizer(tokenizer_path).pad_token_id, args.batching, args.pack_length)
        del template
        batches = [collate(samples[i: i + args.micro_batch]) for i in range(0, len(samples), args.micro_batch)]
        bench = Bench(args, device, shape, tokenizer_path, batches)
        for stage in args.stages:
            print(f"{stage} ({STAGES[stage]} trains):", flush=True)
            entry = bench.run_stage(stage)
            results["stages"][stage] = entry
            memory = "" if entry["peak_memory_gib"] is None else f", peak memory {entry['peak_memory_gib']:.1f} GiB"
            mfu = "" if entry["mfu"] is None else f", MFU {entry['mfu']:.1%}"
            print(f"  {stage}: {entry['layers']} decoder layers ({billions(entry['parameters'])} parameters, "
                  f"{billions(entry['trainable_parameters'])} train); {entry['step_s_median'] * 1e3:.0f} ms per step "
                  f"({entry['replayed_step_s_mean'] * 1e3:.0f} replaying seen batches), "
                  f"{entry['real_tokens_per_s']:,.0f} real tokens/s, {entry['model_tflops_per_s']:.1f} model TFLOP/s"
                  f"{mfu}{memory}; losses {entry['losses']}", flush=True)

    rows = []
    for stage, entry in results["stages"].items():
        rows.append([
            stage, entry["trains"], entry["layers"], billions(entry["trainable_parameters"]),
            f"{entry['real_tokens_per_step']:.0f}", f"{entry['step_s_median'] * 1e3:.0f}",
            f"{entry['real_tokens_per_s']:,.0f}", f"{entry['model_flops_per_step'] / 1e12:.3g}",
            f"{entry['model_tflops_per_s']:.3g}", "n/a" if entry["mfu"] is None else f"{entry['mfu']:.1%}",
            "n/a" if entry["peak_memory_gib"] is None else f"{entry['peak_memory_gib']:.1f}",
        ])
    print()
    print(markdown_table(["stage", "trains", "layers", "trainable", "real tokens/step", "step ms", "real tokens/s",
                          "model TFLOP/step", "model TFLOP/s", "MFU", "peak GiB"], rows))
    for stage, entry in results["stages"].items():
        if entry["profile"]:
            print_profile(stage, entry["profile"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
