"""LLaVA's own checkpoints, as haotian-liu/LLaVA's training saves them, read into mmkit.

A LLaVA folder (``LlavaLlamaForCausalLM``) is a Llama checkpoint with extras: its config.json
carries the multimodal keys (``mm_vision_tower``, ``mm_projector_type``, ``mm_vision_select_layer``,
...) and its weights add the projector, ``model.mm_projector.*``. The vision tower comes from
``mm_vision_tower``, as LLaVA's own loader takes it, unless the tower was trained
(``unfreeze_mm_vision_tower``): then its weights in the checkpoint are the ones LLaVA runs.

The computation is mmkit's: CLIP's hidden state ``mm_vision_select_layer``, CLS dropped for
``patch``, the projector, the image features in the LM's input, the Llama. LLaVA splices the N
features where its one ``<image>`` id stood; mmkit's templates expand ``<image>`` into N ids whose
embeddings the features replace, so the LM sees the same sequence.

LLaVA's projector names map onto mmkit's connectors: ``mm_projector.weight`` (``linear``) is
``connector.proj.weight``, ``mm_projector.<i>.weight`` (``mlp{N}x_gelu``, a Sequential with GELUs
at the odd indices) is ``connector.layers.<i>.weight``. Stage-1 releases are that projector alone,
``mm_projector.bin``; :func:`load_llava_projector` reads one as a stage's ``connector_from``.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from mmkit.core.atomic_io import atomic_path, write_text_atomically
from mmkit.core.errors import ConfigError
from mmkit.core.registry import CONNECTORS, load_components
from mmkit.interchange.imported_run import write_imported_run
from mmkit.models.checkpoint_io import load_torch_tensors
from mmkit.models.hub import resolve_model_path

ARCHITECTURE = "LlavaLlamaForCausalLM"
# LLaVA's config class says "llava" in most releases, "llava_llama" in some LLaVA-1.5 versions.
MODEL_TYPES = ("llava", "llava_llama")
PROJECTOR_KEY = re.compile(r"(?:model\.)?mm_projector\.(?:(?P<index>\d+)\.)?(?P<param>weight|bias)")
PROJECTOR_TYPE = re.compile(r"linear|mlp[1-9]\d*x_gelu")
TOWER_PREFIX = "model.vision_tower.vision_tower."
# image_aspect_ratio -> data.image_mode. LLaVA's "square" (or no key) is CLIP's resize and centre
# crop; "pad" is LLaVA-1.5's pad to a square in the mean colour. Both are mmkit's ImageProcessor modes.
IMAGE_MODES = {None: "crop", "square": "crop", "pad": "pad"}
# Config keys that describe LLaVA's training or multimodal parts, beside every key with "mm_" in it.
LLAVA_ONLY_KEYS = {"image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length", "tokenizer_padding_side",
                   "vision_tower", "architectures", "model_type", "_name_or_path", "transformers_version"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
SAFETENSORS_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class LlavaFolder:
    """What a LLaVA folder's config.json says, checked."""

    path: Path
    llama: dict[str, Any]  # the Llama's own config keys
    vision_tower: str  # a hub id, a local folder (absolute) or SCHEME://NAME
    layer: int
    select: str
    projector_type: str
    mm_hidden_size: int
    image_mode: str
    tower_trained: bool
    max_length: int


def read_llava_folder(llava_dir: str | Path) -> LlavaFolder:
    """The checked config of a LLaVA folder; anything mmkit cannot reproduce is refused in one line."""
    llava_dir = Path(llava_dir)
    path = llava_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{llava_dir}: not a LLaVA model folder (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from None
    if "text_config" in config:
        raise ConfigError(f"{llava_dir}: an HF Llava folder (transformers' format), not LLaVA's own: "
                          "use python -m mmkit.export from-hf")
    architectures = config.get("architectures") or [ARCHITECTURE]
    if config.get("model_type") not in MODEL_TYPES or ARCHITECTURE not in architectures:
        raise ConfigError(f"{path}: model_type={config.get('model_type')!r}, architectures={architectures}; mmkit "
                          f"imports LLaVA's {ARCHITECTURE} (model_type {' or '.join(MODEL_TYPES)})")
    if config.get("mm_use_im_start_end"):
        raise ConfigError(f"{path}: mm_use_im_start_end=true: this model wraps each image in <im_start>/<im_end> "
                          "tokens, which mmkit's templates never write; only models trained without them import")
    # mm_use_im_patch_token only adds a token to the vocabulary that LLaVA's prompts never use, so
    # either value imports.
    aspect = config.get("image_aspect_ratio")
    if aspect not in IMAGE_MODES:
        raise ConfigError(f"{path}: image_aspect_ratio={aspect!r}: mmkit prepares images as LLaVA's 'pad' or "
                          "'square' (data.image_mode=pad or crop); other layouts (anyres tiles) have no equivalent")
    if config.get("mm_patch_merge_type", "flat") != "flat":
        raise ConfigError(f"{path}: mm_patch_merge_type={config['mm_patch_merge_type']!r}: mmkit feeds the "
                          "image features as one flat sequence ('flat')")
    projector_type = config.get("mm_projector_type", "linear")  # LLaVA's default when the key is absent
    if not isinstance(projector_type, str) or not PROJECTOR_TYPE.fullmatch(projector_type):
        raise ConfigError(f"{path}: mm_projector_type={projector_type!r}: mmkit imports 'linear' and "
                          "'mlp{N}x_gelu' projectors")
    select = config.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConfigError(f"{path}: mm_vision_select_feature={select!r}: choose 'patch' or 'cls_patch'")
    tower = config.get("mm_vision_tower", config.get("vision_tower"))
    if not isinstance(tower, str) or not tower:
        raise ConfigError(f"{path}: no mm_vision_tower: a LLaVA config names the CLIP tower it was trained with")
    for key in ("mm_vision_select_layer", "mm_hidden_size", "hidden_size"):
        if not isinstance(config.get(key), int) or isinstance(config.get(key), bool):
            raise ConfigError(f"{path}: {key}={config.get(key)!r}: an integer is needed")
    llama = {k: v for k, v in config.items() if "mm_" not in k and k not in LLAVA_ONLY_KEYS}
    max_length = config.get("tokenizer_model_max_length") or config.get("max_position_embeddings") or 2048
    return LlavaFolder(
        path=llava_dir, llama=llama, vision_tower=_tower_location(tower, llava_dir),
        layer=config["mm_vision_select_layer"], select=select, projector_type=projector_type,
        mm_hidden_size=config["mm_hidden_size"], image_mode=IMAGE_MODES[aspect],
        tower_trained=bool(config.get("unfreeze_mm_vision_tower")), max_length=int(max_length),
    )


def _tower_location(tower: str, llava_dir: Path) -> str:
    """A local folder made absolute (LLaVA wrote it as its training's working directory saw it, so
    it is tried there, then beside the model); anything else (a hub id) as it is."""
    for candidate in (Path(tower), llava_dir / tower):
        if candidate.is_dir():
            return str(candidate.resolve())
    return tower


def import_llava(llava_dir: str | Path, out_dir: str | Path) -> list[str]:
    """``python -m mmkit.export from-llava``: a LLaVA folder -> an mmkit run folder that ``model=OUT``
    commands load, with the Llama saved as ``OUT/language_model`` (and a trained vision tower as
    ``OUT/vision_tower``). Returns the ``python -m mmkit.train`` overrides that train on from it.

    The shards are converted one at a time, so a 13B model never needs its size in memory."""
    folder = read_llava_folder(llava_dir)
    out = Path(out_dir)
    language_dir = out / "language_model"
    llama_config = LlamaConfig.from_dict(folder.llama)
    llama_config.architectures = ["LlamaForCausalLM"]
    expected = _expected_llama_keys(llama_config)
    weight_files = _weight_files(folder.path)
    projector: dict[str, torch.Tensor] = {}
    tower: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    total_size = 0
    for number, (source, tensors) in enumerate(_read_shards(weight_files), start=1):
        language: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            if PROJECTOR_KEY.fullmatch(key):
                projector[key] = tensor
            elif key.startswith(TOWER_PREFIX):
                # An untrained tower's copy is left out, as LLaVA's loader leaves it.
                if folder.tower_trained:
                    tower[key.removeprefix(TOWER_PREFIX)] = tensor
            elif key in expected:
                language[key] = tensor
            elif not key.endswith(".inv_freq"):  # rotary frequencies: a buffer older transformers saved
                raise ConfigError(f"{source}: key {key!r} is neither the Llama's, nor the projector's "
                                  f"(model.mm_projector.*), nor the vision tower's ({TOWER_PREFIX}*)")
        if language:
            count = len(weight_files)
            name = "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
            _save_safetensors(language, language_dir / name)
            weight_map.update(dict.fromkeys(language, name))
            total_size += sum(t.numel() * t.element_size() for t in language.values())
    tied = {"lm_head.weight"} if llama_config.tie_word_embeddings else set()
    missing = sorted(expected - set(weight_map) - tied)
    if missing:
        raise ConfigError(f"{folder.path}: the weights lack {len(missing)} of the Llama's tensors, e.g. {missing[:3]}")
    if len(weight_files) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        write_text_atomically(language_dir / SAFETENSORS_INDEX, json.dumps(index, indent=2) + "\n")
    llama_config.save_pretrained(language_dir)
    _copy_tokenizer(folder.path, language_dir)

    connector = projector_to_connector(projector, str(folder.path))
    widths = (f"mm_projector_type={folder.projector_type}, mm_hidden_size={folder.mm_hidden_size}, "
              f"hidden_size={llama_config.hidden_size}")
    check_projector(connector, _fresh_connector_shapes(folder, llama_config.hidden_size),
                    f"{folder.path / 'config.json'}: {widths}")
    vision_path = folder.vision_tower
    if folder.tower_trained:
        vision_path = _save_trained_tower(folder, tower, out / "vision_tower")
    overrides = [
        "recipe=no_stage1",
        "template=vicuna_v1",  # LLaVA-1.5's conversation (conv_vicuna_v1) for every v1 model
        f"encoder.path={vision_path}",
        f"encoder.layer={folder.layer}",
        f"encoder.select={folder.select}",
        f"connector.name={folder.projector_type}",
        f"decoder.path={language_dir.resolve()}",
        f"decoder.model_max_length={folder.max_length}",
        f"data.image_mode={folder.image_mode}",
    ]
    return write_imported_run(out, overrides, {name: t for name, (_, t) in connector.items()}, folder.path)


def _expected_llama_keys(config: LlamaConfig) -> set[str]:
    """The state dict names of the Llama ``config`` describes (built on the meta device: no storage)."""
    with torch.device("meta"):
        return set(LlamaForCausalLM(config).state_dict())


def _weight_files(llava_dir: Path) -> list[Path]:
    """The folder's weight files, safetensors first, in the index's order when it is sharded."""
    for index_name, single, pattern in ((SAFETENSORS_INDEX, "model.safetensors", "model*.safetensors"),
                                        (BIN_INDEX, "pytorch_model.bin", "pytorch_model*.bin")):
        index = llava_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConfigError(f"{index}: not a weight index ({exc})") from None
            return [llava_dir / name for name in dict.fromkeys(weight_map.values())]
        if (llava_dir / single).is_file():
            return [llava_dir / single]
        found = sorted(llava_dir.glob(pattern))
        if found:
            return found
    raise ConfigError(f"{llava_dir}: no weights (model*.safetensors or pytorch_model*.bin)")


def _read_shards(files: list[Path]) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    for path in files:
        if not path.is_file():
            raise ConfigError(f"{path}: a weight file the index names is missing")
        if path.suffix == ".safetensors":
            try:
                yield path, load_file(str(path))
            except Exception as exc:  # noqa: BLE001  safetensors raises its own error types
                raise ConfigError(f"{path}: not a safetensors file ({exc})") from None
        else:
            yield path, load_torch_tensors(path, str(path))


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses tensors that share storage (a .bin may tie embeddings that way) and
    # non-contiguous views: each is written as its own copy.
    seen: set[int] = set()
    owned = {}
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        owned[name] = tensor.contiguous() if pointer not in seen else tensor.clone()
        seen.add(pointer)
    with atomic_path(path) as temporary:
        # transformers loads only safetensors files that say they hold PyTorch tensors.
        save_file(owned, str(temporary), metadata={"format": "pt"})


def _copy_tokenizer(llava_dir: Path, language_dir: Path) -> None:
    """LLaVA's tokenizer files as they are, checked by loading them beside the Llama's config."""
    copied = [name for name in TOKENIZER_FILES if (llava_dir / name).is_file()]
    if not {"tokenizer.json", "tokenizer.model"} & set(copied):
        raise ConfigError(f"{llava_dir}: no tokenizer (tokenizer.json or tokenizer.model) beside the weights")
    for name in copied:
        shutil.copyfile(llava_dir / name, language_dir / name)
    try:
        AutoTokenizer.from_pretrained(language_dir, trust_remote_code=False)  # never the folder's own code
    except Exception as exc:  # noqa: BLE001  tokenizers fail with many error types
        raise ConfigError(f"{llava_dir}: its tokenizer does not load ({exc})") from None


def projector_to_connector(tensors: Mapping[str, torch.Tensor], what: str) -> dict[str, tuple[str, torch.Tensor]]:
    """LLaVA's projector tensors under mmkit's connector names: ``{connector name: (LLaVA name, tensor)}``.
    Every key must be a projector's (``model.mm_projector.weight``, ``model.mm_projector.<i>.bias``...)."""
    if not tensors:
        raise ConfigError(f"{what}: holds no projector weights (model.mm_projector.*)")
    mapped = {}
    for key, tensor in tensors.items():
        match = PROJECTOR_KEY.fullmatch(key)
        if match is None:
            raise ConfigError(f"{what}: key {key!r} is not a projector weight (model.mm_projector.weight/bias "
                              "for linear, model.mm_projector.<i>.weight/bias for mlp{N}x_gelu)")
        index, param = match["index"], match["param"]
        mapped[f"connector.proj.{param}" if index is None else f"connector.layers.{index}.{param}"] = (key, tensor)
    return mapped


def check_projector(mapped: Mapping[str, tuple[str, torch.Tensor]], expected: Mapping[str, torch.Size],
                    what: str) -> None:
    """``mapped`` (from :func:`projector_to_connector`) fills exactly the connector whose tensor
    shapes are ``expected``: no tensor it lacks a place for, none of its own left out, every shape equal."""
    for name, (key, tensor) in mapped.items():
        if name not in expected:
            raise ConfigError(f"{what}: {key} has no place in this connector (its tensors: "
                              f"{', '.join(sorted(expected))})")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ConfigError(f"{what}: {key} has shape {list(tensor.shape)}, the connector's {name} "
                              f"{list(expected[name])} (a projector for another encoder or decoder?)")
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise ConfigError(f"{what}: the projector lacks the connector's {', '.join(missing)} "
                          "(a projector of another type?)")


def _fresh_connector_shapes(folder: LlavaFolder, hidden_size: int) -> dict[str, torch.Size]:
    """The tensor shapes of mmkit's connector of the folder's projector type and widths."""
    load_components()
    with torch.device("meta"):
        connector = CONNECTORS.build({"name": folder.projector_type}, "connector",
                                     in_dim=folder.mm_hidden_size, out_dim=hidden_size)
    return {f"connector.{name}": tensor.shape for name, tensor in connector.state_dict().items()}


def _save_trained_tower(folder: LlavaFolder, tower: dict[str, torch.Tensor], vision_dir: Path) -> str:
    """A tower trained with the LM (``unfreeze_mm_vision_tower``): its architecture and image
    statistics from ``mm_vision_tower``, its weights from the checkpoint."""
    if not tower:
        raise ConfigError(f"{folder.path / 'config.json'}: unfreeze_mm_vision_tower=true, but the weights hold "
                          f"no {TOWER_PREFIX}* tensors")
    location = resolve_model_path(folder.vision_tower)
    model = CLIPVisionModel(CLIPVisionConfig.from_pretrained(location))
    state = model.state_dict()
    # Buffers that newer transformers recompute (position ids) are dropped from older checkpoints.
    tower = {k: v for k, v in tower.items() if k in state or not k.endswith("position_ids")}
    unknown, missing = sorted(set(tower) - set(state)), sorted(set(state) - set(tower))
    if unknown or missing:
        raise ConfigError(f"{folder.path}: the checkpoint's tower does not fit {folder.vision_tower}'s architecture "
                          f"(unknown {unknown[:3]}, missing {missing[:3]})")
    _load_checked(model, tower, f"{folder.path}: {TOWER_PREFIX}*")
    model.save_pretrained(vision_dir)
    CLIPImageProcessor.from_pretrained(location).save_pretrained(vision_dir)
    return str(vision_dir.resolve())


def _load_checked(model: nn.Module, tensors: Mapping[str, torch.Tensor], what: str) -> None:
    state = model.state_dict()
    for name, tensor in tensors.items():
        if tensor.shape != state[name].shape:
            raise ConfigError(f"{what}: {name} has shape {list(tensor.shape)}, the model's {list(state[name].shape)}")
    model.load_state_dict(tensors, strict=False)


def load_llava_projector(model: nn.Module, path: Path, what: str) -> list[str]:
    """A LLaVA ``mm_projector.bin`` (stage 1's release) loaded into ``model``'s connector; ``what``
    (``recipe.stages.<stage>.connector_from=...``) starts every error. Returns the names loaded."""
    mapped = projector_to_connector(load_torch_tensors(path, what), what)
    expected = {name: tensor.shape for name, tensor in model.state_dict().items() if name.startswith("connector.")}
    check_projector(mapped, expected, what)
    model.load_state_dict({name: tensor for name, (_, tensor) in mapped.items()}, strict=False)
    return sorted(mapped)
