"""Peak memory of a training step on each device, predicted without weights, data or a GPU.

The configured model runs real training steps (forward, loss, backward, clipping, AdamW) on fake
tensors (``torch._subclasses.FakeTensorMode``: shapes and dtypes, no storage, no arithmetic) while
a dispatch mode follows every allocation and free, as torch's ``MemTracker`` does. So the
activations, autocast copies, activation checkpointing and optimizer temporaries are those of
mmkit's own code, not of a formula. The trace is one process holding the whole model; the
strategies are derived from it:

- single device / DDP: the trace's peak as it is; DDP adds its gradient buckets (a second copy of
  the trainable gradients, Lightning leaves ``gradient_as_bucket_view`` off).
- FSDP full shard: weights, gradients and AdamW states split over the ranks; each rank holds in
  full the root unit (the modules outside any wrapped layer) and two wrapped layers (the running
  one and the prefetched one) in FSDP's compute dtype, plus the gradients of one layer while
  they are reduce-scattered. Its activations come from a trace with the weights in that dtype and
  each gradient dropped as soon as it is complete, as FSDP does.
- FSDP with CPU offload: the same, with each rank's shards of the weights, gradients and AdamW
  states in host memory (reported per GPU).

Fake tensors run on the CPU's kernels, so attention is the CPU's flash kernel, which keeps what
the GPU's flash kernels keep (output and log-sum-exp, not the attention matrix). What CUDA
kernels allocate inside themselves and the caching allocator's own overhead are not counted: the
plan keeps ``plan.headroom`` of each card free for them (experiments/plan/RESULTS.md has how far
real steps went above the prediction).
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from mmkit.core.errors import ConfigError
from mmkit.models.parameters import parameter_count
from mmkit.models.vlm import VisionLanguageModel
from mmkit.training.optimizer import build_adamw
from mmkit.training.stages import configure_trainable

IGNORE_INDEX = -100
GiB = 2**30


@dataclass(frozen=True)
class Strategy:
    """How the ranks hold the model, as the plan needs to know it."""

    kind: str  # single, ddp, fsdp
    world_size: int
    cpu_offload: bool = False
    wrapped: tuple[str, ...] = ()  # FSDP's wrapped layer classes


@dataclass(frozen=True)
class StepSpec:
    """What one micro-batch step looks like: the worst case, every row at full length."""

    micro_batch: int
    sequence_length: int
    precision: str  # Lightning's: 32-true, bf16-mixed, bf16-true, 16-mixed
    activation_checkpointing: bool
    fused_adamw: bool = True


@dataclass(frozen=True)
class MemoryPrediction:
    """Bytes on each accelerator at the step's peak, and what makes them up."""

    peak: int
    weights: int
    gradients: int
    optimizer: int
    activations: int  # activations and the step's temporaries (autocast copies, logits, workspace)
    host_per_rank: int = 0  # CPU offload: what each rank keeps in host memory

    def as_dict(self) -> dict[str, float]:
        return {key: round(value / GiB, 3) for key, value in vars(self).items()}


def strategy_of(trainer: DictConfig, hardware_gpus_per_node: int) -> Strategy:
    """The strategy a ``trainer`` config asks for; ``devices: auto`` is the hardware's GPUs per node."""
    devices = trainer.get("devices", 1)
    if devices in ("auto", -1, None):
        devices = hardware_gpus_per_node
    if not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"trainer.devices={devices!r}: plan needs a number of devices per node")
    nodes = trainer.get("num_nodes", 1)
    if not isinstance(nodes, int) or nodes < 1:
        raise ConfigError(f"trainer.num_nodes={nodes!r}: plan needs a positive number of nodes")
    world_size = devices * nodes
    strategy = trainer.get("strategy", "auto")
    if isinstance(strategy, str):
        if strategy.startswith("fsdp"):
            return Strategy("fsdp", world_size, wrapped=())
        if strategy.startswith("ddp") or (strategy == "auto" and world_size > 1):
            return Strategy("ddp", world_size)
        if strategy in ("auto", "single_device"):
            return Strategy("single", world_size)
        raise ConfigError(f"trainer.strategy={strategy!r}: plan knows auto, ddp and fsdp")
    if strategy.get("name") != "fsdp":
        raise ConfigError(f"trainer.strategy.name={strategy.get('name')!r}: plan knows auto, ddp and fsdp")
    sharding = strategy.get("sharding_strategy", "FULL_SHARD")
    if sharding != "FULL_SHARD":
        raise ConfigError(f"trainer.strategy.sharding_strategy={sharding}: plan models FULL_SHARD only")
    return Strategy("fsdp", world_size, cpu_offload=bool(strategy.get("cpu_offload", False)),
                    wrapped=tuple(strategy.get("auto_wrap") or ()))


def step_spec(cfg: DictConfig, stage: DictConfig, sequence_length: int | None = None) -> StepSpec:
    strategy = cfg.trainer.get("strategy")
    checkpointed = bool(cfg.decoder.get("gradient_checkpointing")) or bool(
        not isinstance(strategy, str) and strategy and strategy.get("activation_checkpointing"))
    fused = stage.optimizer.get("fused")
    return StepSpec(
        micro_batch=int(stage.micro_batch_size),
        sequence_length=int(sequence_length or cfg.data.max_length),
        precision=str(cfg.trainer.precision),
        activation_checkpointing=checkpointed,
        fused_adamw=cfg.trainer.accelerator != "cpu" if fused is None else bool(fused),
    )


def predict_memory(build: Callable[[], VisionLanguageModel], stage: DictConfig, stage_key: str,
                   spec: StepSpec, strategy: Strategy) -> MemoryPrediction:
    """Per-device peak of ``stage``'s training steps for the model ``build`` makes (called under a
    fake-tensor mode, so it must build on the default device)."""
    if strategy.kind != "fsdp":
        trace = _trace(build, stage, stage_key, spec, compute_dtype_weights=False, keep_gradients=True)
        buckets = trace.trainable_bytes if strategy.kind == "ddp" else 0
        return MemoryPrediction(
            peak=trace.peak + buckets,
            weights=trace.weight_bytes,
            gradients=trace.trainable_bytes + buckets,
            optimizer=trace.optimizer_bytes,
            activations=trace.peak - trace.weight_bytes - trace.trainable_bytes - trace.optimizer_bytes,
        )
    # FSDP: the activations of a step with weights in the compute dtype and no gradient kept.
    trace = _trace(build, stage, stage_key, spec, compute_dtype_weights=True, keep_gradients=False,
                   wrapped=strategy.wrapped)
    world = strategy.world_size
    master = _master_dtype_size(spec.precision, trace.weight_dtype_size)
    compute = _compute_dtype_size(spec.precision, master)
    # What a rank owns: its shard of the weights, gradients and AdamW's two moments (master dtype).
    owned = {"weights": trace.parameters * master // world, "gradients": trace.trainable * master // world,
             "optimizer": 2 * trace.trainable * master // world}
    # What it gathers: the root unit throughout, the running and the prefetched layer; and the
    # full gradients of the root and of one layer before they are reduce-scattered.
    gathered_weights = (trace.root_parameters + 2 * trace.largest_unit) * compute
    gathered_gradients = (trace.root_trainable + trace.largest_trainable_unit) * compute
    activations = trace.peak - trace.parameters * compute
    on_device = {key: 0 if strategy.cpu_offload else value for key, value in owned.items()}
    weights = gathered_weights + on_device["weights"]
    gradients = gathered_gradients + on_device["gradients"]
    return MemoryPrediction(
        peak=weights + gradients + on_device["optimizer"] + activations,
        weights=weights,
        gradients=gradients,
        optimizer=on_device["optimizer"],
        activations=activations,
        host_per_rank=sum(owned.values()) if strategy.cpu_offload else 0,
    )


@dataclass(frozen=True)
class _Trace:
    peak: int  # bytes, the highest the traced steps reached
    parameters: int  # counts
    trainable: int
    weight_bytes: int
    trainable_bytes: int
    optimizer_bytes: int
    weight_dtype_size: int
    root_parameters: int = 0  # outside every wrapped layer (FSDP's root unit)
    root_trainable: int = 0
    largest_unit: int = 0  # parameters of the largest wrapped layer
    largest_trainable_unit: int = 0  # trainable parameters of the wrapped layer with the most


def _trace(build: Callable[[], VisionLanguageModel], stage: DictConfig, stage_key: str, spec: StepSpec,
           compute_dtype_weights: bool, keep_gradients: bool, wrapped: tuple[str, ...] = ()) -> _Trace:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        with _module_to_for_fake_tensors():
            model = build()
        weight_dtype_size = next(model.decoder.parameters()).element_size()
        if spec.precision.endswith("-true") or compute_dtype_weights:
            _fake_safe_to(model, _dtype(spec.precision, default=next(model.decoder.parameters()).dtype))
        configure_trainable(model, list(stage.train), f"recipe.stages.{stage_key}.train")
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_adamw(trainable, {**stage.optimizer, "fused": spec.fused_adamw}) if keep_gradients else None
        if not keep_gradients:
            for parameter in trainable:
                parameter.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        batch = worst_case_batch(model, spec, stage_key)
        tracker = _PeakTracker()
        tracker.track([*model.parameters(), *model.buffers(), *_batch_tensors(batch)])
        with tracker:
            # Two steps: the second one runs with AdamW's states in place, as every later step does.
            for _ in range(2 if keep_gradients else 1):
                with _autocast(spec.precision):
                    loss = model(**batch).loss
                loss.backward()
                if optimizer is not None:
                    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        units = [m for m in model.modules() if type(m).__name__ in wrapped]
        in_units = {id(p) for unit in units for p in unit.parameters()}
        root = [p for p in model.parameters() if id(p) not in in_units]
        return _Trace(
            peak=tracker.peak,
            parameters=parameter_count(model),
            trainable=parameter_count(trainable),
            weight_bytes=sum(p.nbytes for p in model.parameters()),
            trainable_bytes=sum(p.nbytes for p in trainable),
            optimizer_bytes=sum(t.nbytes for state in (optimizer.state.values() if optimizer else ())
                                for t in state.values() if torch.is_tensor(t)),
            weight_dtype_size=weight_dtype_size,
            root_parameters=parameter_count(root),
            root_trainable=parameter_count(root, trainable=True),
            largest_unit=max((parameter_count(unit) for unit in units), default=0),
            largest_trainable_unit=max((parameter_count(unit, trainable=True) for unit in units), default=0),
        )


class _PeakTracker(TorchDispatchMode):
    """Bytes held by live tensor storages, and the most they reached: every op's outputs are
    counted once per storage, and uncounted when the storage is freed. (torch's MemTracker does
    this and more, but installs gradient hooks on frozen weights, which fails.)"""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._counted: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage in self._counted:
                continue
            self._counted[storage] = True
            size = storage.nbytes()
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        outputs = func(*args, **(kwargs or {}))
        self.track(t for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor))
        return outputs


def _batch_tensors(batch: dict[str, Any]) -> list[torch.Tensor]:
    return [value for value in batch.values() if isinstance(value, torch.Tensor)]


def worst_case_batch(model: VisionLanguageModel, spec: StepSpec, stage_key: str) -> dict[str, Any]:
    """``micro_batch`` rows of ``sequence_length`` tokens, one sample each, an image at the start
    and the loss on every text token: the largest batch the configured data can produce."""
    length, rows = spec.sequence_length, spec.micro_batch
    image_tokens = model.num_image_tokens
    if length <= image_tokens:
        raise ConfigError(f"plan.sequence_length={length}: a sample must hold its {image_tokens} image tokens "
                          f"and some text (stage {stage_key})")
    input_ids = torch.randint(0, model.image_token_id, (rows, length))
    input_ids[:, 1:1 + image_tokens] = model.image_token_id
    labels = input_ids.clone()
    labels[:, : 1 + image_tokens] = IGNORE_INDEX
    size = model.encoder.image_stats.size
    return {
        "input_ids": input_ids,
        "labels": labels,
        "pixel_values": torch.zeros(rows, 3, size, size, dtype=torch.uint8),
        "position_ids": torch.arange(length).expand(rows, length),
        "sample_lengths": [length] * rows,
    }


def _fake_safe_to(model: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
    """``model.to(...)`` for fake tensors: it replaces each converted tensor in its module.
    torch's own swaps the old tensor for the new, which fails on a fake tensor whose conversion
    changes nothing (``Tensor.to`` returns the tensor itself), as when peft moves a new LoRA
    adapter to its base layer's device and dtype."""
    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            converted = parameter.to(device=device, dtype=dtype if parameter.is_floating_point() else None)
            if converted is not parameter:
                setattr(module, name, torch.nn.Parameter(converted, requires_grad=parameter.requires_grad))
        for name, buffer in module.named_buffers(recurse=False):
            converted = buffer.to(device=device, dtype=dtype if buffer.is_floating_point() else None)
            if converted is not buffer:
                module.register_buffer(name, converted, persistent=name not in module._non_persistent_buffers_set)
    return model


@contextlib.contextmanager
def _module_to_for_fake_tensors() -> Iterator[None]:
    """While the model is built on fake tensors: ``Module.to`` is :func:`_fake_safe_to`."""
    module_to = torch.nn.Module.to
    torch.nn.Module.to = _fake_safe_to
    try:
        yield
    finally:
        torch.nn.Module.to = module_to


def _dtype(precision: str, default: torch.dtype) -> torch.dtype:
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return default


def _master_dtype_size(precision: str, weight_dtype_size: int) -> int:
    """Bytes per element of the weights AdamW updates: the model's own dtype, or half under -true."""
    return 2 if precision.endswith("-true") and not precision.startswith("32") else weight_dtype_size


def _compute_dtype_size(precision: str, master: int) -> int:
    return 2 if precision.startswith(("bf16", "16")) else master


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    if precision.endswith("-mixed"):
        return torch.autocast("cpu", dtype=torch.bfloat16 if precision.startswith("bf16") else torch.float16)
    return contextlib.nullcontext()
