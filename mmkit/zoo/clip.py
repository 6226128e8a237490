"""A tiny CLIP, pretrained contrastively on the synthetic world's image-caption pairs.

The vision tower is what the embedded default uses (``zoo://tiny-clip``). Plain contrastive
training on such captions learns a bag of attributes (which colours, which shapes) rather than
which colour goes with which shape, a known CLIP weakness; so every batch also carries one
*hard negative* caption per image, of the same scene with two objects' colours or places swapped,
or one attribute changed, which only an encoder that binds attributes to objects can reject.

Contrastive training alone still left the attributes hard to read from single image tokens
(linear probes: shape 45.5%, an object's own quadrant 43.2%), so the tower also learns to state,
from each image token of its last two layers (the ones LLaVA reads features from), what the
captions say of that quadrant: which quadrant it is, whether an object is there, and its shape,
colour and size: dense, region-level caption supervision, as region-text pretraining gives
detection towers.
"""
from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mmkit.synth.world import (
    COLOURS,
    QUADRANTS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    captions,
    describe,
    generate_scenes,
    quadrant,
    render,
)
from mmkit.training.optimizer import warmup_cosine
from mmkit.zoo.scale import scaled, write_quality

# 32-pixel patches on 64-pixel images: one patch per image quadrant, where the world puts at most
# one object, so each image token sees whole objects (4 image tokens instead of 64).
IMAGE_SIZE, PATCH_SIZE, WIDTH, LAYERS = 64, 32, 128, 4
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
STEPS, BATCH, LR, WARMUP = 1500, 128, 1e-3, 50
# What each image token is taught to state about its quadrant, with the number of values.
ATTRIBUTES = {"quadrant": len(QUADRANTS), "occupied": 2, "shape": len(SHAPES), "colour": len(COLOURS), "size": len(SIZES)}
READ_OUT_LAYERS = (-2, -1)
READ_OUT_WEIGHT = 1.0


def _vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=WIDTH,
    )


def _save_processor(out: Path) -> None:
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    ).save_pretrained(out)


def build_tiny_clip_random(out: Path) -> None:
    """The same vision tower, untrained: the baseline any pretraining must beat."""
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(_vision_config()).save_pretrained(out)
    _save_processor(out)
    write_quality(out, {"pretraining": "none (random init)"})


def _moved(obj: SceneObject, target: tuple[float, float]) -> SceneObject:
    """``obj`` shifted by whole quadrants so that its quadrant's corner becomes ``target``."""
    x1, y1, x2, y2 = obj.box
    dx, dy = target[0] - (0.5 if x1 >= 0.5 else 0.0), target[1] - (0.5 if y1 >= 0.5 else 0.0)
    return dataclasses.replace(obj, box=tuple(round(v, 2) for v in (x1 + dx, y1 + dy, x2 + dx, y2 + dy)))


def _corner(obj: SceneObject) -> tuple[float, float]:
    return (0.5 if obj.box[0] >= 0.5 else 0.0, 0.5 if obj.box[1] >= 0.5 else 0.0)


def hard_negative(scene: Scene, rng: random.Random) -> Scene:
    """The same objects with their binding broken: two colours swapped, two objects' places
    swapped (or one moved to an empty quadrant), or one attribute changed."""
    objects = list(scene.objects)
    colour_pairs = [(i, j) for i in range(len(objects)) for j in range(i + 1, len(objects)) if objects[i].colour != objects[j].colour]
    choice = rng.random()
    if colour_pairs and choice < 0.4:
        i, j = rng.choice(colour_pairs)
        objects[i], objects[j] = (
            dataclasses.replace(objects[i], colour=objects[j].colour),
            dataclasses.replace(objects[j], colour=objects[i].colour),
        )
    elif choice < 0.8:
        corners = [(0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.5, 0.5)]
        empty = [c for c in corners if c not in {_corner(o) for o in objects}]
        k = rng.randrange(len(objects))
        # Swapping two look-alike objects would change nothing a caption can say.
        partners = [i for i in range(len(objects)) if describe(objects[i]) != describe(objects[k])]
        if partners and (not empty or rng.random() < 0.5):
            j = rng.choice(partners)
            corner_k, corner_j = _corner(objects[k]), _corner(objects[j])
            objects[k], objects[j] = _moved(objects[k], corner_j), _moved(objects[j], corner_k)
        else:
            objects[k] = _moved(objects[k], rng.choice(empty))
    else:
        k = rng.randrange(len(objects))
        if rng.random() < 0.5:
            objects[k] = dataclasses.replace(objects[k], colour=rng.choice([c for c in COLOURS if c != objects[k].colour]))
        else:
            objects[k] = dataclasses.replace(objects[k], shape=rng.choice([s for s in SHAPES if s != objects[k].shape]))
    return dataclasses.replace(scene, objects=tuple(objects))


def quadrant_labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """[scenes, 4] labels per attribute for the image tokens (row-major: TL, TR, BL, BR); the
    attributes of an empty quadrant are -100, which the loss ignores."""
    labels = {name: torch.full((len(scenes), len(QUADRANTS)), -100) for name in ATTRIBUTES}
    for row, scene in enumerate(scenes):
        by_quadrant = {quadrant(o.box): o for o in scene.objects}
        for column, name in enumerate(QUADRANTS):
            obj = by_quadrant.get(name)
            labels["quadrant"][row, column] = column
            labels["occupied"][row, column] = int(obj is not None)
            if obj is not None:
                labels["shape"][row, column] = SHAPES.index(obj.shape)
                labels["colour"][row, column] = list(COLOURS).index(obj.colour)
                labels["size"][row, column] = SIZES.index(obj.size)
    return labels


class AttributeReadOut(torch.nn.Module):
    """One linear head per (read-out layer, attribute) on the image tokens, without CLS."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList([
            torch.nn.ModuleDict({name: torch.nn.Linear(WIDTH, values) for name, values in ATTRIBUTES.items()})
            for _ in READ_OUT_LAYERS
        ])

    def logits(self, hidden_states: tuple[torch.Tensor, ...]) -> dict[tuple[int, str], torch.Tensor]:
        """Logits per (layer, attribute): [batch, image tokens, values]."""
        return {(layer, name): head(hidden_states[layer][:, 1:])
                for layer, heads in zip(READ_OUT_LAYERS, self.heads) for name, head in heads.items()}

    def loss(self, hidden_states: tuple[torch.Tensor, ...], labels: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = [F.cross_entropy(logits.flatten(0, 1), labels[name].flatten())
                  for (_, name), logits in self.logits(hidden_states).items()]
        return torch.stack(losses).mean()

    def accuracy(self, hidden_states: tuple[torch.Tensor, ...], labels: dict[str, torch.Tensor]) -> dict[str, float]:
        """Val accuracy per attribute at layer -2, the default feature layer; -100 labels skipped."""
        accuracies = {}
        for (layer, name), logits in self.logits(hidden_states).items():
            if layer == -2:
                kept = labels[name] != -100
                accuracies[name] = round(100 * float((logits.argmax(-1)[kept] == labels[name][kept]).float().mean()), 1)
        return accuracies


def _pixels(scenes: list[Scene]) -> torch.Tensor:
    array = np.stack([np.asarray(render(s, IMAGE_SIZE), dtype=np.float32) / 255.0 for s in scenes])
    pixels = torch.from_numpy(array).permute(0, 3, 1, 2)
    return (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def _tokens(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    # CLIP's text tower pools at the first eos token, so every caption ends with one.
    return tokenizer([t + tokenizer.eos_token for t in texts], padding=True, return_tensors="pt")


def _projected(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is projected; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _retrieval_accuracy(model, tokenizer, scenes: list[Scene], rng: random.Random) -> float:
    """Image -> caption top-1 among all ``len(scenes)`` captions (chance: 1/len)."""
    with torch.no_grad():
        image = F.normalize(_projected(model.get_image_features(pixel_values=_pixels(scenes))), dim=-1)
        text = F.normalize(_projected(model.get_text_features(**_tokens(tokenizer, [captions(s, rng)[0] for s in scenes]))), dim=-1)
    return float(((image @ text.T).argmax(dim=1) == torch.arange(len(scenes))).float().mean())


def build_tiny_clip(out: Path, tokenizer_folder: Path) -> None:
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    torch.manual_seed(0)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=96, projection_dim=WIDTH,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = CLIPModel(CLIPConfig(text_config=text_config.to_dict(), vision_config=_vision_config().to_dict(), projection_dim=WIDTH))
    read_out = AttributeReadOut()
    optimizer = torch.optim.AdamW([*model.parameters(), *read_out.parameters()], lr=LR, weight_decay=0.1)
    steps = scaled(STEPS)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, min(WARMUP, steps), steps))
    scenes = generate_scenes("train", max(BATCH, steps * BATCH // 4), seed=7)  # each scene seen about 4 times
    rng = random.Random(0)
    started = time.perf_counter()
    model.train()
    for _ in tqdm(range(steps), desc="zoo: tiny-clip contrastive pretraining", unit="step"):
        batch = rng.sample(scenes, BATCH)
        texts = [rng.choice(captions(s, rng)) for s in batch] + [captions(hard_negative(s, rng), rng)[0] for s in batch]
        vision = model.vision_model(pixel_values=_pixels(batch), output_hidden_states=True)
        image = F.normalize(model.visual_projection(vision.pooler_output), dim=-1)
        text = F.normalize(_projected(model.get_text_features(**_tokens(tokenizer, texts))), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image @ text.T  # [B, 2B]: positives, then hard negatives
        targets = torch.arange(BATCH)
        contrastive = (F.cross_entropy(logits, targets) + F.cross_entropy(logits[:, :BATCH].T, targets)) / 2
        loss = contrastive + READ_OUT_WEIGHT * read_out.loss(vision.hidden_states, quadrant_labels(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    val = generate_scenes("val", 256, seed=7)
    with torch.no_grad():
        val_hidden = model.vision_model(pixel_values=_pixels(val), output_hidden_states=True).hidden_states
        read_out_accuracy = read_out.accuracy(val_hidden, quadrant_labels(val))
    vision = CLIPVisionModel(_vision_config())
    # transformers 5's CLIPVisionModel is the bare tower; 4.x wraps it in .vision_model.
    tower = getattr(vision, "vision_model", vision)
    tower.load_state_dict(model.vision_model.state_dict())
    vision.save_pretrained(out)
    _save_processor(out)
    write_quality(out, {
        "pretraining": f"contrastive, {steps} steps x {BATCH} pairs + {BATCH} hard negatives, and per-token "
                       f"attribute read-out at layers {list(READ_OUT_LAYERS)}",
        "final_loss": round(float(contrastive.detach()), 4),
        "val_read_out_accuracy_layer_-2": read_out_accuracy,
        "val_retrieval_top1_of_256": round(_retrieval_accuracy(model, tokenizer, val, random.Random(1)), 4),
        "train_seconds": round(time.perf_counter() - started, 1),
    })
