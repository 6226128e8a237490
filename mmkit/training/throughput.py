"""Throughput of a training run: tokens/s, images/s, share of real tokens, model FLOPs and MFU.

FLOPs follow the usual convention (Kaplan et al.; PaLM, appendix B): 2 FLOPs per weight per token
in the forward pass, twice that again in the backward pass for weights that train (6N in all),
only the activation-gradient half for frozen weights the gradient flows through (4N), nothing
backward for a frozen tower no gradient reaches (2N). Attention adds ``4 * layers * width * s**2``
per sample of ``s`` tokens forward, x3 with its backward. Only real tokens count: padding is
work the accelerator does, not work the model needs, so a padded run shows a lower MFU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from mmkit.models.vlm import VisionLanguageModel

# Dense (not 2:4 sparse) bf16 tensor-core peaks from NVIDIA's data sheets, by device-name fragment.
PEAK_BF16_TFLOPS = {
    "h200": 989.0,
    "h100 pcie": 756.0,
    "h100": 989.0,
    "a100": 312.0,
    "l40s": 362.0,
    "a10g": 70.0,
    "a10": 125.0,
    "l4": 121.0,
}


def device_peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a CUDA device, from its name; ``None`` where unknown (CPU included)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((peak for fragment, peak in PEAK_BF16_TFLOPS.items() if fragment in name), None)


@dataclass(frozen=True)
class FlopModel:
    """FLOPs of one training step of a model, as a function of what the batch holds."""

    flops_per_image: float  # encoder and connector, forward and (where they train) backward
    flops_per_token: float  # the decoder's weights
    flops_per_squared_token: float  # the decoder's attention, per sample length squared

    @classmethod
    def of(cls, model: VisionLanguageModel) -> "FlopModel":
        encoder, connector, decoder = model.encoder, model.connector, model.decoder
        encoder_tokens = encoder.num_patches + encoder.num_prefix_tokens
        # The patch embedding sees each patch once; the blocks see every token, CLS included.
        encoder_forward = (
            2 * _matmul_weights(encoder, torch.nn.Conv2d) * encoder.num_patches
            + 2 * _matmul_weights(encoder, torch.nn.Linear) * encoder_tokens
            + 4 * getattr(encoder, "num_blocks", 0) * encoder.hidden_size * encoder_tokens**2
        )
        # The tower needs a backward pass only when it trains.
        encoder_flops = encoder_forward * (3 if any(p.requires_grad for p in encoder.parameters()) else 1)
        connector_flops = _training_flops(connector) * encoder.num_tokens
        config = decoder.model.config
        heads = getattr(config, "num_attention_heads", 0)
        head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
        attention = 3 * 4 * getattr(config, "num_hidden_layers", 0) * heads * head_dim
        return cls(float(encoder_flops + connector_flops), float(_training_flops(decoder)), float(attention))

    def step_flops(self, num_images: int, num_tokens: int, sum_squared_lengths: int) -> float:
        return (
            self.flops_per_image * num_images
            + self.flops_per_token * num_tokens
            + self.flops_per_squared_token * sum_squared_lengths
        )


def _matmul_weights(module: torch.nn.Module, kind: type = torch.nn.Linear, trainable: bool | None = None) -> int:
    """Weights of ``kind`` layers: the matmuls. Embedding lookups, norms and position tables are
    not multiplied by every token, so they are left out."""
    return sum(
        parameter.numel()
        for layer in module.modules()
        if isinstance(layer, kind)
        for parameter in layer.parameters(recurse=False)
        if trainable is None or parameter.requires_grad == trainable
    )


def _training_flops(module: torch.nn.Module) -> int:
    """Per token, forward and backward, of a part the gradient flows through: weights that train
    cost 2 + 4, frozen ones 2 + 2 (the activation gradient only)."""
    return 6 * _matmul_weights(module, trainable=True) + 4 * _matmul_weights(module, trainable=False)


class ThroughputMonitor(L.Callback):
    """Logs throughput every step (``throughput/*``) and keeps the stage's totals for summary.json.

    Time runs from one step's end to the next, so time spent waiting for data counts against
    the rate; ``data_wait_share`` says how much of it the loop spent blocked on the next batch,
    as the train dataloader clocks it (``wait_seconds``: mmkit's :class:`ResumableBatches`); the
    rest of the gap between steps is Lightning's own work (hooks, logging), not data.
    """

    def __init__(self, flop_model: FlopModel, peak_tflops: float | None = None) -> None:
        # The FLOP model is taken from the unwrapped model: FSDP would show only local shards.
        self.flop_model = flop_model
        self.peak_tflops = peak_tflops
        self.totals = {"tokens": 0, "real_tokens": 0, "images": 0, "samples": 0, "flops": 0.0, "seconds": 0.0, "wait": 0.0}
        self._last_end: float | None = None
        self._waited = 0.0
        self.wait_known = False  # whether the train dataloader clocks its waits

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak_tflops is None:
            self.peak_tflops = device_peak_tflops(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = self._now(pl_module)
        self._waited = self._wait_seconds(trainer) or 0.0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = self._now(pl_module)
        waited = self._wait_seconds(trainer)
        self.wait_known = waited is not None
        wait = waited - self._waited if self.wait_known else 0.0
        self._waited = waited or 0.0
        if "input_ids" not in batch or self._last_end is None:
            self._last_end = now
            return
        seconds = max(now - self._last_end, 1e-9)
        self._last_end = now
        flops = self.flop_model.step_flops(batch["num_images"], batch["num_real_tokens"], batch["sum_squared_lengths"])
        step = {
            "tokens": batch["num_tokens"],
            "real_tokens": batch["num_real_tokens"],
            "images": batch["num_images"],
            "samples": len(batch["keys"]),
            "flops": flops,
            "seconds": seconds,
            "wait": wait,
        }
        for key, value in step.items():
            self.totals[key] += value
        pl_module.log_dict({f"throughput/{k}": v for k, v in self.rates(step).items() if v is not None}, on_step=True)

    def rates(self, counts: dict[str, float] | None = None) -> dict[str, float | None]:
        counts = counts or self.totals
        seconds = counts["seconds"] or float("nan")
        flops_per_s = counts["flops"] / seconds
        return {
            "tokens_per_s": counts["tokens"] / seconds,
            "real_tokens_per_s": counts["real_tokens"] / seconds,
            "images_per_s": counts["images"] / seconds,
            "samples_per_s": counts["samples"] / seconds,
            "real_token_share": counts["real_tokens"] / counts["tokens"] if counts["tokens"] else None,
            "model_tflops_per_s": flops_per_s / 1e12,
            "mfu": flops_per_s / (self.peak_tflops * 1e12) if self.peak_tflops else None,
            "data_wait_share": counts["wait"] / seconds if self.wait_known else None,
        }

    def summary(self) -> dict[str, Any]:
        """The stage's totals: rates over every step, and the peak they were measured against."""
        rates = {k: (round(v, 6) if v is not None else None) for k, v in self.rates().items()}
        return {**rates, "peak_tflops": self.peak_tflops, "steps_timed_s": round(self.totals["seconds"], 3)}

    @staticmethod
    def _wait_seconds(trainer: L.Trainer) -> float | None:
        return getattr(trainer.train_dataloader, "wait_seconds", None)

    @staticmethod
    def _now(pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # asynchronous kernels would flatter the rate
        return time.perf_counter()
