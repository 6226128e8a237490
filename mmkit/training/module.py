"""The LightningModule: one stage's optimisation of a VisionLanguageModel."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mmkit.models.vlm import VisionLanguageModel


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up, then cosine decay to ``min_ratio`` (LLaVA's schedule)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LitVLM(L.LightningModule):
    def __init__(
        self,
        model: VisionLanguageModel,
        optimizer: dict[str, Any],
        schedule: dict[str, Any],
        sample_log: Path | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_cfg = optimizer
        self.schedule_cfg = schedule
        self.sample_log = sample_log
        self.samples_seen = 0
        self.skipped: list[tuple[str, str]] = []
        self.recent_losses: list[float] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self.skipped += batch["skipped"]
        if "input_ids" not in batch:
            return None  # every sample of this batch was skipped; the reasons are recorded
        outputs = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            labels=batch["labels"],
            position_ids=batch["position_ids"],
            sample_lengths=batch["sample_lengths"],
        )
        self.samples_seen += len(batch["keys"])
        if self.sample_log is not None:
            with open(self.sample_log, "a") as handle:
                handle.writelines(f"{key}\n" for key in batch["keys"])
        loss = outputs.loss
        self.recent_losses = (self.recent_losses + [loss.item()])[-10:]
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["keys"]))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=False)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        cfg = self.optimizer_cfg
        optimizer = torch.optim.AdamW(
            parameters,
            lr=float(cfg["lr"]),
            weight_decay=float(cfg.get("weight_decay", 0.0)),
            betas=tuple(cfg.get("betas", (0.9, 0.999))),
            eps=float(cfg.get("eps", 1e-8)),
        )
        total_steps = int(self.trainer.estimated_stepping_batches)
        warmup_steps = max(1, math.ceil(float(self.schedule_cfg.get("warmup_ratio", 0.03)) * total_steps))
        min_ratio = float(self.schedule_cfg.get("min_lr_ratio", 0.0))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
