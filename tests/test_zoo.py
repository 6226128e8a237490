"""The zoo: real pretraining code (at the test scale), cached HF folders, measured quality."""
from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil

import pytest
import torch
from conftest import run_cli
from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

from mmkit.core.errors import ConfigError
from mmkit.datagen.rules import QUESTION_KINDS
from mmkit.synth.world import describe, generate_scenes, object_signature, quadrant
from mmkit.zoo import ensure_model, model_folder, quality
from mmkit.zoo.clip import hard_negative
from mmkit.zoo.text import conversations_as_text


def test_models_are_cached_hf_folders_with_a_quality_report():
    for name in ("tiny-clip", "tiny-llama"):
        folder = ensure_model(name)
        assert folder == model_folder(name) and folder.name.endswith("-scale0.02")
        assert quality(name) is not None
    assert isinstance(CLIPVisionModel.from_pretrained(ensure_model("tiny-clip")), CLIPVisionModel)
    assert isinstance(LlamaForCausalLM.from_pretrained(ensure_model("tiny-llama")), LlamaForCausalLM)
    report = quality("tiny-llama")
    # Even a few steps of pretraining beat the untrained model on held-out text by far.
    assert report["val_perplexity"] < report["val_perplexity_untrained"] / 5
    assert 0 <= quality("tiny-clip")["val_retrieval_top1_of_256"] <= 1
    caption_qa = report["val_caption_qa_exact_match"]
    assert set(caption_qa) == set(QUESTION_KINDS) and all(0 <= v <= 100 for v in caption_qa.values())


def test_lm_text_puts_a_placed_caption_where_the_image_was_in_most_conversations():
    conversations = conversations_as_text("train", 200, seed=5)
    first_turns = [c[0]["value"] for c in conversations]
    assert not any("<image>" in turn["value"] for c in conversations for turn in c)
    with_context = [t for t in first_turns if " in the top " in t or " in the bottom " in t]
    assert 0.6 < len(with_context) / len(first_turns) < 0.95  # CONTEXT_SHARE = 0.8, plus questions about places


def test_statements_after_a_caption_state_each_named_objects_true_attributes():
    from mmkit.synth.world import quadrant
    from mmkit.zoo.text import caption_statements

    scenes = generate_scenes("train", 30, seed=4)
    for scene, (objects, conversation) in zip(scenes, caption_statements("train", 30, seed=4)):
        assert objects == len(scene.objects)
        caption, stated = conversation[0]["value"], conversation[1]["value"]
        assert " in the " in caption  # placed, so every statement can be looked up in it
        for sentence in stated.rstrip(".").split(". "):
            name, attribute = sentence.removeprefix("The ").split(" is ")
            # A name singles out one object; the sentence says that object's own attribute.
            (named,) = [o for o in scene.objects if set(name.split()) <= {o.size, o.colour, o.shape}]
            assert attribute in (named.colour, named.size, f"in the {quadrant(named.box)}"), sentence
            assert attribute.split()[-1] not in name.split()  # never gives its own answer away
        for obj in scene.objects:
            if sum(other.shape == obj.shape for other in scene.objects) == 1:
                assert f"The {obj.shape} is {obj.colour}." in stated


def test_tokenizer_ends_captions_with_an_eos_clip_can_pool_at():
    tokenizer = AutoTokenizer.from_pretrained(ensure_model("tiny-tokenizer"))
    assert tokenizer.eos_token_id != 2  # id 2 switches CLIP's text pooling to "largest id"
    text = "A small red circle in the top left."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_hard_negatives_break_binding_of_colour_place_or_attribute():
    rng = random.Random(0)
    kinds = set()
    for scene in generate_scenes("train", 200, seed=3):
        negative = hard_negative(scene, rng)
        assert object_signature(negative.objects) != object_signature(scene.objects)
        assert len({quadrant(o.box) for o in negative.objects}) == len(negative.objects)
        assert all(0 <= o.box[0] < o.box[2] <= 1 and 0 <= o.box[1] < o.box[3] <= 1 for o in negative.objects)
        same_things = sorted(map(describe, scene.objects)) == sorted(map(describe, negative.objects))
        same_places = [o.box for o in scene.objects] == [o.box for o in negative.objects]
        kinds.add("moved" if same_things else "swapped colours" if same_places and
                  sorted(o.colour for o in scene.objects) == sorted(o.colour for o in negative.objects) else "changed")
    assert kinds == {"moved", "swapped colours", "changed"}


def test_unknown_zoo_model_is_a_config_error():
    with pytest.raises(ConfigError, match="zoo://tiny-gpt: unknown zoo model; available: tiny-clip"):
        ensure_model("tiny-gpt")


def test_the_zoo_cli_refuses_an_unknown_name_before_building_anything(capsys, monkeypatch, tmp_path):
    from mmkit.zoo.__main__ import main

    monkeypatch.setenv("MMKIT_HOME", str(tmp_path))

    assert main(["build", "tiny-clip-random", "tiny-gpt", "tiny-bert", "tiny-gpt"]) == 2
    error = capsys.readouterr().err
    assert "error: unknown zoo models tiny-gpt, tiny-bert; available: tiny-clip" in error
    assert not model_folder("tiny-clip-random").exists()


def test_zoo_cli_lists_models_with_quality():
    ensure_model("tiny-llama")
    result = run_cli(["-m", "mmkit.zoo", "list"], timeout=120)
    assert result.returncode == 0
    assert "tiny-llama" in result.stdout and "cached" in result.stdout and "val_perplexity" in result.stdout


def test_building_a_model_leaves_the_callers_random_state_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("MMKIT_HOME", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    ensure_model("tiny-clip-random")  # built now: its builder seeds torch itself
    assert torch.equal(torch.rand(4), expected)


def test_a_build_says_what_it_builds_why_where_and_how_long_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MMKIT_HOME", str(tmp_path))
    folder = ensure_model("tiny-clip-random")
    announced = capsys.readouterr().err.splitlines()
    assert announced[0] == (f"zoo: building tiny-clip-random, an untrained CLIP ViT, for ablations (under a minute on "
                            f"2 CPU cores); built once, cached in {folder}")
    ensure_model("tiny-clip-random")  # cached: nothing to say
    assert "zoo:" not in capsys.readouterr().err


@pytest.fixture
def package_shipping(tmp_path, monkeypatch):
    """A package whose shipped models live under tmp_path, loaded at full scale."""
    from mmkit.zoo import shipping as shipped_module

    monkeypatch.setattr(shipped_module, "SHIPPED_ROOT", tmp_path / "shipped")
    monkeypatch.setenv("MMKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MMKIT_ZOO_SCALE", "1")
    shipped_module.verify.cache_clear()
    yield shipped_module
    shipped_module.verify.cache_clear()


def _ship_random_tower(shipped_module):
    from mmkit.zoo import BUILDERS, ensure_built

    return shipped_module.ship(ensure_built("tiny-clip-random"), "tiny-clip-random", BUILDERS["tiny-clip-random"].version)


def test_a_shipped_model_is_loaded_as_it_is_and_nothing_is_built(package_shipping, capsys):
    from mmkit.zoo import BUILDERS, present

    folder = _ship_random_tower(package_shipping)
    assert json.loads((folder / "sha256.json").read_text()).keys() == {
        "config.json", "model.safetensors", "preprocessor_config.json", "quality.json"}
    # The cached build the shipped copy came from goes; loading must not fall back to it.
    shutil.rmtree(model_folder("tiny-clip-random"))
    capsys.readouterr()
    assert ensure_model("tiny-clip-random") == folder == present("tiny-clip-random")
    assert "zoo: building" not in capsys.readouterr().err
    assert quality("tiny-clip-random") == {"pretraining": "none (random init)"}
    assert folder.name == f"tiny-clip-random-v{BUILDERS['tiny-clip-random'].version}"
    assert isinstance(CLIPVisionModel.from_pretrained(ensure_model("tiny-clip-random")), CLIPVisionModel)


@pytest.mark.parametrize("damage, problem", [
    (lambda folder: (folder / "model.safetensors").write_bytes(b"\0" + (folder / "model.safetensors").read_bytes()[1:]),
     "model.safetensors does not match its sha256"),
    (lambda folder: (folder / "config.json").unlink(), "config.json is missing"),
    (lambda folder: (folder / "extra.bin").write_bytes(b"x"), "extra.bin is not in the manifest"),
])
def test_a_damaged_shipped_model_is_refused_naming_the_file(package_shipping, damage, problem):
    from mmkit.zoo.shipping import ShippedModelError

    damage(_ship_random_tower(package_shipping))
    with pytest.raises(ShippedModelError, match=f"tiny-clip-random-v2: {problem}; reinstall mmkit, or rebuild it "
                                                 "into the package with `python -m mmkit.zoo ship tiny-clip-random`"):
        ensure_model("tiny-clip-random")


def test_small_scale_runs_never_load_the_shipped_full_scale_model(package_shipping, monkeypatch):
    _ship_random_tower(package_shipping)
    monkeypatch.setenv("MMKIT_ZOO_SCALE", "0.02")
    assert ensure_model("tiny-clip-random") == model_folder("tiny-clip-random")


def test_zoo_build_check_compares_the_rebuilt_quality_report_with_the_shipped_one(package_shipping, capsys):
    from mmkit.zoo.__main__ import main

    assert main(["build", "--check", "tiny-clip-random"]) == 1
    assert "the package ships no tiny-clip-random-v2 to compare with" in capsys.readouterr().out
    folder = _ship_random_tower(package_shipping)
    assert main(["build", "--check", "tiny-clip-random"]) == 0
    assert "tiny-clip-random: check passed" in capsys.readouterr().out
    (folder / "quality.json").write_text(json.dumps({"pretraining": "contrastive"}))
    assert main(["build", "--check", "tiny-clip-random"]) == 1
    out = capsys.readouterr().out
    assert "check FAILED" in out and "pretraining: shipped 'contrastive', rebuilt 'none (random init)'" in out


def test_quality_reports_agree_within_tolerance_and_timings_are_not_compared():
    from mmkit.zoo.shipping import quality_differences

    shipped = {"val_caption_qa_exact_match": {"colour": 96.5, "count": 100.0}, "size": {"parameters": 900},
               "train_seconds": 3000.0}
    assert quality_differences(shipped, {"val_caption_qa_exact_match": {"colour": 95.5, "count": 100.0},
                                         "size": {"parameters": 900}, "train_seconds": 10.0}) == []
    assert quality_differences(shipped, {"val_caption_qa_exact_match": {"colour": 90.0, "count": 100.0},
                                         "size": {"parameters": 901}}) == [
        "size.parameters: shipped 900, rebuilt 901", "val_caption_qa_exact_match.colour: shipped 96.5, rebuilt 90.0"]


def test_the_shipped_models_match_their_manifests():
    from mmkit.zoo.shipping import SHIPPED_ROOT, verify

    folders = sorted(path for path in SHIPPED_ROOT.iterdir() if path.is_dir()) if SHIPPED_ROOT.is_dir() else []
    for folder in folders:
        verify(folder)


def test_the_shipped_lms_quality_reports_name_the_recipe_they_are_rebuilt_by():
    """Else ``zoo build --check`` fails on the recipe, whatever the rebuilt model's quality."""
    from mmkit.zoo import BUILDERS
    from mmkit.zoo.llama import RECIPES
    from mmkit.zoo.shipping import SHIPPED_ROOT

    for name, recipe in RECIPES.items():
        shipped = SHIPPED_ROOT / f"{name}-v{BUILDERS[name].version}" / "quality.json"
        assert json.loads(shipped.read_text())["recipe"] == dataclasses.asdict(recipe), name


def test_each_image_token_is_taught_its_own_quadrants_attributes():
    from mmkit.synth.world import COLOURS, SHAPES, SIZES, Scene, SceneObject
    from mmkit.zoo.clip import quadrant_labels

    scene = Scene("s", (SceneObject("triangle", "blue", "small", (0.6, 0.6, 0.8, 0.8)),
                        SceneObject("circle", "red", "large", (0.05, 0.05, 0.41, 0.41))), "white")
    labels = quadrant_labels([scene])
    assert labels["quadrant"].tolist() == [[0, 1, 2, 3]]  # top left, top right, bottom left, bottom right
    assert labels["occupied"].tolist() == [[1, 0, 0, 1]]
    assert labels["shape"].tolist() == [[SHAPES.index("circle"), -100, -100, SHAPES.index("triangle")]]
    assert labels["colour"].tolist() == [[list(COLOURS).index("red"), -100, -100, list(COLOURS).index("blue")]]
    assert labels["size"].tolist() == [[SIZES.index("large"), -100, -100, SIZES.index("small")]]


def test_a_killed_pretraining_resumes_from_its_checkpoint_and_ends_as_an_unbroken_run(tmp_path, monkeypatch):
    from mmkit.zoo.llama import LlamaRecipe, pretrain

    tokenizer = AutoTokenizer.from_pretrained(ensure_model("tiny-tokenizer"))
    monkeypatch.setenv("MMKIT_ZOO_SCALE", "1")  # the recipe below is already tiny
    recipe = LlamaRecipe(width=32, layers=1, heads=2, steps=6, batch=4, warmup=2, data="qa", scenes=40, per_caption=2)
    unbroken = pretrain(recipe, tokenizer, seed=3)

    class Killed(Exception):
        pass

    def kill_while_measuring_step_4(step, loss, model):
        if step == 4:
            raise Killed

    checkpoint = tmp_path / "run.pt"
    with pytest.raises(Killed):
        pretrain(recipe, tokenizer, seed=3, every=1, on_every=kill_while_measuring_step_4, checkpoint=checkpoint,
                 checkpoint_every=2)
    # Step 4's checkpoint comes after its measurement, so the resumed run measures step 4 again.
    assert torch.load(checkpoint, weights_only=False)["step"] == 2
    resumed_steps = []
    resumed = pretrain(recipe, tokenizer, seed=3, every=1, on_every=lambda step, *_: resumed_steps.append(step),
                       checkpoint=checkpoint, checkpoint_every=2)
    assert resumed_steps == [3, 4, 5, 6]
    for (name, expected), actual in zip(unbroken.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(actual, expected), name

    with pytest.raises(ConfigError, match="run.pt is of another pretraining run .*; remove it to start afresh"):
        pretrain(recipe, tokenizer, seed=4, checkpoint=checkpoint)
    with pytest.raises(ConfigError, match="checkpoint_every=0: save at least every step"):
        pretrain(recipe, tokenizer, checkpoint=checkpoint, checkpoint_every=0)
    with pytest.raises(ConfigError, match="LlamaRecipe.data='chats': choose conversations, qa, qa\\+statements or mix"):
        pretrain(dataclasses.replace(recipe, data="chats"), tokenizer)


def test_the_torch_init_scheme_gives_unit_embeddings_and_an_untied_head_the_llama_one_ties_it():
    from mmkit.zoo.llama import LlamaRecipe, fresh_llama, initialise

    tokenizer = AutoTokenizer.from_pretrained(ensure_model("tiny-tokenizer"))
    llama_init = fresh_llama(LlamaRecipe(width=64, layers=1, heads=2), tokenizer)
    torch_init = fresh_llama(LlamaRecipe(width=64, layers=1, heads=2, init="torch"), tokenizer)
    assert llama_init.lm_head.weight is llama_init.model.embed_tokens.weight
    assert torch_init.lm_head.weight is not torch_init.model.embed_tokens.weight
    assert float(llama_init.model.embed_tokens.weight.std()) == pytest.approx(0.02, rel=0.1)
    assert float(torch_init.model.embed_tokens.weight.std()) == pytest.approx(1.0, rel=0.1)
    # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 * 64).
    query = torch_init.model.layers[0].self_attn.q_proj.weight
    assert float(query.abs().max()) <= 1 / 8 and float(query.std()) == pytest.approx(1 / math.sqrt(192), rel=0.1)
    assert torch.equal(torch_init.model.embed_tokens.weight[tokenizer.pad_token_id], torch.zeros(64))
    with pytest.raises(ConfigError, match="LlamaRecipe.init='xavier': choose one of llama, torch"):
        fresh_llama(LlamaRecipe(width=64, layers=1, heads=2, init="xavier"), tokenizer)
    with pytest.raises(ConfigError, match="init='torch' needs an untied output head"):
        initialise(llama_init, "torch")  # it would re-draw the shared embeddings as a linear layer


def test_a_zoo_build_killed_after_pretraining_resumes_without_pretraining_again(tmp_path, monkeypatch, capsys):
    from mmkit.zoo import llama

    monkeypatch.setenv("MMKIT_HOME", str(tmp_path))
    ensure_model("tiny-tokenizer")
    real_write_quality = llama.write_quality

    def crash(folder, report):
        raise KeyboardInterrupt

    monkeypatch.setattr(llama, "write_quality", crash)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        ensure_model("tiny-llama")
    assert "resuming" not in capsys.readouterr().err  # a first build starts from nothing
    checkpoint = model_folder("tiny-llama").with_name(model_folder("tiny-llama").name + ".resume.pt")
    assert checkpoint.is_file() and not model_folder("tiny-llama").exists()

    # Marked, so that the build can be seen to finish from the checkpoint, not from a new start.
    state = torch.load(checkpoint, weights_only=False)
    state["model"]["model.norm.weight"] += 1.0
    state["seconds"] = 12345.0  # as if the killed build had pretrained for hours
    torch.save(state, checkpoint)
    monkeypatch.setattr(llama, "write_quality", real_write_quality)
    capsys.readouterr()
    assert ensure_model("tiny-llama") == model_folder("tiny-llama")
    assert f"zoo: tiny-llama pretraining: resuming from step {state['step']} of {state['step']}" in capsys.readouterr().err
    assert not checkpoint.exists() and "val_caption_qa_exact_match" in quality("tiny-llama")
    assert quality("tiny-llama")["train_seconds"] >= 12345.0
    built = LlamaForCausalLM.from_pretrained(model_folder("tiny-llama")).state_dict()
    for name, weights in state["model"].items():
        torch.testing.assert_close(built[name], weights, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a GPU pretraining run needs CUDA (lent GPU machines only)")
def test_pretraining_on_a_gpu_starts_where_the_cpu_run_starts_and_resumes_on_the_cpu(tmp_path, monkeypatch):
    from mmkit.zoo.llama import LlamaRecipe, pretrain

    tokenizer = AutoTokenizer.from_pretrained(ensure_model("tiny-tokenizer"))
    monkeypatch.setenv("MMKIT_ZOO_SCALE", "1")
    recipe = LlamaRecipe(width=32, layers=1, heads=2, steps=6, batch=4, warmup=2, data="qa", scenes=40, per_caption=2)
    cpu_losses, gpu_losses = [], []
    on_cpu = pretrain(recipe, tokenizer, seed=3, every=1, on_every=lambda step, loss, model: cpu_losses.append(loss))
    assert next(on_cpu.parameters()).device.type == "cpu"

    class Killed(Exception):
        pass

    def record_then_kill_at_step_4(step, loss, model):
        assert next(model.parameters()).is_cuda
        gpu_losses.append(loss)
        if step == 4:
            raise Killed

    checkpoint = tmp_path / "run.pt"
    with pytest.raises(Killed):
        pretrain(recipe, tokenizer, seed=3, every=1, on_every=record_then_kill_at_step_4, checkpoint=checkpoint,
                 checkpoint_every=3, device="cuda")
    # The same initial weights and batches: the first step's loss agrees to float precision.
    assert gpu_losses[0] == pytest.approx(cpu_losses[0], rel=1e-4) and all(math.isfinite(loss) for loss in gpu_losses)
    resumed_steps = []
    resumed = pretrain(recipe, tokenizer, seed=3, every=1, checkpoint=checkpoint,
                       on_every=lambda step, *_: resumed_steps.append(step))  # the GPU's checkpoint, on the CPU
    assert resumed_steps == [4, 5, 6] and next(resumed.parameters()).device.type == "cpu"
