"""Any transformers causal LM (``AutoModelForCausalLM``) with its tokenizer; optional LoRA."""
from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mmkit.core.errors import ConfigError
from mmkit.core.interfaces import IMAGE_TOKEN
from mmkit.core.registry import DECODERS
from mmkit.models.decoders import packed_attention  # noqa: F401  registers attn_implementation=packed_sdpa
from mmkit.models.decoders.language_decoder import LanguageDecoder
from mmkit.models.hf_configs import read_hf_config
from mmkit.models.hub import resolve_model_path

try:  # newer transformers (5.25 here) may keep a GGUF file's weights packed unless told to dequantize them
    from transformers import GgufConfig
except ImportError:  # older versions always dequantize
    GgufConfig = None


def locate_weights(path: str, gguf_file: str | None = None) -> tuple[str, dict[str, Any]]:
    """``path`` resolved (``decoder.path``), and the ``gguf_file`` option of transformers'
    ``from_pretrained`` when the weights are a GGUF file in it (transformers dequantizes them)."""
    local = resolve_model_path(path, "decoder.path")
    if not gguf_file:
        return local, {}
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"decoder.gguf_file={gguf_file}: transformers reads GGUF files with the gguf package; "
                          "pip install gguf")
    folder = Path(local).expanduser()
    if folder.is_dir() and not (folder / gguf_file).is_file():
        there = sorted(p.name for p in folder.glob("*.gguf"))
        raise ConfigError(f"decoder.gguf_file={gguf_file}: no such file in {folder} (GGUF files there: "
                          f"{', '.join(there) or 'none'})")
    return local, {"gguf_file": gguf_file}


def prepare_tokenizer(path: str, model_max_length: int | None = None, gguf_file: str | None = None,
                      trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer (from ``gguf_file`` in ``path`` when given) and give it the ``<image>``
    and pad tokens LLaVA training needs. ``trust_remote_code`` is always passed: left unset,
    transformers asks on stdin whether to run a folder's own tokenizer code."""
    local, gguf = locate_weights(path, gguf_file)
    with _remote_code_refusal_named(path):
        tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code, **gguf)
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


@contextmanager
def _remote_code_refusal_named(path: str) -> Iterator[None]:
    """transformers refuses a folder that loads only through Python files of its own (an ``auto_map``)
    in a ValueError of several lines; this says it in one, naming the key."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ConfigError(f"decoder.path={path}: this model loads only by running Python files of its own "
                          "(its auto_map); if you trust them, allow them with trust_remote_code=true on the command "
                          "line (decoder.trust_remote_code=true for python -m mmkit.train)") from None


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
    activation, the residual adds (their share of a step is measured in experiments/bench/RESULTS.md).
    One layer's code serves them all. A size that changes
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


def quantize_4bit_options(lora: dict[str, Any] | None, gguf_file: str | None = None) -> dict[str, Any]:
    """The ``quantization_config`` that loads the base in 4-bit NF4 for QLoRA when
    ``decoder.lora.quantize_4bit`` asks for it (LLaVA's ``--bits 4``), else nothing. bitsandbytes'
    kernels run on CUDA GPUs only: where they cannot, this fails before any weight is read."""
    if not (lora and lora.get("quantize_4bit")):
        return {}
    key = "decoder.lora.quantize_4bit=true"
    if not lora.get("enabled"):
        raise ConfigError(f"{key}: a 4-bit base trains through LoRA adapters only; set decoder.lora.enabled=true")
    if gguf_file:
        raise ConfigError(f"{key}: not with decoder.gguf_file={gguf_file}, whose weights transformers dequantizes "
                          "itself; point decoder.path at a transformers model folder or hub id")
    missing = []
    if not torch.cuda.is_available():
        missing.append("there is no CUDA GPU here")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed")
    if missing:
        raise ConfigError(f"{key}: a 4-bit (QLoRA) base needs a CUDA GPU and bitsandbytes (pip install bitsandbytes), "
                          f"but {' and '.join(missing)}; decoder.lora.quantize_4bit=false trains LoRA on the full base")
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=torch.bfloat16)}


def _model_options(dtype: str | None, attn_implementation: str | None) -> dict[str, Any]:
    """``dtype`` and ``attn_implementation`` as transformers takes them, for loading or building."""
    options: dict[str, Any] = {}
    if dtype:
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"decoder.dtype={dtype!r} is not a torch dtype (e.g. bfloat16, float32)")
        options["dtype"] = getattr(torch, dtype)
    if attn_implementation:
        options["attn_implementation"] = attn_implementation
    return options


class HFCausalLM(LanguageDecoder):
    """A transformers causal LM. Config key ``decoder.name: hf_causal_lm`` builds it with
    :meth:`from_pretrained` from the other keys."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None,
        image_token_id: int | None = None,
        gradient_checkpointing: bool = False,
        lora: dict[str, Any] | None = None,
        compile: bool = False,
    ) -> None:
        """``tokenizer`` holds ``<image>`` and a pad token (:func:`prepare_tokenizer`); a model built
        from its config alone has none, and is given the id its ``<image>`` row has instead."""
        super().__init__()
        if image_token_id is None:
            if tokenizer is None:
                raise ValueError("HFCausalLM: without a tokenizer, image_token_id is needed")
            image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.tokenizer = tokenizer
        self._image_token_id = image_token_id
        self.model = model
        if gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        self.lora_enabled = bool(lora and lora.get("enabled"))
        if self.lora_enabled:
            self._apply_lora(lora)
        if compile:
            compile_decoder_layers(self.model)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: str | None = None,
        attn_implementation: str | None = "sdpa",
        model_max_length: int = 2048,
        gradient_checkpointing: bool = False,
        lora: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        compile: bool = False,
        gguf_file: str | None = None,
    ) -> "HFCausalLM":
        """The LM and tokenizer saved at ``path`` (a hub id, a folder, ``zoo://NAME``,
        ``package://PACKAGE``), or in the GGUF file ``gguf_file`` there, the vocabulary grown by the
        tokens :func:`prepare_tokenizer` adds. ``lora.quantize_4bit``: the base in 4-bit (QLoRA,
        :func:`quantize_4bit_options`), its other weights in float32 for the adapters' training."""
        quantization = quantize_4bit_options(lora, gguf_file)
        tokenizer = prepare_tokenizer(path, model_max_length, gguf_file, trust_remote_code)
        local, gguf = locate_weights(path, gguf_file)
        if gguf and GgufConfig is not None:
            # Dequantized to dense weights, as training needs: transformers may otherwise keep a
            # GGUF file's weights packed where it has kernels for them, which cannot be trained,
            # and it marks the model quantized, which its exported copy would claim as well.
            gguf["quantization_config"] = GgufConfig(dequantize=True)
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, **gguf, **quantization,
                                  **_model_options(dtype, attn_implementation)}
        with _remote_code_refusal_named(path):
            model = AutoModelForCausalLM.from_pretrained(local, **kwargs)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            # <image> positions are always overwritten by image features, so its init is irrelevant.
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model.config.pad_token_id = tokenizer.pad_token_id
        if quantization:
            from peft import prepare_model_for_kbit_training

            # Freezes the base and upcasts its unquantized weights (norms, embeddings) to float32;
            # activation checkpointing is left to __init__, which makes it non-reentrant.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return cls(model, tokenizer, gradient_checkpointing=gradient_checkpointing, lora=lora, compile=compile)

    @classmethod
    def from_config(
        cls,
        config: PretrainedConfig,
        dtype: str | None = None,
        attn_implementation: str | None = "sdpa",
        gradient_checkpointing: bool = False,
        lora: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        compile: bool = False,
    ) -> "HFCausalLM":
        """The LM of ``config``'s shapes with fresh weights on the current default device. There is
        no tokenizer: the vocabulary gets the one row training's tokenizer adds for ``<image>``,
        which is its last id."""
        config = copy.deepcopy(config)
        config.vocab_size += 1
        options = {"trust_remote_code": trust_remote_code, **_model_options(dtype, attn_implementation)}
        model = AutoModelForCausalLM.from_config(config, **options)
        return cls(model, None, image_token_id=config.vocab_size - 1, gradient_checkpointing=gradient_checkpointing,
                   lora=lora, compile=compile)

    @classmethod
    def with_fresh_weights(
        cls,
        config_overrides: dict[str, Any] | None = None,
        *,
        path: str,
        dtype: str | None = None,
        attn_implementation: str | None = "sdpa",
        model_max_length: int = 2048,
        gradient_checkpointing: bool = False,
        lora: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        compile: bool = False,
        gguf_file: str | None = None,
    ) -> "HFCausalLM":
        """:meth:`from_config` with the config read from ``path`` (from ``gguf_file``'s metadata
        when given; no weights, no tokenizer, so ``model_max_length`` has nothing to set) and
        changed by ``config_overrides``. ``lora.quantize_4bit`` quantizes loaded weights only: the
        base built here is dense, so a plan counts a QLoRA base at its full size."""
        if gguf_file:
            locate_weights(path, gguf_file)  # the file's errors, named, before transformers reads it
        fields = {**read_hf_config(path, "decoder.path", gguf_file), **(config_overrides or {})}
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        return cls.from_config(config, dtype, attn_implementation, gradient_checkpointing, lora, trust_remote_code,
                               compile)

    @property
    def image_token_id(self) -> int:
        return self._image_token_id

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
            with warnings.catch_warnings():
                # peft reads transformers' deprecated `is_gradient_checkpointing`; the warning is
                # theirs to fix, and says nothing to an mmkit user.
                warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
                self.model = get_peft_model(self.model, config)
        except ValueError as exc:
            raise ConfigError(f"decoder.lora.target_modules: {exc}") from None

    def lora_parameter_names(self) -> set[str]:
        return {f"model.{name}" for name, _ in self.model.named_parameters() if "lora_" in name}


DECODERS.register("hf_causal_lm")(HFCausalLM.from_pretrained)
