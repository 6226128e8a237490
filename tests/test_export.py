"""Exact interchange with transformers' LlavaForConditionalGeneration: same logits, same greedy text."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from conftest import TINY_RUN, compose, run_cli

PROMPT = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}]
LAYOUTS = [(-2, "patch"), (-1, "patch"), (-2, "cls_patch"), (-1, "cls_patch")]


def _model(overrides: list[str], seed: int = 0):
    """A default-recipe model whose connector has non-trivial random weights."""
    from mmkit.models.build import build_model

    cfg = compose(overrides)
    model = build_model(cfg).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.connector.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return cfg, model


def _inputs(model, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from mmkit.data.templates.vicuna_v1 import VicunaV1Template

    ids = VicunaV1Template().encode(PROMPT, model.tokenizer, model.num_image_tokens, for_generation=True).input_ids
    size = model.encoder.image_stats.size
    return torch.tensor([ids]), torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, torch.ones_like(ids), pixels).logits


@pytest.mark.parametrize("layer,select", LAYOUTS)
def test_export_gives_the_same_logits_for_each_feature_layer_and_select_strategy(tmp_path, layer, select):
    from transformers import LlavaForConditionalGeneration

    from mmkit.interchange.hf_llava import to_hf_llava

    cfg, model = _model([f"encoder.layer={layer}", f"encoder.select={select}"])
    to_hf_llava(cfg, model).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    expected_strategy = {"patch": "default", "cls_patch": "full"}[select]
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (layer, expected_strategy)
    assert config["image_token_index"] == model.image_token_id and config["projector_hidden_act"] == "gelu"

    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, pixels = _inputs(model)
    with torch.no_grad():
        hf_logits = llava(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits
    mmkit_logits = _logits(model, ids, pixels)
    assert (hf_logits - mmkit_logits).abs().max() < 1e-4
    # The image reaches the logits: another image gives other logits.
    assert (_logits(model, ids, _inputs(model, seed=1)[1]) - mmkit_logits).abs().max() > 1e-3


def test_lora_runs_are_merged_on_export(tmp_path):
    from mmkit.interchange.hf_llava import to_hf_llava

    cfg, model = _model(["decoder.lora.enabled=true"])
    with torch.no_grad():
        for name, parameter in model.decoder.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2)
    llava = to_hf_llava(cfg, model)
    assert not any("lora" in name for name, _ in llava.named_parameters())
    ids, pixels = _inputs(model)
    with torch.no_grad():
        hf_logits = llava(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits
    assert (hf_logits - _logits(model, ids, pixels)).abs().max() < 1e-4


def test_a_connector_hf_llava_has_no_slot_for_is_refused_clearly():
    from mmkit.core.errors import ConfigError
    from mmkit.interchange.hf_llava import to_hf_llava

    cfg, model = _model(["connector=linear"])
    with pytest.raises(ConfigError, match="connector.name=linear: HF LlavaForConditionalGeneration's projector"):
        to_hf_llava(cfg, model)


def test_the_processor_prompts_and_prepares_images_as_mmkit_does(tmp_path):
    from PIL import Image

    from mmkit.data.images import ImageProcessor
    from mmkit.data.templates.vicuna_v1 import VicunaV1Template
    from mmkit.interchange.hf_llava import hf_processor
    from mmkit.synth.world import generate_scenes, render

    cfg, model = _model([])
    hf_processor(cfg, model).save_pretrained(tmp_path)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tmp_path)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the square?"}]},
    ]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    turns = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "Red."},
             {"from": "human", "value": "And the square?"}]
    segments = VicunaV1Template().segments([(t["from"], t["value"]) for t in turns])
    assert rendered == "".join(s.content if isinstance(s.content, str) else "</s>" for s in segments)
    # And the ids: the processor's tokenizer adds BOS as mmkit's template does.
    image_tokens = model.num_image_tokens
    hf_ids = list(processor(images=Image.new("RGB", (64, 64)), text=rendered)["input_ids"][0])
    assert hf_ids == VicunaV1Template().encode(turns, model.tokenizer, image_tokens, for_generation=True).input_ids

    # A wide image is padded to a square with the mean colour, as LLaVA-1.5 and mmkit do.
    image = render(generate_scenes("test", 1, seed=0)[0], 64).crop((0, 0, 64, 40))
    hf_pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
    mmkit_pixels = ImageProcessor(model.encoder.image_stats, "pad")(image)
    torch.testing.assert_close(hf_pixels, mmkit_pixels, rtol=0, atol=1e-6)
    square = Image.new("RGB", (64, 64), (200, 30, 30))
    assert (processor.image_processor(square, return_tensors="pt")["pixel_values"][0]
            - ImageProcessor(model.encoder.image_stats, "pad")(square)).abs().max() < 1e-4


TRANSFORMERS_ONLY = textwrap.dedent("""
    import sys, torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    folder, inputs = sys.argv[1], torch.load(sys.argv[2])
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    AutoProcessor.from_pretrained(folder)
    with torch.no_grad():
        logits = model(input_ids=inputs["ids"], attention_mask=torch.ones_like(inputs["ids"]),
                       pixel_values=inputs["pixels"]).logits
        generated = model.generate(input_ids=inputs["ids"], attention_mask=torch.ones_like(inputs["ids"]),
                                   pixel_values=inputs["pixels"], max_new_tokens=12, do_sample=False)
    torch.save({"logits": logits, "generated": generated[0, inputs["ids"].shape[1]:]}, sys.argv[3])
    assert not any(name.startswith("mmkit") for name in sys.modules), "mmkit was imported"
""")


@pytest.mark.slow
def test_a_run_exported_by_the_cli_loads_in_transformers_alone(lively_run, tmp_path):
    from mmkit.models.load import load_run

    out = tmp_path / "hf"
    result = run_cli(["-m", "mmkit.export", "to-hf", str(lively_run), str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    cfg, model = load_run(lively_run)
    ids, pixels = _inputs(model)
    torch.save({"ids": ids, "pixels": pixels}, tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(TRANSFORMERS_ONLY)
    # -I: isolated mode, so neither the repo nor an editable mmkit is on the path.
    loaded = run_cli(["-I", str(script), str(out), str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")],
                     cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    outputs = torch.load(tmp_path / "outputs.pt")
    assert (outputs["logits"] - _logits(model, ids, pixels)).abs().max() < 1e-4
    with torch.no_grad():
        mmkit_generated = model.generate(ids, torch.ones_like(ids), pixels, max_new_tokens=12, do_sample=False)[0]
    assert outputs["generated"].tolist() == mmkit_generated.tolist()
    hf_text = model.tokenizer.decode(outputs["generated"], skip_special_tokens=True)
    assert hf_text == model.tokenizer.decode(mmkit_generated, skip_special_tokens=True) and len(hf_text) > 5


def _hf_llava(tmp_path, layer: int, strategy: str, chat_template: str | None = None):
    """A small random HF Llava folder with its processor, made by transformers alone."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessor,
        LlavaProcessor,
    )

    from mmkit.models.decoders.hf_causal_lm import prepare_tokenizer

    tokenizer = prepare_tokenizer("zoo://tiny-tokenizer")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                         image_seq_length=16 + (strategy == "full"))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path)
    image_processor = LlavaImageProcessor(do_pad=True, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8, num_additional_image_tokens=1,
                   vision_feature_select_strategy=strategy, chat_template=chat_template).save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("layer,strategy", [(-2, "default"), (-1, "default"), (-2, "full"), (-1, "full")])
def test_an_hf_llava_folder_imported_gives_the_same_logits(tmp_path, layer, strategy):
    from mmkit.interchange.hf_llava import import_hf
    from mmkit.models.load import load_run

    hf_model = _hf_llava(tmp_path / "hf", layer, strategy)
    import_hf(tmp_path / "hf", tmp_path / "run")
    cfg, model = load_run(tmp_path / "run")
    assert (cfg.encoder.layer, cfg.encoder.select) == (layer, {"default": "patch", "full": "cls_patch"}[strategy])
    ids, pixels = _inputs(model)
    with torch.no_grad():
        hf_logits = hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits
    assert (hf_logits - _logits(model, ids, pixels)).abs().max() < 1e-4


@pytest.mark.slow
def test_the_cli_imports_and_refuses_with_one_line(tmp_path):
    _hf_llava(tmp_path / "hf", -2, "default")
    imported = run_cli(["-m", "mmkit.export", "from-hf", str(tmp_path / "hf"), str(tmp_path / "run")])
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()
    evaluated = run_cli(["-m", "mmkit.evaluate", "task=synthetic", f"model={tmp_path / 'run'}", "task.count=2"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    # The printed command trains on from the imported model.
    train_command = imported.stdout.strip().splitlines()[-1].split()
    assert train_command[:3] == ["python", "-m", "mmkit.train"]
    tiny = [o for o in TINY_RUN if not o.startswith(("recipe.stages.pretrain", "evaluation."))]
    trained = run_cli(train_command[1:] + tiny + ["evaluation=none", f"hydra.run.dir={tmp_path / 'further'}"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "further" / "finetune" / "trainable.safetensors").is_file()

    missing = run_cli(["-m", "mmkit.export", "from-hf", str(tmp_path / "nowhere"), str(tmp_path / "run2")])
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr


# llava-hf's format for LLaVA-1.5: no system prompt, "USER: <image>\n... ASSISTANT:".
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% if message['role'] == 'user' %}{{ ' ' }}{% else %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_hf_to_mmkit_to_hf_keeps_the_prompt_format_and_changes_no_weight(tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmkit.core.registry import TEMPLATES
    from mmkit.interchange.hf_llava import export_run, import_hf
    from mmkit.models.load import load_run

    hf_model = _hf_llava(tmp_path / "hf", -2, "default", chat_template=LLAVA_HF_TEMPLATE)
    import_hf(tmp_path / "hf", tmp_path / "run")
    export_run(tmp_path / "run", tmp_path / "back")
    kept = [p.name for p in (tmp_path / "hf").iterdir() if p.name not in {"model.safetensors", "config.json",
                                                                            "generation_config.json"}]
    assert {"chat_template.jinja", "processor_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(kept)
    for name in kept:
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name

    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "USER: <image>\nWhat colour is the circle? ASSISTANT:"
    inputs = processor(images=Image.new("RGB", (32, 32), (200, 30, 30)), text=prompt, return_tensors="pt")
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.equal(back(**inputs).logits, hf_model(**inputs).logits)
        greedy = dict(max_new_tokens=8, do_sample=False)
        assert torch.equal(back.generate(**inputs, **greedy), hf_model.generate(**inputs, **greedy))

    # mmkit prompts the imported model in its own format, not in vicuna_v1's.
    cfg, model = load_run(tmp_path / "run")
    assert cfg.template.name == "hf_chat"
    template = TEMPLATES.build(dict(cfg.template), "template")
    turns = [("human", "<image>\nWhat colour is the circle?")]
    assert template.render(turns, model.tokenizer.eos_token).text == prompt
    conversation = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "Red."}]
    encoded = template.encode(conversation, model.tokenizer, model.num_image_tokens)
    trained = [token for token, label in zip(encoded.input_ids, encoded.labels) if label != -100]
    assert model.tokenizer.decode(trained).strip() == "Red." + model.tokenizer.eos_token
