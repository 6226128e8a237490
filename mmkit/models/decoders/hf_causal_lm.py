"""Any transformers causal LM (``AutoModelForCausalLM``) with its tokenizer; optional LoRA."""
from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mmkit.core.errors import ConfigError
from mmkit.core.interfaces import IMAGE_TOKEN
from mmkit.core.registry import DECODERS
from mmkit.models.decoders import packed_attention  # noqa: F401  registers attn_implementation=packed_sdpa
from mmkit.models.decoders.language_decoder import LanguageDecoder
from mmkit.models.hub import resolve_model_path


def prepare_tokenizer(path: str, model_max_length: int | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer and give it the ``<image>`` and pad tokens LLaVA training needs."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path))
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        # LLaVA v1 pads with unk; a tokenizer without unk gets a dedicated pad token.
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if tokenizer.eos_token is None:
        raise ConfigError(f"decoder.path={path!r}: the tokenizer has no eos token to end replies with")
    if model_max_length:
        tokenizer.model_max_length = model_max_length
    return tokenizer


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Checkpoint every decoder layer, non-reentrant: reentrant checkpointing drops gradients when
    the inputs do not require grad (frozen embeddings in stage 1 and under LoRA). transformers 5.24
    renamed the method (``activation_checkpointing_enable``); older versions have the first name."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """``torch.compile`` each decoder layer in place (state dict keys unchanged) and return how many
    were compiled. Compiling fuses the chains of small kernels eager mode runs around the matmuls:
    RMSNorm with its float32 upcast, the rotary embedding on strided queries and keys, the MLP's
    activation, the residual adds (9% of a 7B-shaped step on an H200 went to the rotary embedding
    alone: experiments/bench/RESULTS.md). One layer's code serves them all. A size that changes
    (rows, row length, samples, longest sample) turns dynamic at its first change, which compiles
    once more; after the first few batches of a run nothing compiles."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = set(getattr(base, "_no_split_modules", None) or [])
    layers = [module for module in base.modules() if type(module).__name__ in layer_classes]
    if not layers:
        raise ConfigError(f"decoder.compile=true: {type(base).__name__} names no decoder layer class "
                          "(transformers' _no_split_modules), so mmkit cannot tell what to compile")
    for layer in layers:
        layer.compile()
    return len(layers)


@DECODERS.register("hf_causal_lm")
class HFCausalLM(LanguageDecoder):
    def __init__(
        self,
        path: str,
        dtype: str | None = None,
        attn_implementation: str | None = "sdpa",
        model_max_length: int = 2048,
        gradient_checkpointing: bool = False,
        lora: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.tokenizer = prepare_tokenizer(path, model_max_length)
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if dtype:
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ConfigError(f"decoder.dtype={dtype!r} is not a torch dtype (e.g. bfloat16, float32)")
            kwargs["dtype"] = getattr(torch, dtype)
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), **kwargs)
        if len(self.tokenizer) > model.get_input_embeddings().num_embeddings:
            # <image> positions are always overwritten by image features, so its init is irrelevant.
            model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self._attach(model, gradient_checkpointing, lora, compile)

    @classmethod
    def from_config(cls, config: PretrainedConfig, attn_implementation: str | None = "sdpa",
                    gradient_checkpointing: bool = False, lora: dict[str, Any] | None = None) -> "HFCausalLM":
        """The LM of ``config``'s shapes with fresh weights, on the current default device (the meta
        device or a fake-tensor mode for planning a run). There is no tokenizer: the vocabulary gets
        the one row training's tokenizer adds for ``<image>``, which is its last id."""
        decoder = cls.__new__(cls)
        LanguageDecoder.__init__(decoder)
        config = copy.deepcopy(config)
        config.vocab_size += 1
        decoder.tokenizer = _ImageTokenOnly(config.vocab_size - 1)
        options = {"attn_implementation": attn_implementation} if attn_implementation else {}
        decoder._attach(AutoModelForCausalLM.from_config(config, **options), gradient_checkpointing, lora)
        return decoder

    def _attach(self, model: PreTrainedModel, gradient_checkpointing: bool, lora: dict[str, Any] | None,
                compile: bool = False) -> None:
        self.model = model
        if gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        self.lora_enabled = bool(lora and lora.get("enabled"))
        if self.lora_enabled:
            self._apply_lora(lora)
        if compile:
            compile_decoder_layers(self.model)

    def _apply_lora(self, lora: dict[str, Any]) -> None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=int(lora.get("r", 8)),
            lora_alpha=int(lora.get("alpha", 16)),
            lora_dropout=float(lora.get("dropout", 0.05)),
            target_modules=list(lora.get("target_modules") or ["q_proj", "k_proj", "v_proj", "o_proj"]),
            task_type="CAUSAL_LM",
        )
        try:
            self.model = get_peft_model(self.model, config)
        except ValueError as exc:
            raise ConfigError(f"decoder.lora.target_modules: {exc}") from None

    def lora_parameter_names(self) -> set[str]:
        return {f"model.{name}" for name, _ in self.model.named_parameters() if "lora_" in name}


class _ImageTokenOnly:
    """Where only a model's shapes exist (planning), the one thing the forward pass asks of the
    tokenizer: the id of ``<image>``."""

    def __init__(self, image_token_id: int) -> None:
        self.image_token_id = image_token_id

    def convert_tokens_to_ids(self, token: str) -> int:
        if token != IMAGE_TOKEN:
            raise KeyError(f"a shapes-only decoder has no tokenizer: {token!r} is unknown")
        return self.image_token_id
