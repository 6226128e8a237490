"""Linear probes on a frozen vision tower's image tokens: is what the questions need in there?

    python experiments/probe_tower.py --tower zoo://tiny-clip --layer -2

For every image token of held-out scenes it fits a logistic-regression probe (full-batch,
a few hundred LBFGS steps) on train scenes and reports accuracy on val scenes, for:
- quadrant: which quadrant the token is (can the LM tell the tokens apart by content alone?);
- occupied: whether an object is in the token's quadrant (what existence and count need);
- colour / shape / size: of the object in the token's quadrant (tokens holding one).
Needs the world's one-object-per-quadrant layout and a 2x2-patch tower (4 image tokens).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from mmkit.core.registry import ENCODERS, load_components
from mmkit.data.images import ImageProcessor
from mmkit.synth.world import COLOURS, QUADRANTS, SHAPES, SIZES, generate_scenes, quadrant, render


def token_table(encoder, processor, split: str, count: int) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    scenes = generate_scenes(split, count, seed=5)
    pixels = torch.stack([processor(render(s, 64)) for s in scenes])
    with torch.no_grad():
        features = torch.cat([encoder(pixels[i : i + 256]) for i in range(0, len(scenes), 256)])
    labels: dict[str, list[int]] = {"quadrant": [], "occupied": [], "colour": [], "shape": [], "size": []}
    for scene in scenes:
        by_quadrant = {quadrant(o.box): o for o in scene.objects}
        for index, name in enumerate(QUADRANTS):  # patch order is row-major: TL, TR, BL, BR
            obj = by_quadrant.get(name)
            labels["quadrant"].append(index)
            labels["occupied"].append(int(obj is not None))
            labels["colour"].append(list(COLOURS).index(obj.colour) if obj else -1)
            labels["shape"].append(SHAPES.index(obj.shape) if obj else -1)
            labels["size"].append(SIZES.index(obj.size) if obj else -1)
    return features.reshape(-1, features.shape[-1]), {k: np.array(v) for k, v in labels.items()}


def probe(train_x: torch.Tensor, train_y: np.ndarray, val_x: torch.Tensor, val_y: np.ndarray) -> float:
    keep_train, keep_val = train_y >= 0, val_y >= 0
    x, y = train_x[keep_train], torch.tensor(train_y[keep_train])
    mean, std = x.mean(0), x.std(0) + 1e-6
    linear = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=300)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear((x - mean) / std), y) + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = linear((val_x[keep_val] - mean) / std).argmax(1).numpy()
    return float((predicted == val_y[keep_val]).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tower", default="zoo://tiny-clip")
    parser.add_argument("--layer", type=int, default=-2)
    args = parser.parse_args()
    load_components()
    encoder = ENCODERS.get("hf_clip")(path=args.tower, layer=args.layer)
    processor = ImageProcessor(encoder.image_stats, "pad")
    train_x, train_y = token_table(encoder, processor, "train", 2000)
    val_x, val_y = token_table(encoder, processor, "val", 400)
    print(f"tower {args.tower} layer {args.layer}: linear-probe accuracy on val tokens")
    for name in train_y:
        print(f"  {name:<9} {100 * probe(train_x, train_y[name], val_x, val_y[name]):5.1f}%")


if __name__ == "__main__":
    main()
