"""LLaVA's own checkpoints (haotian-liu/LLaVA's LlavaLlamaForCausalLM folders, stage-1 mm_projector.bin)
imported into mmkit give LLaVA's logits: checked against LLaVA's forward written out here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN, run_cli
from PIL import Image
from safetensors.torch import save_file

from mmkit.core.errors import ConfigError

PROMPT = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}]
CLIP_SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
LLAMA_SHAPE = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 4}


class LlavaParts:
    """What a LLaVA folder was made of, for the reference forward."""

    def __init__(self, folder: Path, clip, llama, projector: dict[str, torch.Tensor], config: dict):
        self.folder, self.clip, self.llama, self.projector, self.config = folder, clip, llama, projector, config


def _projector(kind: str, in_dim: int, out_dim: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """LLaVA's projector tensors under LLaVA's names (build_vision_projector in llava/model/multimodal_projector)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.3

    if kind == "linear":
        return {"model.mm_projector.weight": rand(out_dim, in_dim), "model.mm_projector.bias": rand(out_dim)}
    return {"model.mm_projector.0.weight": rand(out_dim, in_dim), "model.mm_projector.0.bias": rand(out_dim),
            "model.mm_projector.2.weight": rand(out_dim, out_dim), "model.mm_projector.2.bias": rand(out_dim)}


def _save_clip(folder: Path, seed: int = 0):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    clip = CLIPVisionModel(CLIPVisionConfig(**CLIP_SHAPE)).eval()
    clip.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return clip


def _write_weights(folder: Path, state: dict[str, torch.Tensor], fmt: str, shards: int) -> None:
    """As transformers' save_pretrained writes them: one file, or shards with an index json."""
    names = list(state)
    groups = [names[i::shards] for i in range(shards)]
    if fmt == "safetensors":
        base, index_name = "model", "model.safetensors.index.json"
    else:
        base, index_name = "pytorch_model", "pytorch_model.bin.index.json"
    suffix = ".safetensors" if fmt == "safetensors" else ".bin"
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        file = f"{base}{suffix}" if shards == 1 else f"{base}-{number:05d}-of-{shards:05d}{suffix}"
        tensors = {name: state[name].contiguous() for name in group}
        if fmt == "safetensors":
            save_file(tensors, str(folder / file), metadata={"format": "pt"})
        else:
            torch.save(tensors, folder / file)
        weight_map.update(dict.fromkeys(group, file))
    if shards > 1:
        (folder / index_name).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def make_llava(root: Path, projector: str = "mlp2x_gelu", fmt: str = "safetensors", shards: int = 1,
               layer: int = -2, select: str = "patch", aspect: str | None = "pad", tower_in_weights: bool = False,
               **config_changes) -> LlavaParts:
    """A small random model folder in exactly LLaVA's format: a Llama's weights and config.json with
    LLaVA's keys (as in llava-v1.5-7b's), ``model.mm_projector.*``, the tokenizer beside them, and the
    CLIP tower in its own folder that ``mm_vision_tower`` names."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mmkit.models.hub import resolve_model_path

    folder, clip_dir = root / "llava", root / "clip"
    folder.mkdir(parents=True)
    clip = _save_clip(clip_dir)
    # LLaVA's tokenizer has no <image> token: its prompts put the id -200 where the image goes.
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("zoo://tiny-tokenizer"))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                         max_position_embeddings=512, **LLAMA_SHAPE)).eval()
    weights = _projector(projector, CLIP_SHAPE["hidden_size"], LLAMA_SHAPE["hidden_size"])
    state = {**llama.state_dict(), **weights}
    if tower_in_weights:
        state.update({f"model.vision_tower.vision_tower.{k}": v for k, v in clip.state_dict().items()})
    _write_weights(folder, state, fmt, shards)
    # llava-v1.5-7b's config.json, its sizes shrunk (transformers 4.31's key names).
    config = {
        "_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "freeze_mm_mlp_adapter": False, "hidden_act": "silu",
        "initializer_range": 0.02, "max_length": 512, "max_position_embeddings": 512,
        "mm_hidden_size": CLIP_SHAPE["hidden_size"], "mm_projector_type": projector, "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": select, "mm_vision_select_layer": layer,
        "mm_vision_tower": str(clip_dir), "mm_patch_merge_type": "flat", "mm_projector_lr": None,
        "pretraining_tp": 1, "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False, "tokenizer_model_max_length": 256, "tokenizer_padding_side": "right",
        "use_cache": True, "use_mm_proj": True, "vocab_size": len(tokenizer), **LLAMA_SHAPE,
    }
    if aspect is not None:
        config["image_aspect_ratio"] = aspect
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return LlavaParts(folder, clip, llama, weights, config)


def _expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """llava/mm_utils.py's expand2square."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def llava_pixels(parts: LlavaParts, image: Image.Image) -> torch.Tensor:
    """LLaVA's image preparation (llava/mm_utils.py process_images) with the tower's processor."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(parts.config["mm_vision_tower"])
    if parts.config.get("image_aspect_ratio") == "pad":
        image = _expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
    return processor.preprocess(image, return_tensors="pt")["pixel_values"]


def llava_logits(parts: LlavaParts, ids: list[int], pixels: torch.Tensor, clip=None) -> torch.Tensor:
    """LLaVA's forward, written out: the tower's hidden_states[mm_vision_select_layer] (CLS dropped for
    'patch'), mm_projector, and prepare_inputs_labels_for_multimodal's splice of the features where the
    single image id (-200) stands, then the Llama on inputs_embeds."""
    config, weights = parts.config, parts.projector
    with torch.no_grad():
        hidden = (clip or parts.clip)(pixel_values=pixels, output_hidden_states=True).hidden_states
        features = hidden[config["mm_vision_select_layer"]]
        if config["mm_vision_select_feature"] == "patch":
            features = features[:, 1:]
        if config["mm_projector_type"] == "linear":
            features = F.linear(features, weights["model.mm_projector.weight"], weights["model.mm_projector.bias"])
        else:
            features = F.linear(features, weights["model.mm_projector.0.weight"], weights["model.mm_projector.0.bias"])
            features = F.linear(F.gelu(features), weights["model.mm_projector.2.weight"],
                                weights["model.mm_projector.2.bias"])
        at = ids.index(-200)
        embed = parts.llama.get_input_embeddings()
        inputs = torch.cat([embed(torch.tensor(ids[:at])), features[0], embed(torch.tensor(ids[at + 1:]))])
        return parts.llama(inputs_embeds=inputs[None]).logits


def mmkit_ids_and_llava_ids(model) -> tuple[list[int], list[int]]:
    """mmkit's prompt ids (its template expands <image> into N image ids) and LLaVA's: the same ids
    with that run of N collapsed into LLaVA's single image id, -200."""
    from mmkit.data.templates.vicuna_v1 import VicunaV1Template

    ids = VicunaV1Template().encode(PROMPT, model.tokenizer, model.num_image_tokens, for_generation=True).input_ids
    image = model.image_token_id
    at, count = ids.index(image), ids.count(image)
    assert count == model.num_image_tokens and ids[at:at + count] == [image] * count
    return ids, ids[:at] + [-200] + ids[at + count:]


def _image() -> Image.Image:
    from mmkit.synth.world import generate_scenes, render

    return render(generate_scenes("test", 1, seed=0)[0], 64).crop((0, 0, 64, 40))  # wide: padding matters


CASES = [
    # projector, weight format, shards, layer, select, image_aspect_ratio, tower copy in the weights
    ("mlp2x_gelu", "safetensors", 1, -2, "patch", "pad", True),
    ("linear", "safetensors", 2, -1, "cls_patch", "square", False),
    ("mlp2x_gelu", "bin", 2, -1, "cls_patch", None, False),
    ("linear", "bin", 1, -2, "patch", "pad", True),
]


@pytest.mark.parametrize("projector,fmt,shards,layer,select,aspect,tower", CASES)
def test_an_imported_llava_folder_gives_llavas_logits(tmp_path, projector, fmt, shards, layer, select, aspect, tower):
    from mmkit.data.images import ImageProcessor
    from mmkit.interchange.llava_original import import_llava
    from mmkit.models.load import load_run

    parts = make_llava(tmp_path, projector, fmt, shards, layer, select, aspect, tower_in_weights=tower)
    overrides = import_llava(parts.folder, tmp_path / "run")
    cfg, model = load_run(tmp_path / "run")
    assert (cfg.encoder.layer, cfg.encoder.select, cfg.connector.name) == (layer, select, projector)
    assert cfg.data.image_mode == ("pad" if aspect == "pad" else "crop")
    assert cfg.decoder.model_max_length == 256 and cfg.encoder.path == str(tmp_path / "clip")
    checkpoint = tmp_path / "run" / "finetune" / "trainable.safetensors"
    assert overrides[-1] == f"recipe.stages.finetune.connector_from={checkpoint}"

    image = _image()
    mmkit_pixels = ImageProcessor(model.encoder.image_stats, cfg.data.image_mode)(image)
    torch.testing.assert_close(mmkit_pixels, llava_pixels(parts, image)[0], rtol=0, atol=1e-5)
    mmkit_ids, llava_ids = mmkit_ids_and_llava_ids(model)
    with torch.no_grad():
        ids = torch.tensor([mmkit_ids])
        logits = model(ids, torch.ones_like(ids), mmkit_pixels[None]).logits
    reference = llava_logits(parts, llava_ids, llava_pixels(parts, image))
    vocab = reference.shape[-1]  # mmkit's vocabulary adds <image>, whose logit LLaVA has not
    assert logits.shape[:2] == reference.shape[:2] and logits.shape[-1] == vocab + 1
    difference = (logits[..., :vocab] - reference).abs().max().item()
    print(f"{projector} {fmt} x{shards} layer={layer} {select}: max |logit difference| {difference:.2e}")
    assert difference < 1e-4
    # The image reaches the logits.
    other = llava_logits(parts, llava_ids, torch.randn(1, 3, 32, 32))
    assert (other - reference).abs().max() > 1e-3


def test_a_tower_trained_with_the_llm_is_taken_from_the_weights(tmp_path):
    """unfreeze_mm_vision_tower: LLaVA runs the checkpoint's tower, not mm_vision_tower's."""
    from mmkit.interchange.llava_original import import_llava
    from mmkit.models.load import load_run

    parts = make_llava(tmp_path, unfreeze_mm_vision_tower=True)
    trained = _save_clip(tmp_path / "trained_clip", seed=5)
    state = {f"model.vision_tower.vision_tower.{k}": v for k, v in trained.state_dict().items()}
    save_file({**state, **parts.projector}, str(parts.folder / "model.safetensors"), metadata={"format": "pt"})
    save_file(parts.llama.state_dict(), str(parts.folder / "model-00001-of-00002.safetensors"),
              metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(parts.llama.state_dict(), "model-00001-of-00002.safetensors"),
                  **dict.fromkeys([*state, *parts.projector], "model.safetensors")}
    (parts.folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    import_llava(parts.folder, tmp_path / "run")
    cfg, model = load_run(tmp_path / "run")
    assert cfg.encoder.path == str(tmp_path / "run" / "vision_tower")
    mmkit_ids, llava_ids = mmkit_ids_and_llava_ids(model)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ids = torch.tensor([mmkit_ids])
        logits = model(ids, torch.ones_like(ids), pixels).logits
    reference = llava_logits(parts, llava_ids, pixels, clip=trained)
    assert (logits[..., :reference.shape[-1]] - reference).abs().max() < 1e-4


@pytest.mark.parametrize("change,message", [
    ({"mm_use_im_start_end": True}, "mm_use_im_start_end=true: this model wraps each image in <im_start>/<im_end>"),
    ({"image_aspect_ratio": "anyres"},
     "image_aspect_ratio='anyres': mmkit prepares images as LLaVA's 'pad' or 'square'"),
    ({"mm_projector_type": "qformer"}, "mm_projector_type='qformer': mmkit imports 'linear' and 'mlp{N}x_gelu'"),
    ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature='cls': choose 'patch' or 'cls_patch'"),
    ({"architectures": ["LlavaMptForCausalLM"]}, "mmkit imports LLaVA's LlavaLlamaForCausalLM"),
    ({"mm_hidden_size": 64},
     "model.mm_projector.0.weight has shape [48, 32], the connector's connector.layers.0.weight [48, 64]"),
    ({"mm_projector_type": "mlp3x_gelu"}, "the projector lacks the connector's connector.layers.4.bias"),
])
def test_what_mmkit_cannot_reproduce_is_refused_in_one_line(tmp_path, change, message):
    from mmkit.interchange.llava_original import import_llava

    parts = make_llava(tmp_path, **change)
    with pytest.raises(ConfigError) as error:
        import_llava(parts.folder, tmp_path / "run")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run" / ".hydra").exists()


def test_llava_1_5s_model_type_and_other_folders(tmp_path):
    from mmkit.interchange.llava_original import import_llava, read_llava_folder

    # LLaVA-1.5's "llava_llama"; a patch token LLaVA's prompts never use; the tower beside the model.
    parts = make_llava(tmp_path, model_type="llava_llama", mm_use_im_patch_token=True, mm_vision_tower="../clip")
    folder = read_llava_folder(parts.folder)
    assert (folder.projector_type, folder.vision_tower) == ("mlp2x_gelu", str(tmp_path / "clip"))
    config = {**parts.config, "mm_vision_tower": "openai/clip-vit-large-patch14-336"}
    (parts.folder / "config.json").write_text(json.dumps(config))
    assert read_llava_folder(parts.folder).vision_tower == "openai/clip-vit-large-patch14-336"  # a hub id
    with pytest.raises(ConfigError, match="no config.json"):
        import_llava(tmp_path / "nowhere", tmp_path / "run")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {}}))
    with pytest.raises(ConfigError, match="an HF Llava folder .*use python -m mmkit.export from-hf"):
        import_llava(tmp_path / "hf", tmp_path / "run")
    (parts.folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"no weights \(model\*.safetensors or pytorch_model\*.bin\)"):
        import_llava(parts.folder, tmp_path / "run")


# A released stage-1 projector as a stage's connector_from.

@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The configs of an imported mlp2x_gelu folder and of a linear one."""
    from omegaconf import OmegaConf

    from mmkit.interchange.llava_original import import_llava

    found = {}
    for kind in ("mlp2x_gelu", "linear"):
        root = tmp_path_factory.mktemp(kind)
        import_llava(make_llava(root, kind).folder, root / "run")
        found[kind] = OmegaConf.load(root / "run" / ".hydra" / "config.yaml")
    return found


def _fresh(cfg):
    from mmkit.models.build import build_model

    return build_model(cfg)


@pytest.mark.parametrize("kind", ["mlp2x_gelu", "linear"])
def test_a_released_mm_projector_bin_loads_as_connector_from(imported, tmp_path, kind):
    from mmkit.interchange.llava_original import projector_to_connector
    from mmkit.training.recipe import _init_connector

    cfg = imported[kind]
    released = _projector(kind, CLIP_SHAPE["hidden_size"], LLAMA_SHAPE["hidden_size"], seed=7)
    torch.save(released, tmp_path / "mm_projector.bin")
    model = _fresh(cfg)
    assert _init_connector(model, str(tmp_path / "mm_projector.bin"), None, "recipe.stages.pretrain") == str(
        tmp_path / "mm_projector.bin")
    state = model.state_dict()
    mapped = projector_to_connector(released, "test")
    assert {k for k in state if k.startswith("connector.")} == set(mapped)
    for name, (key, tensor) in mapped.items():
        assert torch.equal(state[name], tensor), (name, key)


class _Marker:
    """An object whose unpickling would write a file: it must never happen."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_bad_mm_projector_bin_is_refused_in_one_line_naming_the_stage(imported, tmp_path):
    from mmkit.training.recipe import _init_connector

    cfg = imported["mlp2x_gelu"]
    model = _fresh(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("connector.")}
    good = _projector("mlp2x_gelu", CLIP_SHAPE["hidden_size"], LLAMA_SHAPE["hidden_size"])
    touched = tmp_path / "unpickled"
    cases = {
        "shape": ({**good, "model.mm_projector.2.weight": torch.zeros(48, 40)},
                  "model.mm_projector.2.weight has shape [48, 40], the connector's connector.layers.2.weight [48, 48]"),
        "extra": ({**good, "model.mm_projector.4.weight": torch.zeros(48, 48)},
                  "model.mm_projector.4.weight has no place in this connector"),
        "foreign": ({**good, "model.embed_tokens.weight": torch.zeros(3, 48)},
                    "key 'model.embed_tokens.weight' is not a projector weight"),
        "linear": (_projector("linear", 32, 48), "model.mm_projector.weight has no place in this connector"),
        "partial": ({k: v for k, v in good.items() if ".2." not in k},
                    "the projector lacks the connector's connector.layers.2.bias, connector.layers.2.weight"),
        "not_a_tensor": ({**good, "step": 3}, "key 'step' is not a tensor (int)"),
        "object": ({**good, "trainer": _Marker(str(touched))},
                   "not a tensor file that torch.load(weights_only=True) reads"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.bin"
        torch.save(content, path)
        with pytest.raises(ConfigError) as error:
            _init_connector(model, str(path), None, "recipe.stages.pretrain")
        text = str(error.value)
        assert text.startswith(f"recipe.stages.pretrain.connector_from={path}: "), text
        assert message in text and "\n" not in text, text
    assert not touched.exists()  # the pickle's object was refused, never built
    with pytest.raises(ConfigError, match="missing.bin: no such file"):
        _init_connector(model, str(tmp_path / "missing.bin"), None, "recipe.stages.pretrain")
    for name, tensor in before.items():  # nothing was half-loaded
        assert torch.equal(model.state_dict()[name], tensor)


@pytest.mark.slow
def test_the_cli_imports_a_llava_folder_and_refuses_with_one_line(tmp_path):
    parts = make_llava(tmp_path / "made", "mlp2x_gelu", "bin", 2)
    imported = run_cli(["-m", "mmkit.export", "from-llava", str(parts.folder), str(tmp_path / "run")])
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert imported.stdout.strip().splitlines()[-1].startswith("python -m mmkit.train recipe=no_stage1 ")
    evaluated = run_cli(["-m", "mmkit.evaluate", "task=synthetic", f"model={tmp_path / 'run'}", "task.count=2"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    # The printed command trains on from the imported model; here from a released projector instead.
    projector = tmp_path / "mm_projector.bin"
    torch.save(_projector("mlp2x_gelu", CLIP_SHAPE["hidden_size"], LLAMA_SHAPE["hidden_size"], seed=7), projector)
    command = [a for a in imported.stdout.strip().splitlines()[-1].split()[1:] if "connector_from=" not in a]
    tiny = [o for o in TINY_RUN if not o.startswith(("recipe.stages.pretrain", "evaluation."))]
    trained = run_cli(command + tiny + [f"recipe.stages.finetune.connector_from={projector}", "evaluation=none",
                                        f"hydra.run.dir={tmp_path / 'further'}"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((tmp_path / "further" / "summary.json").read_text())
    assert summary["stages"]["finetune"]["connector_from"] == str(projector)

    config = json.loads((parts.folder / "config.json").read_text())
    (parts.folder / "config.json").write_text(json.dumps({**config, "mm_use_im_start_end": True}))
    refused = run_cli(["-m", "mmkit.export", "from-llava", str(parts.folder), str(tmp_path / "run2")])
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "mm_use_im_start_end=true" in refused.stderr
