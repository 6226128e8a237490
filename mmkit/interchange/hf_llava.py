"""Exact interchange with transformers' ``LlavaForConditionalGeneration`` (the llava-hf format).

The two are the same computation: a CLIP vision tower read at ``vision_feature_layer`` (dropping
CLS under the ``default`` strategy), a Linear-GELU-Linear projector, and a causal LM whose input
has one ``<image>`` token per image feature. So weights move across unchanged; only their names
and the configs differ.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mmkit.core.errors import ConfigError
from mmkit.core.registry import TEMPLATES
from mmkit.data.templates.hf_chat import read_chat_template
from mmkit.data.templates.llava_tokenization import image_text_for
from mmkit.interchange.imported_run import write_imported_run
from mmkit.models.build import as_dict
from mmkit.models.connectors.mlp import MLPConnector
from mmkit.models.encoders.hf_clip import HFCLIPEncoder
from mmkit.models.load import load_run
from mmkit.models.vlm import VisionLanguageModel

SELECT_TO_STRATEGY = {"patch": "default", "cls_patch": "full"}
STRATEGY_TO_SELECT = {strategy: select for select, strategy in SELECT_TO_STRATEGY.items()}
# The stage whose checkpoint holds an imported model's projector.
# An imported model's processor, tokenizer and chat template, copied from its source folder
# unchanged, so that export writes them back as they were.
SOURCE_PROCESSOR = "hf_processor"
PROCESSOR_FILES = ("chat_template.jinja", "chat_template.json", "processor_config.json", "preprocessor_config.json",
                   "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")


def _projector_layers(model: VisionLanguageModel, connector_name: str) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    connector = model.connector
    layers = list(connector.layers) if isinstance(connector, MLPConnector) else []
    if len(layers) != 3 or not isinstance(layers[1], torch.nn.GELU) or layers[1].approximate != "none":
        raise ConfigError(
            f"connector.name={connector_name}: HF LlavaForConditionalGeneration's projector is exactly "
            "Linear -> GELU -> Linear (mlp2x_gelu); this connector has no slot there, so it cannot be exported"
        )
    return layers[0], layers[2]


def to_hf_llava(cfg: DictConfig, model: VisionLanguageModel) -> Any:
    """The model as a ``LlavaForConditionalGeneration`` (LoRA adapters merged into the LM)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if not isinstance(model.encoder, HFCLIPEncoder):
        raise ConfigError(
            f"encoder.name={cfg.encoder.name}: HF Llava's vision tower is a CLIP vision model (encoder.name=hf_clip); "
            "this encoder cannot be exported"
        )
    first, second = _projector_layers(model, cfg.connector.name)
    language_model = model.decoder.model
    if getattr(model.decoder, "lora_enabled", False):
        language_model = copy.deepcopy(language_model).merge_and_unload()
    encoder = model.encoder
    config = LlavaConfig(
        vision_config=copy.deepcopy(encoder.model.config),
        text_config=copy.deepcopy(language_model.config),
        image_token_index=model.image_token_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=SELECT_TO_STRATEGY[encoder.select],
        vision_feature_layer=encoder.layer,
        multimodal_projector_bias=first.bias is not None,
    )
    state = {f"model.vision_tower.{k}": v for k, v in encoder.model.state_dict().items()}
    state.update({f"model.multi_modal_projector.linear_1.{k}": v for k, v in first.state_dict().items()})
    state.update({f"model.multi_modal_projector.linear_2.{k}": v for k, v in second.state_dict().items()})
    state.update({f"model.language_model.{k}": v for k, v in language_model.get_decoder().state_dict().items()})
    state["lm_head.weight"] = language_model.get_output_embeddings().weight
    # Built on the CPU, not the meta device: non-persistent buffers (rotary frequencies, position
    # ids) are not in any state dict and must be computed by the constructors.
    llava = LlavaForConditionalGeneration(config)
    llava.load_state_dict(state, strict=True)
    llava.tie_weights()
    return llava.to(language_model.dtype).eval()


def hf_processor(cfg: DictConfig, model: VisionLanguageModel) -> Any:
    """A ``LlavaProcessor`` that prepares images and prompts the way this run was trained."""
    from transformers import LlavaImageProcessor, LlavaProcessor

    stats = model.encoder.image_stats
    image_processor = LlavaImageProcessor(
        do_pad=cfg.data.image_mode == "pad",
        size={"shortest_edge": stats.size},
        crop_size={"height": stats.size, "width": stats.size},
        image_mean=list(stats.mean),
        image_std=list(stats.std),
    )
    template = TEMPLATES.build(as_dict(cfg.template), "template")
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=model.tokenizer,
        patch_size=model.encoder.model.config.patch_size,
        vision_feature_select_strategy=SELECT_TO_STRATEGY[model.encoder.select],
        num_additional_image_tokens=model.encoder.num_prefix_tokens,
        chat_template=template.jinja(image_text_for(model.tokenizer)) if hasattr(template, "jinja") else None,
        image_token="<image>",
    )


def export_run(run: str | Path, out_dir: str | Path, trust_remote_code: bool = False) -> Path:
    """``python -m mmkit.export to-hf``: a run folder (or one stage's checkpoint in it) -> an HF folder.
    A model imported from an HF folder gets that folder's processor, tokenizer and chat template
    back unchanged; any other gets a processor that prompts and prepares images as mmkit trained it.
    ``trust_remote_code`` is the command line's (see :func:`~mmkit.models.load.load_run`)."""
    cfg, model = load_run(run, trust_remote_code)
    out = Path(out_dir)
    to_hf_llava(cfg, model).save_pretrained(out)
    kept = _run_folder(run) / SOURCE_PROCESSOR
    if kept.is_dir():
        _copy_processor_files(kept, out)
    else:
        hf_processor(cfg, model).save_pretrained(out)
    return out


def _run_folder(run: str | Path) -> Path:
    """The run folder of ``run``, which may name one stage's weights inside it."""
    path = Path(run)
    return path.parent.parent if path.is_file() else path


def _copy_processor_files(source: Path, target: Path) -> None:
    """Byte for byte: the processor, tokenizer and chat template files, and nothing else."""
    target.mkdir(parents=True, exist_ok=True)
    for pattern in PROCESSOR_FILES:
        for path in source.glob(pattern):
            shutil.copy2(path, target / path.name)


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> list[str]:
    """``python -m mmkit.export from-hf``: an HF Llava folder -> an mmkit run folder that
    ``model=OUT`` commands load, with the towers saved as ``OUT/vision_tower`` and
    ``OUT/language_model``. Returns the ``python -m mmkit.train`` overrides that train on from it."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoProcessor,
        CLIPImageProcessor,
        LlavaForConditionalGeneration,
    )

    hf_dir, out = Path(hf_dir), Path(out_dir)
    # trust_remote_code=False said outright: left unset, transformers asks on stdin whether to run a
    # folder's own Python files (an auto_map); an imported model is transformers' own Llava.
    config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=False)
    _check_importable(config, hf_dir)
    llava = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype="auto").eval()
    processor = AutoProcessor.from_pretrained(hf_dir, trust_remote_code=False)

    vision_dir, language_dir = out / "vision_tower", out / "language_model"
    llava.model.vision_tower.save_pretrained(vision_dir)
    image_processor = processor.image_processor
    crop = _size(getattr(image_processor, "crop_size", None)) or _size(image_processor.size)
    CLIPImageProcessor(
        size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop},
        image_mean=list(image_processor.image_mean), image_std=list(image_processor.image_std),
    ).save_pretrained(vision_dir)

    language_model = AutoModelForCausalLM.from_config(config.text_config, dtype=llava.lm_head.weight.dtype)
    state = {f"{language_model.base_model_prefix}.{k}": v for k, v in llava.model.language_model.state_dict().items()}
    state["lm_head.weight"] = llava.lm_head.weight
    language_model.load_state_dict(state, strict=True)
    language_model.tie_weights()
    language_model.save_pretrained(language_dir)
    processor.tokenizer.save_pretrained(language_dir)
    _copy_processor_files(hf_dir, out / SOURCE_PROCESSOR)

    projector = llava.model.multi_modal_projector
    connector_state = {
        f"connector.layers.{index}.{name}": tensor
        for index, layer in ((0, projector.linear_1), (2, projector.linear_2))
        for name, tensor in layer.state_dict().items()
    }
    overrides = _imported_overrides(config, image_processor, vision_dir, language_dir, out / SOURCE_PROCESSOR)
    return write_imported_run(out, overrides, connector_state, hf_dir)


def _check_importable(config: Any, hf_dir: Path) -> None:
    if getattr(config, "model_type", None) != "llava":
        raise ConfigError(f"{hf_dir}: not an HF Llava folder (config model_type is {getattr(config, 'model_type', None)!r})")
    if config.vision_config.model_type != "clip_vision_model":
        raise ConfigError(f"{hf_dir}: vision tower {config.vision_config.model_type!r}; mmkit imports CLIP vision towers")
    if config.projector_hidden_act != "gelu":
        raise ConfigError(f"{hf_dir}: projector_hidden_act={config.projector_hidden_act!r}; mmkit's mlp2x_gelu needs 'gelu'")
    if not isinstance(config.vision_feature_layer, int):
        raise ConfigError(f"{hf_dir}: vision_feature_layer={config.vision_feature_layer!r}; mmkit reads one layer")


def _size(size: Any) -> int | None:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get("height") or size.get("shortest_edge")
    return getattr(size, "height", None) or getattr(size, "shortest_edge", None)


def _imported_overrides(config: Any, image_processor: Any, vision_dir: Path, language_dir: Path,
                        processor_dir: Path) -> list[str]:
    # The model's own chat template where it has one: it was trained on that format.
    own_format = read_chat_template(processor_dir) is not None
    template = ["template=hf_chat", f"template.path={processor_dir.resolve()}"] if own_format else ["template=vicuna_v1"]
    return [
        "recipe=no_stage1",
        *template,
        f"encoder.path={vision_dir.resolve()}",
        f"encoder.layer={config.vision_feature_layer}",
        f"encoder.select={STRATEGY_TO_SELECT[config.vision_feature_select_strategy]}",
        f"+connector.bias={str(bool(getattr(config, 'multimodal_projector_bias', True))).lower()}",
        f"decoder.path={language_dir.resolve()}",
        f"decoder.model_max_length={config.text_config.max_position_embeddings}",
        f"data.image_mode={'pad' if getattr(image_processor, 'do_pad', False) else 'crop'}",
    ]
