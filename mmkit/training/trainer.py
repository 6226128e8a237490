"""Build a Lightning Trainer from the ``trainer`` config group (cpu, gpu, ddp, fsdp presets)."""
from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.optim import Optimizer

from mmkit.core.errors import ConfigError
from mmkit.training.resume import WEIGHTS_FILE, SafeCheckpointIO


def _module_classes(model: nn.Module, names: list[str], key: str) -> set[type]:
    """Resolve layer class names (e.g. LlamaDecoderLayer) against the model actually built."""
    found = {type(module).__name__: type(module) for module in model.modules()}
    missing = [name for name in names if name not in found]
    if missing:
        raise ConfigError(f"{key}: {missing} are not layers of this model (it has e.g. {sorted(found)[:8]})")
    return {found[name] for name in names}


def _full_state_dicts(model: nn.Module, rank0_only: bool) -> Any:
    """FSDP's context in which model and optimizer state dicts are whole and keyed by parameter
    names: gathered to rank 0 for a save, on every rank for a load.

    The optimizer state is moved to host memory only from an accelerator. torch gathers each of a
    parameter's optimizer states (AdamW's ``exp_avg``, then ``exp_avg_sq``) into one reused buffer,
    and "offloading" a CPU tensor returns that buffer itself, so on CPU both states came out as the
    same tensor (the last one gathered) and a resumed run took different steps."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    on_accelerator = next(model.parameters()).device.type != "cpu"
    return FSDP.state_dict_type(
        module=model, state_dict_type=StateDictType.FULL_STATE_DICT,
        state_dict_config=FullStateDictConfig(offload_to_cpu=True, rank0_only=rank0_only),
        optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=on_accelerator, rank0_only=rank0_only),
    )


class MmkitFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy that saves into and resumes from mmkit's checkpoint folders
    (:class:`~mmkit.training.resume.SafeCheckpointIO`) with ``state_dict_type: full``.

    The optimizer state is saved keyed by parameter names, as FSDP gives it (Lightning re-keys it by
    position), and gathered as :func:`_full_state_dicts` explains."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if self._state_dict_type != "full":
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        # What FSDPStrategy does for a full state dict (rank 0 hands it to the checkpoint IO), less its
        # refusal of a path that is a folder: mmkit's checkpoints are folders, and every rank makes
        # that check while rank 0 writes, so a rank that looked after rank 0 had written refused it.
        return super(FSDPStrategy, self).save_checkpoint(checkpoint, filepath, storage_options)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with _full_state_dicts(self.model, rank0_only=True):
            return FSDP.optim_state_dict(self.model, getattr(optimizer, "_optimizer", optimizer))

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not (path / WEIGHTS_FILE).is_file():
            return super().load_checkpoint(checkpoint_path, weights_only)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        checkpoint = self.checkpoint_io.load_checkpoint(path)
        optimizer_states = checkpoint.get("optimizer_states") or []
        if len(optimizer_states) != len(self.optimizers):
            raise ConfigError(f"resume: {path} holds {len(optimizer_states)} optimizer states, this stage has "
                              f"{len(self.optimizers)} optimizers")
        with _full_state_dicts(self.model, rank0_only=False):
            # The checkpoint holds the trained weights only; the frozen ones were built from the same source.
            unexpected = self.model.load_state_dict(checkpoint["state_dict"], strict=False).unexpected_keys
            if unexpected:
                raise ConfigError(f"resume: {path} holds weights this model does not have, e.g. {unexpected[:3]}")
            for optimizer, state in zip(self.optimizers, optimizer_states):
                if any(isinstance(key, int) for key in state["state"]):
                    raise ConfigError(f"resume: {path}'s optimizer state is keyed by position, as mmkit before "
                                      "name-keyed FSDP checkpoints wrote it, and cannot be resumed exactly")
                optimizer.load_state_dict(FSDP.optim_state_dict_to_load(self.model, optimizer, state))
        return checkpoint


class FSDPOnCPUStrategy(MmkitFSDPStrategy):
    """Lightning's FSDPStrategy, for ``accelerator: cpu``: how several processes are tested on a
    machine without GPUs. torch's FSDP shards CPU tensors over gloo once it is told the device,
    but Lightning refuses a CPU accelerator for FSDPStrategy itself (by its exact type), and gives
    FSDP no device on a CPU, where FSDP then asks for an accelerator."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(
            module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs,
        )
        self.kwargs.pop("auto_wrap_policy", None)  # applied: Lightning's own setup sees the wrapped model
        return super()._setup_model(wrapped)


def build_strategy(strategy: Any, model: nn.Module, accelerator: str = "auto") -> Any:
    """A strategy name passes through; a mapping with ``name: ddp`` becomes a DDPStrategy with its
    options (e.g. ``process_group_backend: gloo``), one with ``name: fsdp`` an FSDPStrategy."""
    if not isinstance(strategy, dict):
        return strategy
    options = dict(strategy)
    name = options.pop("name", None)
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(**options)
    if name != "fsdp":
        raise ConfigError(f"trainer.strategy.name={name!r}: only 'ddp' and 'fsdp' take options; use a plain name otherwise")
    wrap = options.pop("auto_wrap", [])
    checkpointed = options.pop("activation_checkpointing", [])
    return (FSDPOnCPUStrategy if accelerator == "cpu" else MmkitFSDPStrategy)(
        auto_wrap_policy=_module_classes(model, list(wrap), "trainer.strategy.auto_wrap") or None,
        activation_checkpointing_policy=_module_classes(model, list(checkpointed), "trainer.strategy.activation_checkpointing")
        or None,
        **options,
    )


def shards_parameters(strategy: Any) -> bool:
    """Whether the strategy (a name or a mapping with ``name``) shards the model's parameters in
    place, as FSDP does: after a fit each rank's parameters hold its shard only."""
    name = strategy.get("name") if isinstance(strategy, dict) else strategy
    return isinstance(name, str) and name.startswith("fsdp")


def build_loggers(logger_cfg: dict[str, Any] | None, stage_dir: Path) -> list[Logger]:
    """``metrics.csv`` in the stage's folder always, and the ``logger`` group's choice beside it:
    TensorBoard event files in the stage's folder, or a W&B run in ``<run>/wandb`` named after the
    run folder and the stage (grouped by the run folder)."""
    loggers: list[Logger] = [CSVLogger(str(stage_dir), name="", version="")]
    options = dict(logger_cfg or {"name": "csv"})
    name = options.pop("name", "csv")
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(stage_dir), name="", version="", default_hp_metric=False))
    elif name == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("logger=wandb needs the wandb package: pip install wandb") from None
        from lightning.pytorch.loggers import WandbLogger

        run_dir = stage_dir.parent
        loggers.append(WandbLogger(save_dir=str(run_dir), name=f"{run_dir.name}/{stage_dir.name}", group=run_dir.name,
                                   project=options.get("project") or "mmkit", entity=options.get("entity"),
                                   offline=bool(options.get("offline", True))))
    elif name != "csv":
        raise ConfigError(f"logger.name={name!r}: choose csv, tensorboard or wandb")
    return loggers


def finish_loggers(trainer: L.Trainer) -> None:
    """End the stage's W&B run, so the next stage starts its own (its steps start again at 0)."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        wandb.finish()


# Third-party messages that say nothing about the user's run, dropped by their text and nothing
# else: Lightning's advertisements for its cloud products (once per stage), and torch's
# deprecation of a type Lightning's own code still checks against (a FutureWarning per batch).
_ADVERTISEMENTS = re.compile(r"^💡 Tip: .*(litlogger|litmodels)")
_LEAFSPEC_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
_LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropMessages(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_third_party_noise() -> None:
    """Drop the messages above at their source (their loggers, their warning's text); every other
    message of Lightning and torch still shows. Safe to call more than once."""
    for name in _LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(_ADVERTISEMENTS))
    warnings.filterwarnings("ignore", message=_LEAFSPEC_DEPRECATION, category=FutureWarning)


def build_trainer(
    trainer_cfg: dict[str, Any],
    model: nn.Module,
    stage_dir: Path,
    max_epochs: int,
    max_steps: int,
    callbacks: list[L.Callback] | None = None,
    checkpointing: ModelCheckpoint | None = None,
    logger_cfg: dict[str, Any] | None = None,
) -> L.Trainer:
    """``checkpointing``: the resumable checkpoints of the stage (:mod:`mmkit.training.resume`);
    a finished stage's weights are written by the recipe either way."""
    quiet_third_party_noise()
    options = dict(trainer_cfg)
    options["strategy"] = build_strategy(options.get("strategy", "auto"), model, options.get("accelerator", "auto"))
    return L.Trainer(
        **options,
        max_epochs=max_epochs,
        max_steps=max_steps,
        default_root_dir=str(stage_dir),
        logger=build_loggers(logger_cfg, stage_dir),
        enable_checkpointing=checkpointing is not None,
        plugins=[SafeCheckpointIO()],
        num_sanity_val_steps=0,
        callbacks=[*(callbacks or []), *([checkpointing] if checkpointing else [])],
    )
