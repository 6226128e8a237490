"""The LightningModule: one stage's optimisation of a VisionLanguageModel."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mmkit.core.distributed import gather_objects
from mmkit.core.errors import ConfigError, DataError, TrainingError
from mmkit.models.vlm import VisionLanguageModel
from mmkit.training.optimizer import build_adamw, parameter_groups, warmup_cosine
from mmkit.training.resume import restore_rng_states, rng_states

# What FSDP and activation checkpointing insert into the names of the layers they wrap; the state
# dicts they give (and so the checkpoints) name the parameters without them.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _unwrapped(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


class LitVLM(L.LightningModule):
    def __init__(
        self,
        model: VisionLanguageModel,
        optimizer: dict[str, Any],
        schedule: dict[str, Any],
        sample_log: Path | None = None,
        guards: dict[str, Any] | None = None,
        total_steps: int = 1,
    ) -> None:
        """``total_steps``: the optimizer steps of the stage, for the schedule. Given by the recipe:
        Lightning's ``estimated_stepping_batches`` would set up the training data before a
        resumed checkpoint is restored, and the data position would never be handed over."""
        super().__init__()
        self.model = model
        self.optimizer_cfg = optimizer
        self.schedule_cfg = schedule
        self.sample_log = sample_log
        self.total_steps = max(1, total_steps)
        self.guards = {"max_skip_fraction": 1.0, "min_samples_checked": 0, "max_nonfinite_steps": 0, **(guards or {})}
        self.samples_seen = 0
        self.skipped: list[tuple[str, str]] = []
        self.truncated = 0  # samples trained on their first data.max_length tokens
        self.recent_losses: list[float] = []
        self.nonfinite_steps = 0
        self._nonfinite_in_a_row = 0
        self._nonfinite_loss = False
        self._logged_keys = 0
        self._rng_to_restore: dict[str, Any] | None = None
        # A resumable checkpoint holds the trainable weights only; the frozen ones come from the
        # model's own sources (pretrained towers, earlier stages), as in the run it resumes.
        self.strict_loading = False

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self.skipped += batch["skipped"]
        self.samples_seen += len(batch["keys"])
        self.truncated += batch["truncated"]
        self._check_skip_fraction()
        if "input_ids" not in batch:  # every sample of this batch was skipped; the reasons are recorded
            # Alone, the batch is skipped whole. With other ranks, this one must still take part in
            # the step's gradient reduction, or theirs waits for it forever.
            return None if self.trainer.world_size == 1 else self._zero_loss()
        outputs = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            labels=batch["labels"],
            position_ids=batch["position_ids"],
            sample_lengths=batch["sample_lengths"],
        )
        if self.sample_log is not None:
            with open(self.sample_log, "a") as handle:
                handle.writelines(f"{key}\n" for key in batch["keys"])
            self._logged_keys += len(batch["keys"])
        loss = outputs.loss
        value = loss.item()
        if math.isfinite(value):
            self.recent_losses = (self.recent_losses + [value])[-10:]
        else:
            # Its backward makes the gradients non-finite too, and on_before_optimizer_step skips
            # the step: one path for every rank, with or without gradient accumulation.
            self._nonfinite_loss = True
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["keys"]))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=False)
        return loss

    def _zero_loss(self) -> torch.Tensor:
        """0, through a forward pass that reaches every trained weight (the text-only path feeds
        the connector a zero image), so each gets a zero gradient."""
        token = torch.full((1, 1), self.model.tokenizer.pad_token_id, device=self.device)
        return 0 * self.model(input_ids=token).logits.float().sum()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        gradients = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = not gradients or bool(torch.isfinite(torch.nn.utils.get_total_norm(gradients)))
        what = "loss" if self._nonfinite_loss else "gradient"
        self._nonfinite_loss = False
        if self._any_rank(not finite):
            # AdamW leaves parameters without a gradient untouched: the step is skipped whole.
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = None
            self._nonfinite(what)
        else:
            self._nonfinite_in_a_row = 0

    def _any_rank(self, flag: bool) -> bool:
        # Every rank must skip the same steps, or DDP's collectives fall out of step.
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=False))

    def _nonfinite(self, what: str) -> None:
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        limit = int(self.guards["max_nonfinite_steps"])
        if limit and self._nonfinite_in_a_row >= limit:
            raise TrainingError(
                f"the {what} was NaN or infinite for {self._nonfinite_in_a_row} steps in a row "
                f"(guards.max_nonfinite_steps={limit}) at step {self.global_step}; the run stopped, "
                "and the stage's last checkpoints are kept (lower the learning rate or check the data, then resume=<run folder>)"
            )

    def _check_skip_fraction(self) -> None:
        read = self.samples_seen + len(self.skipped)
        limit = float(self.guards["max_skip_fraction"])
        exceeded = read >= int(self.guards["min_samples_checked"]) and len(self.skipped) > limit * read
        if self._any_rank(exceeded):  # asked every step, so every rank stops at the same one
            reasons = sorted({reason for _, reason in self.skipped})
            raise DataError(
                f"{len(self.skipped)} of {read} samples read so far were skipped ({len(self.skipped) / read:.1%}), "
                f"more than guards.max_skip_fraction={limit}; e.g. {reasons[:3]}. Every skipped key and "
                "reason is in the stage's skipped.jsonl"
            )

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning clips through its precision plugin, which refuses two of mmkit's setups: FSDP
        (the norm of sharded gradients needs the root FSDP module's ``clip_grad_norm_``, which adds
        up every rank's shards) and a fused AdamW under bf16-mixed (the refusal is meant for fp16's
        gradient scaler, which bf16 does not use: its gradients are already at their true scale)."""
        if not gradient_clip_val:
            return
        from lightning.pytorch.strategies import FSDPStrategy

        by_norm = (gradient_clip_algorithm or "norm") == "norm"
        if isinstance(self.trainer.strategy, FSDPStrategy) and by_norm:
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
        elif self._gradient_scaler() is None:
            parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if by_norm:
                torch.nn.utils.clip_grad_norm_(parameters, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_value_(parameters, gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _gradient_scaler(self) -> Any:
        trainer = self._trainer  # None when the module is used outside a Trainer
        return getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None

    def _trainable_keys(self) -> set[str]:
        """This stage's trained weights, as Lightning's state dict names them: what a checkpoint holds."""
        return {f"model.{_unwrapped(name)}" for name, p in self.model.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = self._trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        # Every rank's own counters and generators (this hook runs on every rank; rank 0 writes).
        checkpoint["mmkit"] = {"ranks": gather_objects({
            "samples_seen": self.samples_seen,
            "skipped": [list(item) for item in self.skipped],
            "truncated": self.truncated,
            "recent_losses": self.recent_losses,
            "nonfinite_steps": self.nonfinite_steps,
            "nonfinite_in_a_row": self._nonfinite_in_a_row,
            "logged_keys": self._logged_keys,
            "rng": rng_states(),
        })}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = self._trainable_keys()
        saved = set(checkpoint["state_dict"])
        if saved != trainable:
            raise ConfigError(
                f"resume: the checkpoint's trained weights do not match this stage's (missing "
                f"{sorted(trainable - saved)[:3]}, unexpected {sorted(saved - trainable)[:3]}); "
                "was recipe.stages.<stage>.train or decoder.lora changed?"
            )
        ranks = checkpoint["mmkit"]["ranks"]
        state = ranks[self.global_rank] if self.global_rank < len(ranks) else ranks[0]
        self.samples_seen = state["samples_seen"]
        self.skipped = [tuple(item) for item in state["skipped"]]
        self.truncated = state.get("truncated", 0)  # checkpoints written before the count have none
        self.recent_losses = list(state["recent_losses"])
        self.nonfinite_steps = state["nonfinite_steps"]
        self._nonfinite_in_a_row = state["nonfinite_in_a_row"]
        self._rng_to_restore = state["rng"]
        if self.sample_log is not None:
            # Keys logged after the checkpoint belong to steps the resumed run trains again.
            self._logged_keys = state["logged_keys"]
            lines = self.sample_log.read_text().splitlines(keepends=True) if self.sample_log.exists() else []
            self.sample_log.write_text("".join(lines[: self._logged_keys]))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # As late as possible: creating the DataLoader's iterator, at the first fetch, draws from
        # torch's generator, which the uninterrupted run did before its checkpoint.
        if self._rng_to_restore is not None:
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def configure_optimizers(self) -> dict[str, Any]:
        groups = parameter_groups(self.model, self.optimizer_cfg)
        optimizer_cfg = dict(self.optimizer_cfg)
        if optimizer_cfg.get("fused") is None and self._gradient_scaler() is not None:
            # fp16's gradient scaler with a fused AdamW unscales inside the step, after Lightning
            # would have clipped the still-scaled gradients; Lightning refuses it, so: foreach.
            optimizer_cfg["fused"] = False
        optimizer = build_adamw(groups, optimizer_cfg)
        total_steps = self.total_steps
        warmup_steps = max(1, math.ceil(float(self.schedule_cfg.get("warmup_ratio", 0.03)) * total_steps))
        min_ratio = float(self.schedule_cfg.get("min_lr_ratio", 0.0))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

