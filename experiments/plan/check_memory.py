"""Predicted against measured peak memory of real training steps (issue 11).

    python experiments/plan/check_memory.py --device cpu  --json cpu.json   # peak RSS of a child process
    python experiments/plan/check_memory.py --device cuda --json gpu.json   # torch.cuda.max_memory_allocated

Each case is a ``python -m mmkit.train`` config plus HF config overrides (a small model on CPU, a
7B-shaped reduced-depth one on a GPU). The prediction is ``mmkit.planning.memory``'s, made on fake
tensors. The measurement trains mmkit's LightningModule (LitVLM) for three steps with a Lightning
Trainer at the config's precision, on batches of the predicted worst-case shape, in a fresh
process: on CPU the growth of its peak resident memory from just before the model is built, on a
GPU the CUDA allocator's peak of allocated bytes.

On CPU the child runs with glibc's mmap threshold fixed at 1 MiB (``MALLOC_MMAP_THRESHOLD_``), so a
freed tensor's pages go back to the system as a freed CUDA tensor goes back to the caching
allocator. With glibc's default, which raises the threshold after large frees and keeps later
frees in its heap, the same step's peak RSS was 0.5 GiB higher (2.61 GiB against 2.17 GiB for the
first case), memory the process holds but no tensor uses: the CPU counterpart of CUDA's reserved
against allocated bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

GiB = 2**30


@dataclass
class Case:
    name: str
    stage: str
    overrides: list[str]
    encoder: dict = field(default_factory=dict)  # HF config overrides
    decoder: dict = field(default_factory=dict)


# A CLIP tower of 4 x 256 at 224 px (256 image tokens) and a Llama of 8 x 512 with Vicuna's 32K vocabulary.
_SMALL = {"encoder": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
                      "image_size": 224},
          "decoder": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
                      "num_key_value_heads": 8}}
_CPU = ["experiment=llava_v1_5", "trainer=cpu", "data.max_length=512", "recipe.stages.pretrain.micro_batch_size=4",
        "recipe.stages.finetune.micro_batch_size=4"]
_GPU = ["experiment=llava_v1_5", "trainer=gpu", "recipe.stages.pretrain.micro_batch_size=8",
        "recipe.stages.finetune.micro_batch_size=4"]
CASES = {
    "cpu": [
        Case("small, stage 2, fp32", "finetune", [*_CPU, "decoder.gradient_checkpointing=false"], **_SMALL),
        Case("small, stage 2, fp32, checkpointing", "finetune", [*_CPU, "decoder.gradient_checkpointing=true"], **_SMALL),
        Case("small, stage 1, fp32", "pretrain", [*_CPU, "decoder.gradient_checkpointing=false"], **_SMALL),
    ],
    # CLIP ViT-L/14-336 and Vicuna-7B's layers, as deep as one card holds with fp32 AdamW states.
    "cuda": [
        Case("7B-shaped, 4 layers, stage 2, bf16-mixed, no checkpointing", "finetune",
             [*_GPU, "decoder.gradient_checkpointing=false"], decoder={"num_hidden_layers": 4}),
        Case("7B-shaped, 8 layers, stage 2, bf16-mixed, checkpointing", "finetune",
             [*_GPU, "decoder.gradient_checkpointing=true"], decoder={"num_hidden_layers": 8}),
        Case("7B-shaped, 8 layers, stage 1, bf16-mixed, checkpointing", "pretrain",
             [*_GPU, "decoder.gradient_checkpointing=true"], decoder={"num_hidden_layers": 8}),
        Case("7B-shaped, 8 layers, stage 2, bf16-true, checkpointing", "finetune",
             [*_GPU, "decoder.gradient_checkpointing=true", "trainer.precision=bf16-true"], decoder={"num_hidden_layers": 8}),
    ],
}


def _config(case: Case):
    from mmkit.core.config import compose

    return compose(case.overrides)


def predict(case: Case) -> dict:
    from mmkit.core.registry import load_components
    from mmkit.models.build import build_model
    from mmkit.planning.memory import predict_memory, step_spec, strategy_of

    load_components()
    cfg = _config(case)
    stage = cfg.recipe.stages[case.stage]
    prediction = predict_memory(lambda: build_model(cfg, "shapes", case.encoder, case.decoder), stage, case.stage,
                                step_spec(cfg, stage), strategy_of(cfg.trainer, 1))
    return prediction.as_dict()


def measure(case: Case, device: str) -> dict:
    """Runs in a child process: builds the model with real weights and trains three steps."""
    import lightning as L
    import torch

    from mmkit.core.registry import load_components
    from mmkit.models.build import as_dict, build_model
    from mmkit.planning.memory import step_spec, worst_case_batch
    from mmkit.training.module import LitVLM
    from mmkit.training.stages import configure_trainable

    load_components()
    cfg = _config(case)
    stage = cfg.recipe.stages[case.stage]
    torch.manual_seed(0)
    _warm_up(device)  # Lightning imports and sets up much on its first fit; that is not the step's memory
    before = _rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.device(device):
        model = build_model(cfg, "shapes", case.encoder, case.decoder)
    configure_trainable(model, list(stage.train), case.stage)
    batch = worst_case_batch(model, step_spec(cfg, stage), case.stage)
    batch = {**batch, "keys": [str(i) for i in range(len(batch["sample_lengths"]))], "skipped": [], "truncated": 0,
             "attention_mask": None}
    module = LitVLM(model, as_dict(stage.optimizer), as_dict(stage.schedule), total_steps=10)
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=cfg.trainer.precision,
                        gradient_clip_val=cfg.trainer.gradient_clip_val, max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch] * 3, batch_size=None))
    if device == "cuda":
        return {"measured": torch.cuda.max_memory_allocated() / GiB, "reserved": torch.cuda.max_memory_reserved() / GiB}
    return {"measured": (_peak_rss() - before) / GiB}


def _warm_up(device: str) -> None:
    import lightning as L
    import torch

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters())

    L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=1, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              ).fit(Tiny(), train_dataloaders=torch.utils.data.DataLoader([torch.ones(4)], batch_size=None))


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cases", type=int, nargs="*", help="indices into the device's cases (default: all)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cases = CASES[args.device]
    if args.child is not None:
        print("RESULT " + json.dumps(measure(cases[args.child], args.device)))
        return 0
    rows = []
    for index in args.cases if args.cases is not None else range(len(cases)):
        case = cases[index]
        predicted = predict(case)
        child = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", str(index)],
                               capture_output=True, text=True, cwd=ROOT,
                               env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)})
        result = next((json.loads(line[7:]) for line in child.stdout.splitlines() if line.startswith("RESULT ")), None)
        if result is None:
            print(child.stdout[-2000:], child.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"case {case.name!r}: the measuring process failed (exit {child.returncode})")
        row = {"case": case.name, **asdict(case), "predicted": predicted, **result,
               "ratio": predicted["peak"] / result["measured"]}
        rows.append(row)
        print(f"{case.name}: predicted {predicted['peak']:.2f} GiB (weights {predicted['weights']:.2f}, "
              f"gradients {predicted['gradients']:.2f}, optimizer {predicted['optimizer']:.2f}, activations "
              f"{predicted['activations']:.2f}), measured {result['measured']:.2f} GiB: "
              f"predicted / measured = {row['ratio']:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
