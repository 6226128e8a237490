"""Training-data samples/s: mmkit's shard pipeline vs a LLaVA-style loader, on the same inputs.

    python experiments/bench/bench_data.py                           # defaults: ~2-3 min on 2 busy cores
    python experiments/bench/bench_data.py --samples 64 --workers 0 --repeats 1   # smoke test

Builds one small COCO-like dataset in a temporary folder: ``--samples`` JPEG photos of about
500x375 (landscape and portrait, smooth regions plus noise so they compress like photos) and
LLaVA-Instruct-style records (``<image>`` in the first human turn, 1-4 rounds of question and
a 20-120 word answer). Then, per ``--workers`` count, one epoch through each of:

* mmkit: ``mmkit.data.shards.write_shards`` once (timed apart, an offline step), then
  ``ShardDataModule.train_dataloader()`` over the shards: WebDataset stream, shuffle buffer,
  ``SampleEncoder`` (JSON, ``vicuna_v1`` template with ``<image>`` expanded to the encoder's token
  count, image bytes -> ``ImageProcessor``), ``Collator`` batches, ``wds.WebLoader``.
* LLaVA-style: LLaVA's ``LazySupervisedDataset`` in brief: a ``torch.utils.data.Dataset`` over the
  JSON list and the loose image files, ``PIL.Image.open(path).convert("RGB")``, ``expand2square``
  with the processor's mean colour (pad mode), transformers' PIL-backed CLIP image processor (the
  ``CLIPImageProcessor`` of LLaVA's time; ``CLIPImageProcessorPil`` in transformers 5), LLaVA's
  ``preprocess_v1`` (vicuna_v1 prompt, ``tokenizer_image_token``, per-round target masking) and
  its ``DataCollatorForSupervisedDataset``, in a ``torch.utils.data.DataLoader`` (shuffled).

Same tokenizer (mmkit's zoo tokenizer with ``<image>`` added), image size, batch size and prefetch
factor on both sides. ``0`` workers runs in-process with torch limited to one thread, so both
columns are per-worker figures; with ``N`` workers each worker is one process with one thread (the
DataLoader default). Rounds alternate the side that goes first; a figure is the best of
``--repeats`` epochs (the machine may be shared). samples/s counts samples that came out of the
loader per wall second, worker startup included; samples/CPU-s divides by the user+system CPU time
of the process and its workers, which a busy machine disturbs less than wall time. A first table
gives each side's per-sample image and text work in-process, and ``--profile`` prints cProfile's
top functions for one in-process epoch of each side.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import itertools
import json
import os
import pstats
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORE_INDEX = -100
LLAVA_IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id for the image in input_ids
# COCO's common sizes, mostly 640 or 500 wide; the default dataset is kept near 500x375.
SHAPES = [(500, 375), (500, 333), (375, 500), (500, 400), (480, 360), (333, 500), (512, 384), (500, 375)]
WORDS = [
    "the", "a", "of", "and", "to", "in", "is", "on", "with", "that", "it", "for", "as", "at", "by",
    "this", "from", "are", "an", "be", "which", "or", "there", "image", "picture", "photo", "man",
    "woman", "person", "people", "dog", "cat", "car", "bus", "street", "table", "plate", "food",
    "pizza", "red", "blue", "green", "white", "black", "yellow", "large", "small", "left", "right",
    "behind", "front", "near", "next", "top", "bottom", "sitting", "standing", "holding",
    "walking", "riding", "looking", "wearing", "playing", "eating", "parked", "placed", "shown",
    "several", "two", "three", "many", "some", "each", "other", "its", "their", "while", "also",
    "can", "may", "likely", "appears", "scene", "background", "foreground", "building", "tree",
    "sky", "water", "grass", "road", "sign", "window", "door", "kitchen", "room",
]
QUESTIONS = [
    "What is the man doing in the image?",
    "Describe the image in detail.",
    "What color is the bus?",
    "How many people are visible in the picture?",
    "What might be the reason for the people gathering here?",
    "Where is the dog sitting?",
    "What objects are on the table?",
    "What can you infer about the weather from the image?",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512, help="samples in the dataset (one epoch each run)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="dataloader worker counts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=336, help="encoder input size (LLaVA-1.5: 336)")
    parser.add_argument("--patch", type=int, default=14, help="encoder patch size: image tokens = (size/patch)^2")
    parser.add_argument("--mode", choices=["pad", "crop"], default="pad", help="pad: LLaVA-1.5, crop: LLaVA")
    parser.add_argument("--repeats", type=int, default=2, help="epochs per side and worker count; the best counts")
    parser.add_argument("--prefetch-factor", type=int, default=4)
    parser.add_argument("--stages", type=int, default=64, help="samples for the per-stage ms table (0: skip)")
    parser.add_argument("--profile", action="store_true", help="cProfile one in-process epoch of each side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------- data


def photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    coarse = rng.integers(0, 256, (max(height // 12, 2), max(width // 12, 2), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noisy = smooth + rng.integers(-16, 17, (height, width, 3), dtype=np.int16)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def sentence(rng: random.Random, low: int, high: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
    return " ".join(words).capitalize() + "."


def conversation(rng: random.Random) -> list[dict[str, str]]:
    turns = []
    for index in range(rng.randint(1, 4)):
        question = rng.choice(QUESTIONS)
        if index == 0:
            question = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
        answer = " ".join(sentence(rng, 6, 20) for _ in range(rng.randint(2, 6)))
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def build_dataset(folder: Path, count: int, seed: int) -> tuple[list[dict[str, Any]], Path]:
    images = folder / "images"
    images.mkdir(parents=True)
    np_rng, rng = np.random.default_rng(seed), random.Random(seed)
    records = []
    for index in range(count):
        name = f"{index:012d}.jpg"
        photo(*SHAPES[index % len(SHAPES)], np_rng).save(images / name, format="JPEG", quality=90)
        records.append({"id": f"{index:012d}", "image": name, "conversations": conversation(rng)})
    (folder / "llava_instruct.json").write_text(json.dumps(records))
    return records, images


# ---------------------------------------------------------------------------------------- mmkit


def build_mmkit_loader(shard_dir: Path, tokenizer, args, workers: int):
    from mmkit.core.interfaces import ImageStats
    from mmkit.core.registry import TEMPLATES
    from mmkit.data.datamodule import ShardDataModule
    from mmkit.data.datasets.dataset_source import DatasetSource, ShardSet
    from mmkit.data.images import ImageProcessor
    from mmkit.data.samples import SampleEncoder

    class Shards(DatasetSource):
        def shard_set(self) -> ShardSet:
            return ShardSet.from_folder(shard_dir)

    stats = ImageStats(size=args.image_size, mean=CLIP_MEAN, std=CLIP_STD)
    encoder = SampleEncoder(
        TEMPLATES.get("vicuna_v1")(),
        tokenizer,
        ImageProcessor(stats, args.mode),
        num_image_tokens=(args.image_size // args.patch) ** 2,
        max_length=8192,
    )
    module = ShardDataModule(
        Shards(), encoder, batch_size=args.batch_size, num_workers=workers, shuffle_buffer=1000, seed=args.seed
    )
    if workers:
        module.prefetch_factor = args.prefetch_factor
    module.setup("fit")
    return module.train_dataloader()


def mmkit_batch_size(batch: dict[str, Any]) -> tuple[int, int]:
    return len(batch["keys"]), len(batch["skipped"])


# ---------------------------------------------------------------------------------------- LLaVA


def expand2square(pil_img: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """LLaVA's ``llava/mm_utils.py``."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = LLAVA_IMAGE_TOKEN_INDEX) -> list[int]:
    """LLaVA's ``llava/mm_utils.py``."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(items, sep):
        return [ele for sublist in zip(items, [sep] * len(items)) for ele in sublist][:-1]

    input_ids, offset = [], 0
    if prompt_chunks and prompt_chunks[0] and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for chunk in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(chunk[offset:])
    return input_ids


def llava_preprocess_v1(conversation: list[dict[str, str]], tokenizer) -> dict[str, torch.Tensor]:
    """LLaVA's ``preprocess_multimodal`` + ``preprocess_v1`` (conv_vicuna_v1, has_image=True) for one sample."""
    from mmkit.data.templates.template import LLAVA_SYSTEM

    for turn in conversation:
        if "<image>" in turn["value"]:
            turn["value"] = "<image>\n" + turn["value"].replace("<image>", "").strip()
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    sep, sep2 = " ", "</s>"
    prompt = LLAVA_SYSTEM + sep
    for index, turn in enumerate(conversation):
        prompt += roles[turn["from"]] + ": " + turn["value"] + (sep, sep2)[index % 2]
    input_ids = torch.tensor(tokenizer_image_token(prompt, tokenizer), dtype=torch.long)
    target = input_ids.clone()
    total_len = int(target.ne(tokenizer.pad_token_id).sum())
    round_sep = sep + "ASSISTANT" + ": "
    cur_len = 1
    target[:cur_len] = IGNORE_INDEX
    for rou in prompt.split(sep2):
        if rou == "":
            break
        parts = rou.split(round_sep)
        if len(parts) != 2:
            break
        parts[0] += round_sep
        round_len = len(tokenizer_image_token(rou, tokenizer))
        instruction_len = len(tokenizer_image_token(parts[0], tokenizer)) - 2
        target[cur_len : cur_len + instruction_len] = IGNORE_INDEX
        cur_len += round_len
    target[cur_len:] = IGNORE_INDEX
    del total_len  # LLaVA warns when cur_len != total_len; the mismatch check is not the cost measured
    return {"input_ids": input_ids, "labels": target}


class LazySupervisedDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[dict[str, Any]], image_folder: Path, tokenizer, processor, mode: str) -> None:
        self.records = records
        self.image_folder = image_folder
        self.tokenizer = tokenizer
        self.processor = processor
        self.mode = mode

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        image = Image.open(os.path.join(self.image_folder, record["image"])).convert("RGB")
        if self.mode == "pad":
            image = expand2square(image, tuple(int(x * 255) for x in self.processor.image_mean))
        image = self.processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
        sample = llava_preprocess_v1(json.loads(json.dumps(record["conversations"])), self.tokenizer)
        sample["image"] = image
        return sample


class DataCollatorForSupervisedDataset:
    def __init__(self, tokenizer, model_max_length: int = 2048) -> None:
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length

    def __call__(self, instances: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        input_ids = torch.nn.utils.rnn.pad_sequence(
            [i["input_ids"] for i in instances], batch_first=True, padding_value=self.tokenizer.pad_token_id
        )[:, : self.model_max_length]
        labels = torch.nn.utils.rnn.pad_sequence(
            [i["labels"] for i in instances], batch_first=True, padding_value=IGNORE_INDEX
        )[:, : self.model_max_length]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": input_ids.ne(self.tokenizer.pad_token_id),
            "images": torch.stack([i["image"] for i in instances]),
        }


def clip_processor_pil(size: int):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=Image.BICUBIC,
    )


def build_llava_loader(records, image_folder: Path, tokenizer, args, workers: int):
    dataset = LazySupervisedDataset(records, image_folder, tokenizer, clip_processor_pil(args.image_size), args.mode)
    extra = {"prefetch_factor": args.prefetch_factor} if workers else {}
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers,
        collate_fn=DataCollatorForSupervisedDataset(tokenizer), drop_last=True, **extra,
    )


def llava_batch_size(batch: dict[str, Any]) -> tuple[int, int]:
    return batch["input_ids"].shape[0], 0


# ---------------------------------------------------------------------------------------- timing


def cpu_seconds(who: int) -> float:
    """User + system CPU seconds of this process (RUSAGE_SELF) or of its finished children
    (RUSAGE_CHILDREN: the dataloader workers, once joined)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_epoch(build: Callable[[], Any], count: Callable[[Any], tuple[int, int]], collect: bool = True) -> dict[str, float]:
    if collect:
        gc.collect()  # garbage left by an earlier run is not this run's cost
    start, own, children = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
    samples = skipped = 0
    for batch in build():
        got, lost = count(batch)
        samples += got
        skipped += lost
    seconds, own = time.perf_counter() - start, cpu_seconds(resource.RUSAGE_SELF) - own
    del batch
    if collect:
        gc.collect()  # makes sure the worker processes are shut down and joined, so their CPU time is counted
    cpu = own + cpu_seconds(resource.RUSAGE_CHILDREN) - children
    return {
        "samples": samples, "skipped": skipped, "seconds": seconds, "cpu_seconds": cpu,
        "samples_per_s": samples / seconds, "samples_per_cpu_s": samples / cpu,
    }


def stage_times(records, image_folder: Path, shard_samples: list[dict[str, Any]], tokenizer, args) -> dict[str, float]:
    """Milliseconds per sample of each side's image and text work, in-process, one thread."""
    from mmkit.core.interfaces import ImageStats
    from mmkit.core.registry import TEMPLATES
    from mmkit.data.images import ImageProcessor, decode_image_tensor
    from mmkit.data.templates.template import LLAVA_SYSTEM  # noqa: F401  (import cost outside the timing)

    n = min(args.stages, len(records))
    processor = ImageProcessor(ImageStats(args.image_size, CLIP_MEAN, CLIP_STD), args.mode)
    template = TEMPLATES.get("vicuna_v1")()
    tokens = (args.image_size // args.patch) ** 2
    hf = clip_processor_pil(args.image_size)
    fill = tuple(int(x * 255) for x in hf.image_mean)

    def llava_image(record):
        image = Image.open(os.path.join(image_folder, record["image"])).convert("RGB")
        if args.mode == "pad":
            image = expand2square(image, fill)
        return hf.preprocess(image, return_tensors="pt")["pixel_values"][0]

    jobs = {
        "mmkit image (bytes -> uint8 tensor)": lambda i: processor.resize_and_crop(decode_image_tensor(shard_samples[i]["jpg"])),
        "mmkit text (template + tokens)": lambda i: template.encode(
            json.loads(shard_samples[i]["json"])["conversations"], tokenizer, tokens
        ),
        "LLaVA image (PIL + CLIPImageProcessorPil)": lambda i: llava_image(records[i]),
        "LLaVA text (preprocess_v1)": lambda i: llava_preprocess_v1(
            json.loads(json.dumps(records[i]["conversations"])), tokenizer
        ),
    }
    times = {}
    for name, job in jobs.items():
        job(0)
        start = time.perf_counter()
        for i in range(n):
            job(i)
        times[name] = (time.perf_counter() - start) / n * 1000
    return times


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # in-process runs are per-worker figures, as each DataLoader worker is
    from mmkit.core.registry import load_components
    from mmkit.data.shards import write_shards
    from mmkit.models.decoders.hf_causal_lm import prepare_tokenizer

    load_components()  # registers the templates (and imports timm etc.: seconds, kept out of the timings)
    tokenizer = prepare_tokenizer("zoo://tiny-tokenizer")
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="mmkit-bench-data-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        records, image_folder = build_dataset(folder, args.samples, args.seed)
        sizes = [p.stat().st_size for p in image_folder.iterdir()]
        print(f"dataset: {len(records)} JPEGs ({np.mean(sizes) / 1024:.0f} KiB mean), "
              f"{sum(len(r['conversations']) for r in records) / len(records):.1f} turns per record "
              f"[{time.perf_counter() - start:.1f}s to build]")
        shard_dir = folder / "shards"
        # Enough shards for every reader: each dataloader worker needs at least one.
        per_shard = max(1, args.samples // max(8, 2 * max(args.workers)))
        start = time.perf_counter()
        report = write_shards(records, image_folder, shard_dir, samples_per_shard=per_shard, progress=False)
        convert_s = time.perf_counter() - start
        print(f"write_shards: {report.num_samples} samples in {len(report.shards)} shards, "
              f"{convert_s:.2f}s ({report.num_samples / convert_s:.0f} samples/s, offline, once)")
        results["write_shards_s"] = convert_s

        if args.stages:
            import webdataset as wds

            urls = [str(shard_dir / shard["file"]) for shard in report.shards]
            stream = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
            by_key = {s["__key__"]: s for s in itertools.islice(stream, args.stages)}
            subset = [r for r in records if r["id"] in by_key]
            stages = stage_times(subset, image_folder, [by_key[r["id"]] for r in subset], tokenizer, args)
            results["stage_ms"] = stages
            print(f"\nper-sample work, in-process, 1 thread, mean of {min(args.stages, len(subset))} samples:")
            for name, ms in stages.items():
                print(f"  {name:<44} {ms:7.2f} ms")

        sides = {
            "mmkit": (lambda w: build_mmkit_loader(shard_dir, tokenizer, args, w), mmkit_batch_size),
            "llava": (lambda w: build_llava_loader(records, image_folder, tokenizer, args, w), llava_batch_size),
        }
        if args.profile:
            for name, (build, count) in sides.items():
                profiler = cProfile.Profile()
                profiler.enable()
                gc.collect()
                run_epoch(lambda build=build: build(0), count, collect=False)
                profiler.disable()
                print(f"\n== cProfile, {name}, 0 workers (top 20 by own time) ==")
                pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(20)

        rows = []
        for workers in args.workers:
            best: dict[tuple[str, str], float] = {}
            for repeat in range(args.repeats):
                order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
                for name in order:
                    build, count = sides[name]
                    run = run_epoch(lambda build=build, workers=workers: build(workers), count)
                    run.update(side=name, workers=workers, repeat=repeat)
                    results["runs"].append(run)
                    print(f"  workers={workers} {name:<6} repeat {repeat}: {run['samples']} samples "
                          f"in {run['seconds']:.2f}s = {run['samples_per_s']:.1f}/s, "
                          f"{run['cpu_seconds']:.2f} CPU-s = {run['samples_per_cpu_s']:.1f}/CPU-s"
                          + (f" ({run['skipped']} skipped)" if run["skipped"] else ""))
                    for metric in ("samples_per_s", "samples_per_cpu_s"):
                        key = (name, metric)
                        best[key] = max(best.get(key, 0.0), run[metric])
            rows.append((workers, best))

    lines = [
        (
            "| workers | mmkit samples/s | LLaVA-style samples/s | mmkit / LLaVA "
            "| mmkit samples/CPU-s | LLaVA-style samples/CPU-s | mmkit / LLaVA |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    results["table"] = []
    for workers, best in rows:
        wall = best[("mmkit", "samples_per_s")], best[("llava", "samples_per_s")]
        cpu = best[("mmkit", "samples_per_cpu_s")], best[("llava", "samples_per_cpu_s")]
        lines.append(f"| {workers} | {wall[0]:.1f} | {wall[1]:.1f} | {wall[0] / wall[1]:.2f}x "
                     f"| {cpu[0]:.1f} | {cpu[1]:.1f} | {cpu[0] / cpu[1]:.2f}x |")
        results["table"].append({
            "workers": workers, "mmkit_samples_per_s": wall[0], "llava_samples_per_s": wall[1],
            "mmkit_samples_per_cpu_s": cpu[0], "llava_samples_per_cpu_s": cpu[1],
        })
    print(f"\nimage {args.image_size}px ({args.mode}), batch {args.batch_size}, {args.samples} samples per epoch, "
          f"best of {args.repeats}; torch threads per process: 1; CPU-s: user+system time of the process and "
          f"its dataloader workers")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
